#!/usr/bin/env bash
# The alignment experiment behind docs/results/alignment.{json,md}: MPO, the PRM and Best-of-N on the
# toy world's arithmetic chain-of-thought task, all from the demo's SFT model (run `make demo` first).
# Roughly 3 hours on 2 CPU cores, from its parts' times (not run end to end since the PRM's data grew): the
# PRM's data ~50 min, its training 84 min on one core of a shared machine, the rest ~45 min. Seeds:
# 21000 (preference questions), 30000-32000 (PRM questions), 40000 (validation, used to choose learning
# rates, steps and the PRM's settings), 10000 (the held-out test seed reported).
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
# 3. PRM data: 5,400 questions in three files, 4 solutions per question, 8 Monte Carlo rollouts (T 1.0)
#    per step prefix, '+' iff any is right; one meta file lists the three
for part in "prm600 600 30000" "prm2400 2400 31000" "prm2400b 2400 32000"; do
    set -- $part
    $PY -m nativevl data prm --model "$SFT" --toyworld arithmetic --n "$2" --seed "$3" --solutions 4 --rollouts 8 \
        --max_new_tokens 64 --out "$RUN/$1/prm.jsonl"
done
cat > "$RUN/prm5400.json" <<'META'
{"prm600": {"root": "prm600", "annotation": "prm600/prm.jsonl", "max_dynamic_patch": 1, "data_augment": false},
 "prm2400": {"root": "prm2400", "annotation": "prm2400/prm.jsonl", "max_dynamic_patch": 1, "data_augment": false},
 "prm2400b": {"root": "prm2400b", "annotation": "prm2400b/prm.jsonl", "max_dynamic_patch": 1, "data_augment": false}}
META
# 4. the PRM, initialised from the SFT model and grown by 2 identity blocks; the two-way '+'/'-' loss at the
#    label slots plus 0.2 x the text of the steps that are right so far; 2,400 steps of 8 packs (57,622
#    solutions, 2.7 epochs)
$PY -m nativevl train prm --out "$RUN/prm" --init_from="$SFT" --meta="$RUN/prm5400.json" --objective=prm \
    --grow_layers=2 --prm_step_lm=0.2 --lr=3e-4 --warmup_steps=50 --max_steps=2400 --global_batch=8 \
    --max_tokens=768 --max_tiles=16 --tensorboard=false
# 5. evaluation on the held-out seed: greedy SFT and SFT + MPO, then Best-of-8 of the SFT policy
$PY -m nativevl eval --model "$SFT" --tasks arithmetic --n "$N" --seed "$SEED" --out "$RUN/eval_sft.json"
$PY -m nativevl eval --model "$RUN/mpo/final" --tasks arithmetic --n "$N" --seed "$SEED" --out "$RUN/eval_mpo.json"
$PY -m nativevl eval --model "$SFT" --tasks arithmetic --n "$N" --seed "$SEED" --best-of-n 8 --prm "$RUN/prm/final" \
    --out "$RUN/best_of_n.json"
$PY -m nativevl eval --model "$RUN/mpo/final" --tasks arithmetic --n "$N" --seed "$SEED" --best-of-n 8 \
    --prm "$RUN/prm/final" --out "$RUN/best_of_n_mpo.json"
$PY -m nativevl.eval.alignment "$RUN" docs/results
