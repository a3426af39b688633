#!/usr/bin/env bash
# The GPU checks and benchmarks in one run (what docs/performance.md reports), for a one-GPU machine
# with torch, transformers and triton installed: PYTHONPATH=src, no install step.
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=src
OUT=${OUT:-/tmp/nativevl-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/card.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/card.txt"
timeout 70 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_engine.py tests/test_attention_kernels.py 2>&1 | tail -25 | tee "$OUT/gpu_tests.log"
timeout 150 python3 benchmarks/decode.py --shape internvl3_1b --device cuda --dtype bfloat16 --json "$OUT/decode.json" 2>&1 | tail -40 | tee "$OUT/decode.log"
timeout 175 python3 benchmarks/train_throughput.py --shape internvl3_2b --device cuda --steps 8 --variants base,fast --profile fast --json "$OUT/train_2b.json" 2>&1 | tail -60 | tee "$OUT/train_2b.log"
