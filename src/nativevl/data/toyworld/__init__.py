"""The toy world: procedural image + text tasks with verifiable answers, for CPU-scale runs."""

from nativevl.data.toyworld.source import ToyWorldSource, corpus, write_dataset
from nativevl.data.toyworld.tasks import FAMILIES, Example, example, final_answer, verify

__all__ = ["FAMILIES", "Example", "ToyWorldSource", "corpus", "example", "final_answer", "verify", "write_dataset"]
