#!/usr/bin/env bash
# What QLoRA's 4-bit base costs against LoRA on the demo: both fine-tune the demo's pre-trained model on its
# SFT mixture (scripts/qlora.py), then each is evaluated on the demo's held-out questions (200 per family,
# seed 10000) and compared question by question (exact McNemar): LoRA's merged model against QLoRA's, and
# QLoRA's export (the adapter merged into the decoded 4-bit base it trained on) against its adapter merged
# into the full-precision base as PEFT merges it (a copy of the adapter without nativevl's note, which
# would have the loader decode the base from 4 bits first). Needs `make demo` first (DEMO=runs/demo); 25 to 40 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${DEMO:-runs/demo}
OUT=${OUT:-runs/qlora}
STEPS=${STEPS:-2200}
NV=".venv/bin/nativevl"
TASKS=shapes,reading,charts,arithmetic,multi_image,text
eval_model() { "$NV" eval --model "$1" --tasks "$TASKS" --n 200 --seed 10000 --batch_size 50 --out "$2" --resume "${@:3}"; }

.venv/bin/python scripts/qlora.py --demo "$DEMO" --out "$OUT" --steps "$STEPS"
eval_model "$OUT/lora/final" "$OUT/lora.json"
eval_model "$OUT/qlora/final" "$OUT/qlora.json"
rm -rf "$OUT/qlora-adapter-peft" && cp -r "$OUT/qlora/final_adapter" "$OUT/qlora-adapter-peft"
rm -f "$OUT/qlora-adapter-peft/nativevl_qlora.json"
eval_model "$DEMO/pretrain/final" "$OUT/qlora-adapter-on-full-base.json" --adapter "$OUT/qlora-adapter-peft"
echo "== QLoRA against LoRA"
"$NV" compare "$OUT/lora.json" "$OUT/qlora.json"
echo "== QLoRA's adapter on the full-precision base against QLoRA's export"
"$NV" compare "$OUT/qlora.json" "$OUT/qlora-adapter-on-full-base.json"
