"""Model-in-the-loop data generation: preference pairs (correctness, DropoutNTP) and PRM step labels."""
