"""GPTQ's calibration passes: the layer-by-layer pass (each decoder layer run on the inputs the previous
quantized layer gave: one pass of the model) against the per-layer procedure it replaced (every layer's
statistics from whole forwards of the model, up to that layer, with the earlier layers quantized), on the
same random model, calibration records and settings, in one run; both must choose the same integers.

    python benchmarks/gptq_calibration.py [--shape internvl3_1b] [--records 8] [--layers 24]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import torch

from nativevl.config import preset
from nativevl.data import synthetic
from nativevl.io import gptq
from nativevl.io.quantize import LLM_LINEAR, dequantize_weight
from nativevl.io.tokenizer import train_tokenizer
from nativevl.model.vlm import VisionLanguageModel


def reference(model, batches, weights, bits, group):
    """The per-layer procedure: whole forwards (stopped after the layer) of the partly quantized model."""
    params = dict(model.named_parameters())
    out = {}
    for layer in sorted({gptq.layer_of(n) for n in weights}):
        names = [n for n in weights if gptq.layer_of(n) == layer]
        hessians = gptq.collect_hessians(model, batches, sorted({gptq.input_key(n) for n in names}), "cpu")
        for n in names:
            out[n] = gptq.gptq_quantize(weights[n], hessians[gptq.input_key(n)], bits, group, device="cpu")
            with torch.no_grad():
                params[n].copy_(dequantize_weight(*out[n]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="internvl3_1b")
    ap.add_argument("--records", type=int, default=8)
    ap.add_argument("--layers", type=int, default=None, help="LLM layers (default: the shape's)")
    args = ap.parse_args()
    tokenizer = train_tokenizer(synthetic.corpus(), vocab_size=1024)
    cfg = preset(args.shape)
    text = dataclasses.replace(cfg.text, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                               eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                               num_hidden_layers=args.layers or cfg.text.num_hidden_layers)
    cfg = dataclasses.replace(cfg, text=text, image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"))
    torch.manual_seed(0)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        m = VisionLanguageModel(cfg)
        m.init_weights()
        models.append(m.eval())
    with tempfile.TemporaryDirectory() as tmp:
        meta = synthetic.write_dataset(tmp, n_images=args.records, n_texts=2, seed=1, size=cfg.vision.image_size)
        batches = gptq.calibration_batches(models[0], tokenizer, str(meta), args.records)
    weights = {k: v.detach().clone() for k, v in models[0].state_dict().items() if LLM_LINEAR.match(k)}
    tokens = sum(int(b.input_ids.numel()) for b in batches)
    print(f"{args.shape} shape, {cfg.text.num_hidden_layers} LLM layers, {len(batches)} calibration packs "
          f"({tokens} tokens), W4 groups of 128, {torch.get_num_threads()} threads")
    t0 = time.perf_counter()
    old = reference(models[0], batches, weights, 4, 128)
    t1 = time.perf_counter()
    new = gptq.gptq_model_weights(models[1], batches, weights, 4, 128, "cpu")
    t2 = time.perf_counter()
    same = all(torch.equal(new[n][0], old[n][0]) for n in weights)
    print(f"per-layer whole forwards: {t1 - t0:7.1f} s")
    print(f"layer by layer (ours):    {t2 - t1:7.1f} s   ({(t1 - t0) / (t2 - t1):.2f}x faster; same integers: {same})")


if __name__ == "__main__":
    main()
