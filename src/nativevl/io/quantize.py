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
import logging
import math
import os
import re
from pathlib import Path

import torch

from nativevl.io import keymap

log = logging.getLogger(__name__)

SCHEMES = {"w4a16": 4, "w8a16": 8}
LLM_LINEAR = re.compile(r"^language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$")
HF_LLM_LINEAR = re.compile(LLM_LINEAR.pattern.replace("^language_model", "^language_model\\.model"))  # on disk
IGNORE = ["lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"]


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (int8 values in [-2^(B-1), 2^(B-1) - 1], float32 scales (out, groups)); a group
    is `group_size` input columns (None: the whole row, one scale per output channel)."""
    out_f, in_f = w.shape
    group = group_size or in_f
    if in_f % group:
        raise ValueError(f"in_features {in_f} is not a multiple of group_size {group}")
    q_min, q_max = int_range(bits)
    g = w.float().reshape(out_f, in_f // group, group)
    scale = minmax_scale(g, bits)
    q = torch.clamp(torch.round(g / scale[..., None]), q_min, q_max).to(torch.int8)
    return q.reshape(out_f, in_f), scale


def int_range(bits: int) -> tuple[int, int]:
    """The symmetric B-bit integers: [-2^(B-1), 2^(B-1) - 1]."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def minmax_scale(cols: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' symmetric min-max scale of each row of `cols` (..., n): the largest magnitude
    over half the integer range, on bf16's grid (bf16_scale)."""
    q_min, q_max = int_range(bits)
    return bf16_scale(cols.abs().amax(-1) / ((q_max - q_min) / 2))


