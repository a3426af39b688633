"""Weight-only quantization of the LLM for serving, in the compressed-tensors format (what llm-compressor
writes and vLLM serves with its W4A16 / W8A16 kernels): `nativevl quantize MODEL OUT --scheme w4a16`.

The LLM's linear layers (q/k/v/o, gate/up/down) get symmetric integer weights with one scale per group
of `group_size` input columns (w4a16) or per output channel (w8a16), rounded to nearest; the ViT, the
projector, the embeddings and lm_head stay in bf16 (InternVL's vision path is small and sensitive).
Each quantized layer `X` is stored as `X.weight_packed` (int32, the B-bit values offset by 2^(B-1) and
packed 32/B per word along the input dimension, lowest bits first), `X.weight_scale` (bf16, (out,
groups)) and `X.weight_shape` ([out, in]); config.json carries the `quantization_config`.

`load_model` reads such checkpoints (its own and llm-compressor's pack-quantized ones) by dequantizing
to the load dtype, so `nativevl eval` measures what quantization costs.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch

from nativevl.io import keymap

SCHEMES = {"w4a16": 4, "w8a16": 8}
LLM_LINEAR = re.compile(r"^language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$")
IGNORE = ["lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"]


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (int8 values in [-2^(B-1), 2^(B-1) - 1], float32 scales (out, groups)); a group
    is `group_size` input columns (None: the whole row, one scale per output channel)."""
    out_f, in_f = w.shape
    group = group_size or in_f
    if in_f % group:
        raise ValueError(f"in_features {in_f} is not a multiple of group_size {group}")
    q_max, q_min = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    g = w.float().reshape(out_f, in_f // group, group)
    # compressed-tensors' symmetric min-max scale: the largest magnitude over half the integer range
    scale = g.abs().amax(-1) / ((q_max - q_min) / 2)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(g / scale[..., None]), q_min, q_max).to(torch.int8)
    return q.reshape(out_f, in_f), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out_f, in_f = q.shape
    groups = scale.shape[1]
    return (q.float().reshape(out_f, groups, in_f // groups) * scale.float()[..., None]).reshape(out_f, in_f)


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(out, in) int8 -> (out, ceil(in * bits / 32)) int32: values + 2^(B-1), 32/B to a word, lowest bits first."""
    per_word = 32 // bits
    out_f, in_f = q.shape
    u = (q.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    pad = (-in_f) % per_word
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.reshape(out_f, -1, per_word) << (torch.arange(per_word) * bits)
    word = u.sum(-1)  # disjoint bit fields: the sum is their OR
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)  # the same 32 bits, as int32


def unpack_int32(packed: torch.Tensor, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    out_f, in_f = shape
    per_word = 32 // bits
    u = (packed.to(torch.int64) & 0xFFFFFFFF)[..., None] >> (torch.arange(per_word) * bits)
    u = (u & ((1 << bits) - 1)).reshape(out_f, -1)[:, :in_f]
    return (u - (1 << (bits - 1))).to(torch.int8)


def quantization_config(bits: int, group_size: int | None, observer: str = "minmax") -> dict:
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "dynamic": False,
               "strategy": "group" if group_size else "channel", "group_size": group_size,
               "observer": observer, "actorder": None, "block_structure": None, "observer_kwargs": {}}
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": "pack-quantized"}},
        "ignore": IGNORE,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def quantize_model(src: str | Path, dst: str | Path, scheme: str = "w4a16", group_size: int | None = 128,
                   max_shard_bytes: int = 5 * 2**30, calib: str | None = None, calib_records: int = 128,
                   calib_max_tokens: int = 4096, device=None, memory_bytes: int = 8 * 2**30) -> dict:
    """Write `src` with its LLM linear weights quantized to `dst` (-hf layout, compressed-tensors): by
    GPTQ on the first `calib_records` records of the InternVL meta json `calib` (io/gptq.py), else by
    rounding to nearest. Returns {"layers", "bits", "group_size", "method", "rel_error"} (the weights'
    relative Frobenius error)."""
    from nativevl.io.hf import _replace_dir, load_model, read_tensors, write_tensors

    if scheme not in SCHEMES:
        raise ValueError(f"scheme {scheme!r}: one of {sorted(SCHEMES)}")
    bits = SCHEMES[scheme]
    group = group_size if scheme == "w4a16" else None  # w8a16: one scale per output channel
    model = load_model(src, dtype=torch.bfloat16)
    if group is not None:
        narrow = sorted({int(p.shape[1]) for n, p in model.named_parameters() if LLM_LINEAR.match(n)
                         and p.shape[1] % group})
        if narrow:
            raise ValueError(f"group_size {group} does not divide the LLM layers' input widths {narrow}")
    picked = {}
    if calib is not None:
        from nativevl.io.gptq import calibration_batches, gptq_model_weights
        from nativevl.io.tokenizer import load_tokenizer

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        runner = load_model(src, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device)
        batches = calibration_batches(runner, load_tokenizer(src), calib, calib_records, calib_max_tokens)
        weights = {k: v.detach() for k, v in runner.state_dict().items() if LLM_LINEAR.match(k)}
        picked = gptq_model_weights(runner.eval(), batches, weights, bits, group, device, memory_bytes)
        del runner, batches
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.quantizing")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, layout="hf", dtype=torch.bfloat16, max_shard_bytes=max_shard_bytes)
    original = {k: v.float() for k, v in model.state_dict().items() if LLM_LINEAR.match(k)}
    del model
    tensors, _ = read_tensors(tmp)
    for f in [*tmp.glob("*.safetensors"), *tmp.glob("*.safetensors.index.json")]:
        f.unlink()
    err_num = err_den = 0.0
    for ours, w in original.items():
        (key,) = keymap.to_hf({ours: w})  # the on-disk -hf name
        q, scale = picked[ours] if ours in picked else quantize_weight(w, bits, group)
        err_num += float((dequantize_weight(q, scale) - w).pow(2).sum())
        err_den += float(w.pow(2).sum())
        base = key.removesuffix(".weight")
        del tensors[key]
        tensors[f"{base}.weight_packed"] = pack_int32(q, bits)
        tensors[f"{base}.weight_scale"] = scale.to(torch.bfloat16)
        tensors[f"{base}.weight_shape"] = torch.tensor(list(w.shape), dtype=torch.int64)
    write_tensors(tensors, tmp, max_shard_bytes)
    config = json.loads((tmp / "config.json").read_text())
    config["quantization_config"] = quantization_config(bits, group, "gptq" if picked else "minmax")
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _replace_dir(tmp, dst)
    return {"layers": len(original), "bits": bits, "group_size": group, "method": "gptq" if picked else "round",
            "rel_error": math.sqrt(err_num / max(err_den, 1e-30))}


def dequantize_state(raw: dict[str, torch.Tensor], config: dict, source: str) -> dict[str, torch.Tensor]:
    """A compressed-tensors pack-quantized checkpoint's tensors with every `X.weight_packed` /
    `X.weight_scale` / `X.weight_shape` triple turned back into a float `X.weight` (other formats,
    zero points and activation quantization are refused by name)."""
    if config.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{source}: quant_method {config.get('quant_method')!r} is not read (compressed-tensors is)")
    if config.get("format") != "pack-quantized":
        raise ValueError(f"{source}: compressed-tensors format {config.get('format')!r} is not read (pack-quantized is)")
    groups = config.get("config_groups") or {}
    schemes = [g.get("weights") or {} for g in groups.values()]
    if len(schemes) != 1 or any(g.get("input_activations") for g in groups.values()):
        raise ValueError(f"{source}: only one weight-only scheme (no activation quantization) is read")
    (w,) = schemes
    if not w.get("symmetric", True) or w.get("type", "int") != "int" or w.get("actorder") not in (None, "weight"):
        raise ValueError(f"{source}: asymmetric, non-integer or activation-ordered weights are not read ({w})")
    bits = int(w["num_bits"])
    out = {}
    for key, value in raw.items():
        if key.endswith(".weight_packed"):
            base = key.removesuffix(".weight_packed")
            try:
                shape = tuple(int(x) for x in raw[f"{base}.weight_shape"].tolist())
                scale = raw[f"{base}.weight_scale"]
            except KeyError as e:
                raise ValueError(f"{source}: {base} has weight_packed but no {e.args[0]}") from None
            q = unpack_int32(value, bits, shape)
            if scale.ndim == 1:
                scale = scale[:, None]
            if shape[1] % scale.shape[1] or scale.shape[0] != shape[0]:
                raise ValueError(f"{source}: {base}: scale {tuple(scale.shape)} does not fit weight {shape}")
            out[f"{base}.weight"] = dequantize_weight(q, scale)  # float32: q * scale exactly
        elif not key.endswith((".weight_scale", ".weight_shape", ".weight_zero_point", ".weight_g_idx")):
            out[key] = value
        elif key.endswith((".weight_zero_point", ".weight_g_idx")):
            raise ValueError(f"{source}: {key}: zero points and activation order are not read")
    return out
