#!/usr/bin/env bash
# The alignment experiment behind docs/results/alignment.{json,md}: MPO, the PRM and Best-of-N on the
# toy world's arithmetic chain-of-thought task, all from the demo's SFT model (run `make demo` first).
# About 45 minutes on 2 CPU cores. Seeds: 21000 (preference questions), 30000 (PRM questions),
# 40000 (validation, used to choose learning rates and steps), 10000 (the held-out test seed reported).
set -euo pipefail
PY=${PY:-.venv/bin/python}
SFT=${SFT:-runs/demo/sft/final}
RUN=${RUN:-runs/align}
SEED=${SEED:-10000}
N=${N:-500}
COMMON="--global_batch=4 --max_tokens=384 --max_tiles=16 --tensorboard=false"

# 1. preference pairs: 8 samples per question (T 0.7, top-k 50), verified, at most 4 pairs per question
$PY -m nativevl data preference --model "$SFT" --toyworld arithmetic --n 2400 --seed 21000 --samples 8 \
    --max_pairs 4 --max_new_tokens 64 --out "$RUN/pref2400/pref.jsonl"
# 2. MPO (0.8 DPO + 0.2 BCO + 1.0 NLL, beta 0.1) from the SFT model, one epoch of the pairs
$PY -m nativevl train mpo --out "$RUN/mpo" --init_from="$SFT" --meta="$RUN/pref2400/meta.json" \
    --system_message=none --lr=1e-4 --warmup_steps=10 --max_steps=440 $COMMON
# 3. PRM data: 4 solutions per question, 8 Monte Carlo rollouts (T 1.0) per step prefix, '+' iff any is right
$PY -m nativevl data prm --model "$SFT" --toyworld arithmetic --n 600 --seed 30000 --solutions 4 --rollouts 8 \
    --max_new_tokens 64 --out "$RUN/prm600/prm.jsonl"
# 4. the PRM, initialised from the SFT model
$PY -m nativevl train prm --out "$RUN/prm" --init_from="$SFT" --meta="$RUN/prm600/meta.json" \
    --lr=1e-3 --warmup_steps=50 --max_steps=1500 $COMMON
# 5. evaluation on the held-out seed: greedy SFT and SFT + MPO, then Best-of-8 of the SFT policy
$PY -m nativevl eval --model "$SFT" --tasks arithmetic --n "$N" --seed "$SEED" --out "$RUN/eval_sft.json"
$PY -m nativevl eval --model "$RUN/mpo/final" --tasks arithmetic --n "$N" --seed "$SEED" --out "$RUN/eval_mpo.json"
$PY -m nativevl eval --model "$SFT" --tasks arithmetic --n "$N" --seed "$SEED" --best-of-n 8 --prm "$RUN/prm/final" \
    --out "$RUN/best_of_n.json"
$PY -m nativevl eval --model "$RUN/mpo/final" --tasks arithmetic --n "$N" --seed "$SEED" --best-of-n 8 \
    --prm "$RUN/prm/final" --out "$RUN/best_of_n_mpo.json"
$PY -m nativevl.eval.alignment "$RUN" docs/results
