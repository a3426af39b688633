#!/usr/bin/env bash
# What weight-only quantization costs the demo's SFT model: W8A16 and W4A16 (groups of 128) rounded to
# nearest, W4A16 by GPTQ on 128 records of the demo's own SFT data, each evaluated on the demo's held-out
# questions (200 per family, seed 10000) and compared question by question with the full-precision model
# (exact McNemar). Needs `make demo` first (DEMO=runs/demo); about 2 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${DEMO:-runs/demo}
OUT=${OUT:-runs/quantization}
NV=".venv/bin/nativevl"
TASKS=shapes,reading,charts,arithmetic,multi_image,text
mkdir -p "$OUT"
eval_model() { "$NV" eval --model "$1" --tasks "$TASKS" --n 200 --seed 10000 --batch_size 50 --out "$2" --resume; }

eval_model "$DEMO/sft/final" "$OUT/bf16.json"
"$NV" quantize "$DEMO/sft/final" "$OUT/w8a16" --scheme w8a16
"$NV" quantize "$DEMO/sft/final" "$OUT/w4a16" --scheme w4a16 --group_size 128
"$NV" quantize "$DEMO/sft/final" "$OUT/w4a16-gptq" --scheme w4a16 --group_size 128 \
    --calib "$DEMO/data/meta.json" --calib_records 128
for v in w8a16 w4a16 w4a16-gptq; do
    eval_model "$OUT/$v" "$OUT/$v.json"
    echo "== $v against the unquantized model"
    "$NV" compare "$OUT/bf16.json" "$OUT/$v.json"
done
