"""LoRA adapters in PEFT's format: adapter_config.json + adapter_model.safetensors.

Written by a LoRA training run (DIR/final_adapter) for transformers' InternVLForConditionalGeneration of
its base checkpoint, so `PeftModel.from_pretrained(base, adapter)` (and servers that read PEFT
adapters) apply it; whole modules trained in full go in as PEFT's `modules_to_save`. Read from PEFT
adapters made by anyone (PEFT, LLaMA-Factory, ms-swift, ...) for the -hf module tree or for the original
InternVLChatModel one (fused ViT qkv, `mlp1`, `language_model.model`), and merged into the weights:
`load_model(base, adapter=DIR)`, `nativevl convert BASE OUT --adapter DIR`, `--adapter` of chat, serve
and eval. A QLoRA run's adapter carries a note (QLORA_FILE) that has the loader decode the base's layers
from 4 bits first, as the run trained them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nativevl.io import keymap

PEFT_PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# beside a QLoRA run's adapter (PEFT reads neither): which modules' layers it trained over in 4 bits, so
# that merging it decodes those weights from NF4 first, as in training (and as the run's final/ holds)
QLORA_FILE = "nativevl_qlora.json"
FULL_MODULES = {"vit": ("vision_tower",), "mlp": ("multi_modal_projector",)}  # an LLM trained in full: no adapter
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


def adapter_contents(state: dict[str, torch.Tensor], loras: dict[str, tuple[int, float, float]],
                     full_modules: list[str], base: str | None) -> tuple[dict[str, torch.Tensor], dict]:
    """A PEFT LoRA adapter's (tensors, config), copied out of the model (so it may be merged after).

    state: the model's state dict (our names; LoRA layers as name.lora_A / name.lora_B / name.base.*);
    loras: LoRA layer name -> (rank, alpha, dropout); full_modules: our top-level modules trained in full
    (vision_tower, multi_modal_projector) saved whole as PEFT's modules_to_save; base: the checkpoint the
    adapter applies to (adapter_config's base_model_name_or_path)."""
    if not loras:
        raise ValueError("the model has no LoRA layers: there is no adapter to write")
    tensors: dict[str, torch.Tensor] = {}
    for name in loras:
        for which in "AB":
            tensors[f"{PEFT_PREFIX}{keymap.to_hf_module(name)}.lora_{which}.weight"] = state[f"{name}.lora_{which}"]
    for module in full_modules:
        for key, value in state.items():
            if key.startswith(module + "."):
                tensors[PEFT_PREFIX + keymap.to_hf_module(key)] = value
    tensors = {k: v.detach().to("cpu", torch.float32).clone() for k, v in tensors.items()}  # owned copies
    ranks = {keymap.to_hf_module(n): r for n, (r, _, _) in loras.items()}
    alphas = {keymap.to_hf_module(n): a for n, (_, a, _) in loras.items()}
    rank, alpha = Counter(ranks.values()).most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": max(d for _, _, d in loras.values()),
        "target_modules": sorted(ranks),
        # modules of another rank or alpha than the most common one, by their whole name
        "rank_pattern": {f"^{re.escape(m)}$": r for m, r in ranks.items() if r != rank},
        "alpha_pattern": {f"^{re.escape(m)}$": a for m, a in alphas.items() if a != alpha},
        "modules_to_save": [keymap.to_hf_module(m).removeprefix("model.") for m in full_modules] or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    return tensors, config


def write_adapter(path: str | Path, tensors: dict[str, torch.Tensor], config: dict, qlora: dict | None = None) -> Path:
    """adapter_model.safetensors + adapter_config.json (+ QLORA_FILE: {module: {"nf4_block", "double_quant"}}
    for a QLoRA run) into `path` (a temporary folder renamed into place)."""
    from nativevl.io.hf import staged_folder

    with staged_folder(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if qlora:
            (tmp / QLORA_FILE).write_text(json.dumps({"modules": qlora}, indent=2) + "\n")
    return Path(path)


def decode_qlora_base(state: dict[str, torch.Tensor], path: str | Path) -> int:
    """For a QLoRA adapter (QLORA_FILE beside it), the base's LoRA target weights in those modules of a
    state dict (our names, as read: before any cast) replaced by their NF4 round trip, the weights the
    adapter was trained over; returns how many. 0 for any other adapter."""
    from nativevl.train.qlora import nf4_round_trip
    from nativevl.train.stages import MODULE_ATTRS, TARGETS

    note = Path(path) / QLORA_FILE
    if not note.is_file():
        return 0
    try:
        modules = json.loads(note.read_text())["modules"]
        specs = {MODULE_ATTRS[m] + ".": (TARGETS[m], int(spec["nf4_block"]), bool(spec["double_quant"]))
                 for m, spec in modules.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{note}: not a QLoRA note this version reads ({e!r})") from None
    count = 0
    for key, w in state.items():
        for prefix, (targets, block, double_quant) in specs.items():
            if key.startswith(prefix) and key.endswith(".weight") and key.rsplit(".", 2)[-2] in targets and w.dim() == 2:
                state[key] = nf4_round_trip(w, block, double_quant)  # float32, as training computed: load_model casts
                count += 1
    return count


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: the first key that matches the module name (as a whole name
    or a regex over its dotted suffix)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?(?:{key})$", module) or re.fullmatch(key, module):
            return value
    return default


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A PEFT LoRA adapter -> (weight deltas scale * B @ A, tensors that replace the model's (modules_to_save)),
    both keyed by our parameter names (the ViT's fused qkv delta split into q / k / v as the weights are)."""
    path = Path(path)
    try:
        config = json.loads((path / CONFIG_FILE).read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (a PEFT adapter folder holds it)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path / CONFIG_FILE}: not valid JSON ({e})") from None
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r}; only LoRA adapters are read")
    for key, ok, what in (("use_dora", False, "DoRA"), ("fan_in_fan_out", False, "fan_in_fan_out (Conv1D) layers"),
                          ("lora_bias", False, "LoRA biases"), ("bias", "none", "trained biases")):
        if config.get(key, ok) not in (ok, None):
            raise ValueError(f"{path}: {what} ({key}={config[key]!r}) are not supported; merge with PEFT "
                             "(merge_and_unload) and load the merged checkpoint")
    weights = path / WEIGHTS_FILE
    try:
        if weights.is_file():
            raw = load_file(str(weights))
        elif (path / "adapter_model.bin").is_file():
            raw = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE} or adapter_model.bin")
    except (SafetensorError, OSError, RuntimeError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: the adapter weights cannot be read ({e})") from None
    bad = [k for k in raw if not k.startswith(PEFT_PREFIX)]
    if bad:
        raise ValueError(f"{path}: tensor names must start with {PEFT_PREFIX!r} (PEFT's); got e.g. {bad[:3]}")
    # PEFT saves a LoRA-wrapped embedding / lm_head's own weight as X.base_layer.weight: X.weight
    names = {k[len(PEFT_PREFIX):].replace(".base_layer.", "."): v for k, v in raw.items()}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    replaced: dict[str, torch.Tensor] = {}
    for name, value in names.items():
        if "lora_embedding_" in name or "lora_magnitude" in name:
            raise ValueError(f"{path}: {name}: LoRA on embeddings / DoRA magnitudes are not supported")
        m = _LORA_KEY.match(name)
        if m:
            pairs.setdefault(m["module"], {})[m["which"]] = value
        else:
            replaced[name] = value
    deltas: dict[str, torch.Tensor] = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{path}: {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
        a, b = ab["A"].float(), ab["B"].float()
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{path}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not chain")
        rank = a.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
        scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        deltas[f"{module}.weight"] = (b @ a) * scale
    # the module tree's names -> ours: the -hf in-memory tree has a leading "model."; anything else is
    # the original layout (or -hf on-disk names, which map the same way)
    hf = any(k.startswith("model.") for k in [*deltas, *replaced])
    to_ours = keymap.from_hf if hf else keymap.from_internvl
    return to_ours(deltas), to_ours(replaced)


@torch.no_grad()
def merge_adapter(model, path: str | Path) -> int:
    """Add a PEFT LoRA adapter's deltas to `model`'s weights (and copy its modules_to_save), in place;
    returns the number of weights changed. Names or shapes the model lacks are an error naming them."""
    deltas, replaced = read_adapter(path)
    tied = ("lm_head.weight", "language_model.embed_tokens.weight")
    if model.config.tie_word_embeddings and any(k in tied for k in [*deltas, *replaced]):
        # the adapter changes the head or the embeddings alone (PEFT's copies are untied): so do we
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        model.config = dataclasses.replace(model.config, tie_word_embeddings=False)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    missing = sorted(k for k in [*deltas, *replaced] if k not in params)
    if missing:
        raise ValueError(f"{path}: the adapter changes {len(missing)} weight(s) this model does not have, e.g. "
                         f"{missing[:4]} (an adapter for another architecture?)")
    for key, value in [*deltas.items(), *replaced.items()]:
        if tuple(value.shape) != tuple(params[key].shape):
            raise ValueError(f"{path}: {key}: adapter shape {tuple(value.shape)}, model {tuple(params[key].shape)}")
    for key, value in replaced.items():  # first: a delta may apply to a replaced weight (LoRA on a saved head)
        params[key].copy_(value.to(params[key].device, params[key].dtype))
    for key, delta in deltas.items():
        p = params[key]
        p.copy_((p.float() + delta.to(p.device)).to(p.dtype))
    return len(deltas) + len(replaced)
