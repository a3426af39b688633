"""Pure key maps between our state dict and the two published InternVL layouts.

Our names are transformers' in-memory names without the leading `model.`:
`vision_tower.*`, `multi_modal_projector.*`, `language_model.*` (the decoder) and `lm_head.weight`.

- `-hf` on disk (hub files, transformers' save_pretrained): `language_model.model.*` and
  `language_model.lm_head.weight`; the rest unchanged.
- `-hf` in memory (transformers 5 module tree): `model.` prefix, `lm_head.weight` at top level.
- original InternVLChatModel: `vision_model.*` with fused `attn.qkv`, `ls1/ls2`, `norm1/norm2`,
  `mlp1.{0,1,3}`, and `language_model.model.*` / `language_model.lm_head.weight`.
"""

from __future__ import annotations

import re

import torch

StateDict = dict[str, torch.Tensor]

# (ours, original) name pairs for everything but the fused ViT qkv; `{n}` is a layer index. A pair
# ending in "." maps a prefix, any other maps a whole name.
_NAME_PAIRS: list[tuple[str, str]] = [
    ("vision_tower.embeddings.cls_token", "vision_model.embeddings.class_embedding"),
    ("vision_tower.embeddings.position_embeddings", "vision_model.embeddings.position_embedding"),
    ("vision_tower.embeddings.patch_embeddings.projection.", "vision_model.embeddings.patch_embedding."),
    ("vision_tower.encoder.layer.{n}.attention.projection_layer.", "vision_model.encoder.layers.{n}.attn.proj."),
    ("vision_tower.encoder.layer.{n}.attention.q_norm.", "vision_model.encoder.layers.{n}.attn.q_norm."),
    ("vision_tower.encoder.layer.{n}.attention.k_norm.", "vision_model.encoder.layers.{n}.attn.k_norm."),
    ("vision_tower.encoder.layer.{n}.mlp.", "vision_model.encoder.layers.{n}.mlp."),
    ("vision_tower.encoder.layer.{n}.layernorm_before.", "vision_model.encoder.layers.{n}.norm1."),
    ("vision_tower.encoder.layer.{n}.layernorm_after.", "vision_model.encoder.layers.{n}.norm2."),
    ("vision_tower.encoder.layer.{n}.lambda_1", "vision_model.encoder.layers.{n}.ls1"),
    ("vision_tower.encoder.layer.{n}.lambda_2", "vision_model.encoder.layers.{n}.ls2"),
    ("multi_modal_projector.layer_norm.", "mlp1.0."),
    ("multi_modal_projector.linear_1.", "mlp1.1."),
    ("multi_modal_projector.linear_2.", "mlp1.3."),
    ("language_model.", "language_model.model."),
    ("lm_head.weight", "language_model.lm_head.weight"),
]


def _rule(source: str, target: str) -> tuple[str, str]:
    """A name pair as (regex over source names, replacement template)."""
    pattern = "^" + re.escape(source).replace(re.escape("{n}"), r"(\d+)")
    if not source.endswith("."):
        pattern += "$"
    return pattern, target.replace("{n}", r"\1")


_TO_INTERNVL = [_rule(ours, theirs) for ours, theirs in _NAME_PAIRS]
_FROM_INTERNVL = [_rule(theirs, ours) for ours, theirs in _NAME_PAIRS]

_QKV = re.compile(r"^vision_tower\.encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$")
_FUSED_QKV = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$")


def _rename(key: str, table: list[tuple[str, str]]) -> str | None:
    for pattern, template in table:
        new, n = re.subn(pattern, template, key)
        if n:
            return new
    return None


def to_hf_module(name: str) -> str:
    """Our module (or parameter) name -> transformers' in-memory InternVLForConditionalGeneration name
    (the inverse of from_hf's in-memory case): `model.` before all but the head."""
    return name if name == "lm_head" or name.startswith("lm_head.") else "model." + name


def from_hf(sd: StateDict) -> StateDict:
    """`-hf` layout (on-disk or in-memory names) -> ours. Unknown keys pass through for the loader to report."""
    out: StateDict = {}
    for key, value in sd.items():
        if key.startswith("model."):
            new = key[len("model.") :]
        elif key == "language_model.lm_head.weight":
            new = "lm_head.weight"
        elif key.startswith("language_model.model."):
            new = "language_model." + key[len("language_model.model.") :]
        else:
            new = key
        if new in out:
            raise ValueError(f"checkpoint holds tensor {new!r} twice (as {key!r} and another name)")
        out[new] = value
    return out


def to_hf(sd: StateDict) -> StateDict:
    """Ours -> `-hf` on-disk names (what the hub files and transformers' save_pretrained use)."""
    out: StateDict = {}
    for key, value in sd.items():
        if key == "lm_head.weight":
            out["language_model.lm_head.weight"] = value
        elif key.startswith("language_model."):
            out["language_model.model." + key[len("language_model.") :]] = value
        else:
            out[key] = value
    return out


def from_internvl(sd: StateDict) -> StateDict:
    """Original InternVLChatModel names -> ours; splits the fused ViT qkv into q/k/v."""
    out: StateDict = {}
    for key, value in sd.items():
        fused = _FUSED_QKV.match(key)
        if fused:
            layer, kind = fused.groups()
            q, k, v = value.chunk(3, dim=0)
            for name, part in zip("qkv", (q, k, v)):
                out[f"vision_tower.encoder.layer.{layer}.attention.{name}_proj.{kind}"] = part.clone()
            continue
        new = _rename(key, _FROM_INTERNVL)
        out[new if new is not None else key] = value
    return out


def to_internvl(sd: StateDict) -> StateDict:
    """Ours -> original InternVLChatModel names; fuses the ViT q/k/v into one qkv."""
    out: StateDict = {}
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = _QKV.match(key)
        if m:
            layer, which, kind = m.groups()
            parts.setdefault((layer, kind), {})[which] = value
            continue
        new = _rename(key, _TO_INTERNVL)
        if new is None:
            raise ValueError(f"no original-layout name for tensor {key!r}")
        out[new] = value
    for (layer, kind), qkv in parts.items():
        assert set(qkv) == {"q", "k", "v"}, f"layer {layer} {kind}: incomplete q/k/v {sorted(qkv)}"
        out[f"vision_model.encoder.layers.{layer}.attn.qkv.{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], 0)
    return out