def bf16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Scales as stored (bf16; 1 where a group is all zero), in the caller's dtype: the integers are
    picked with the scale that will be on disk, as llm-compressor does."""
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale.to(torch.bfloat16).to(scale.dtype)


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


def quantization_config(bits: int, group_size: int | None) -> dict:
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "dynamic": False,
               "strategy": "group" if group_size else "channel", "group_size": group_size,
               "observer": "minmax", "actorder": None, "block_structure": None, "observer_kwargs": {}}
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


def quantize_model(src: str | Path, dst: str | Path, scheme: str = "w4a16", group_size: int | None = None,
                   max_shard_bytes: int = 5 * 2**30, calib: str | None = None, calib_records: int = 128,
                   calib_max_tokens: int = 4096, device=None) -> dict:
    """Write `src` with its LLM linear weights quantized to `dst` (-hf layout, compressed-tensors): by
    GPTQ on the first `calib_records` records of the InternVL meta json `calib` (io/gptq.py), else by
    rounding to nearest. `group_size`: input columns per scale (w4a16 only; None: 128 for w4a16, and
    w8a16's one scale per output channel; 0 or -1: per channel). Returns {"layers", "bits",
    "group_size", "method", "rel_error"} (the weights' relative Frobenius error)."""
    from nativevl.io.hf import check_destination, load_model, read_config, read_tensors, staged_folder, write_tensors

    if scheme not in SCHEMES:
        raise ValueError(f"scheme {scheme!r}: one of {sorted(SCHEMES)}")
    bits = SCHEMES[scheme]
    if group_size is not None and group_size < -1:
        raise ValueError(f"group_size must be > 0, or 0 / -1 for one scale per output channel; got {group_size}")
    if scheme == "w8a16" and group_size is not None and group_size > 0:
        raise ValueError("w8a16 is written with one scale per output channel (as vLLM serves it); group_size is "
                         "for w4a16")
    group = (128 if scheme == "w4a16" else None) if group_size is None else (group_size if group_size > 0 else None)
    if group not in (None, 32, 64, 128):
        log.warning("group_size %d: vLLM's Marlin kernels serve W4A16 in groups of 32, 64 or 128 (or per channel)",
                    group)
    if calib is not None and (calib_records < 1 or calib_max_tokens < 1):
        raise ValueError(f"calib_records and calib_max_tokens must be >= 1, got {calib_records}, {calib_max_tokens}")
    config = read_config(src)[0]
    try:
        stored = json.loads((Path(src) / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        stored = None
    if stored:
        raise ValueError(f"{src} is already quantized ({stored.get('quant_method', 'quantization_config')}): "
                         "quantizing its rounded weights again adds error; quantize the full-precision checkpoint")
    if Path(dst).exists() and os.path.realpath(dst) == os.path.realpath(src):
        raise ValueError(f"{dst} is the source folder: the full-precision checkpoint would be replaced; give another "
                         "destination")
    check_destination(dst)  # before the calibration, which may take hours
    widths = {int(x) for x in _llm_input_widths(config)}
    if group is not None and any(w % group for w in widths):
        raise ValueError(f"group_size {group} does not divide the LLM layers' input widths {sorted(widths)}")
    picked = {}  # GPTQ's choice, by -hf name: computed first, its model freed before the checkpoint is
    if calib is not None:
        from nativevl.io.gptq import calibration_batches, gptq_model_weights
        from nativevl.io.tokenizer import load_tokenizer

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        runner = load_model(src, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device)
        batches = calibration_batches(runner, load_tokenizer(src), calib, calib_records, calib_max_tokens)
        weights = {k: v.detach() for k, v in runner.state_dict().items() if LLM_LINEAR.match(k)}
        chosen = gptq_model_weights(runner.eval(), batches, weights, bits, group, device)
        picked = keymap.to_hf(chosen)
        del runner, batches, weights, chosen
    with staged_folder(dst) as tmp:
        model = load_model(src, dtype=torch.bfloat16)
        model.save_pretrained(tmp, layout="hf", dtype=torch.bfloat16, max_shard_bytes=max_shard_bytes)
        del model
        tensors, _ = read_tensors(tmp)  # the bf16 checkpoint: quantized tensor by tensor from it
        for f in [*tmp.glob("*.safetensors"), *tmp.glob("*.safetensors.index.json")]:
            f.unlink()
        err_num = err_den = 0.0
        keys = [k for k in tensors if HF_LLM_LINEAR.match(k)]
        for key in keys:
            w = tensors.pop(key).float()
            q, scale = picked[key] if key in picked else quantize_weight(w, bits, group)
            err_num += float((dequantize_weight(q, scale) - w).pow(2).sum())
            err_den += float(w.pow(2).sum())
            base = key.removesuffix(".weight")
            tensors[f"{base}.weight_packed"] = pack_int32(q, bits)
            tensors[f"{base}.weight_scale"] = scale.to(torch.bfloat16)  # exact: scales are picked on bf16's grid
            tensors[f"{base}.weight_shape"] = torch.tensor(list(w.shape), dtype=torch.int64)
        write_tensors(tensors, tmp, max_shard_bytes)
        config = json.loads((tmp / "config.json").read_text())
        config["quantization_config"] = quantization_config(bits, group)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"layers": len(keys), "bits": bits, "group_size": group, "method": "gptq" if picked else "round",
            "rel_error": math.sqrt(err_num / max(err_den, 1e-30))}


def _llm_input_widths(cfg) -> tuple[int, ...]:
    t = cfg.text
    return (t.hidden_size, t.num_attention_heads * t.head_dim, t.intermediate_size)


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
    # actorder "static" is compressed-tensors' other name for "weight" (llm-compressor's GPTQ default);
    # "group" stores each column's group in weight_g_idx, read below
    if not w.get("symmetric", True) or w.get("type", "int") != "int" or w.get("actorder") not in (
            None, "weight", "static", "group"):
        raise ValueError(f"{source}: asymmetric, non-integer or dynamically ordered weights are not read ({w})")
    if w.get("strategy", "group") not in ("group", "channel", "tensor"):
        raise ValueError(f"{source}: weight strategy {w.get('strategy')!r} is not read (group, channel, tensor are)")
    if config.get("transform_config"):
        raise ValueError(f"{source}: a transform_config (weight rotations applied at run time) is not read")
    bits = int(w["num_bits"])
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"{source}: {bits}-bit weights are not read (1, 2, 4, 8 bits are)")
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
            scale = scale.float().reshape(scale.shape[0] if scale.numel() > 1 else 1, -1).expand(shape[0], -1)
            g_idx = raw.get(f"{base}.weight_g_idx")
            if g_idx is not None:  # activation order: column j belongs to group g_idx[j]
                out[f"{base}.weight"] = q.float() * scale[:, g_idx.long()]
                continue
            if shape[1] % scale.shape[1] or scale.shape[0] != shape[0]:
                raise ValueError(f"{source}: {base}: scale {tuple(scale.shape)} does not fit weight {shape}")
            out[f"{base}.weight"] = dequantize_weight(q, scale)  # float32: q * scale exactly
        elif not key.endswith((".weight_scale", ".weight_shape", ".weight_zero_point", ".weight_g_idx")):
            out[key] = value
        elif key.endswith(".weight_zero_point"):
            raise ValueError(f"{source}: {key}: zero points (asymmetric weights) are not read")
    return out
