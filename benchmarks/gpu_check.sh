#!/usr/bin/env bash
# The GPU checks and benchmarks in one run (what docs/performance.md reports), for a one-GPU machine
# with torch, transformers and triton installed: PYTHONPATH=src, no install step.
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
#   PARTS="decode" DECODE_VARIANTS="base,chunk8,chunk8+autotune" OUT=/tmp/gpu bash benchmarks/gpu_check.sh
# PARTS picks among tests, decode, train, followup and evalcirc, in that order (default "decode train",
# the two issues' figures); each part has its own time limit and writes its whole log and its JSON as it
# goes (the terminal shows their tails), so a part cut short keeps what it measured. Limits: decode
# 360 s (the issue-7 figure: four engine variants, each compiled and captured at batch 1 and 32, each
# profiled for where the GPU waits right after its batch-1 figure) + train 175 s (the issue-8 figure:
# MFU of the loop's single-GPU path and of FSDP2's bf16 parameters, one step profiled with its trace
# kept as train-fast.json.gz; transformers' side, 4.80x slower on an H200 before, is left to
# `--only transformers` for time) fit one 600-s device call; tests (240 s), followup (120 s:
# multi-turn TTFT with and without the vision cache) and evalcirc (180 s: an MMBench-layout file, a
# picture through the ViT once per batch or per row, and eval --engine) go in a second call. Parts whose
# limits add up to more than 570 s are refused (MAX_SECONDS to change it). Training steps of 16,384
# tokens peaked at 88.5 GiB on an H200: a card with less than 100 GB trains steps of 8,192 (STEP_TOKENS).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=src
OUT=${OUT:-/tmp/nativevl-gpu}
PARTS=${PARTS:-decode train}
DECODE_VARIANTS=${DECODE_VARIANTS:-base,chunk8+split,chunk8+gemv,chunk8+split+gemv+cprefill}
total=0
for part in $PARTS; do
  case "$part" in
    tests) total=$((total + 240)) ;; decode) total=$((total + 360)) ;; train) total=$((total + 175)) ;;
    followup) total=$((total + 120)) ;; evalcirc) total=$((total + 180)) ;;
    *) echo "PARTS: unknown part '$part' (tests, decode, train, followup, evalcirc; space-separated)"; exit 2 ;;
  esac
done
if [ "$total" -gt "${MAX_SECONDS:-570}" ]; then
  echo "PARTS=\"$PARTS\": their limits add up to $total s, over ${MAX_SECONDS:-570} s (one device call); split them"; exit 2
fi
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/card.txt"
mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1 | tr -dc 0-9)
STEP_TOKENS=${STEP_TOKENS:-$([ "${mib:-0}" -ge 100000 ] && echo 16384 || echo 8192)}
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/card.txt"
case " $PARTS " in *" tests "*)
  # SIGINT at the limit: pytest still prints which tests failed or were not reached
  timeout -s INT -k 20 240 python3 -m pytest -v -rfE --durations=10 -m gpu -p no:cacheprovider tests/test_engine.py tests/test_attention_kernels.py tests/test_decode_kernel.py \
    tests/test_qlora.py tests/test_train_eval.py tests/test_train.py tests/test_prefix_cache.py 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -40 ;;
esac
case " $PARTS " in *" decode "*)
  timeout 360 python3 benchmarks/decode.py --shape internvl3_1b --device cuda --dtype bfloat16 \
    --variants "$DECODE_VARIANTS" --profile "$DECODE_VARIANTS" --json "$OUT/decode.json" 2>&1 | tee "$OUT/decode.log" | tail -80 ;;
esac
case " $PARTS " in *" train "*)
  echo "train: steps of $STEP_TOKENS tokens"
  timeout 175 python3 benchmarks/train_throughput.py --shape internvl3_2b --device cuda --steps 8 --variants fast,fsdp \
    --step_tokens "$STEP_TOKENS" \
    --only ours --profile fast --trace-dir "$OUT" --json "$OUT/train_2b.json" 2>&1 | tee "$OUT/train_2b.log" | tail -60 ;;
esac
case " $PARTS " in *" followup "*)
  timeout 120 python3 benchmarks/follow_up.py --shape internvl3_1b --device cuda --tiles 13 --turns 4 \
    --json "$OUT/follow_up.json" 2>&1 | tee "$OUT/follow_up.log" | tail -12 ;;
esac
case " $PARTS " in *" evalcirc "*)
  timeout 180 python3 benchmarks/eval_circular.py --shape internvl3_1b --device cuda --questions 32 --max-num 6 \
    --batch-size 32 --new-tokens 16 --json "$OUT/eval_circular.json" 2>&1 | tee "$OUT/eval_circular.log" | tail -6 ;;
esac
