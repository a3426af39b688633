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

# (ours, original) regex pairs for the vision tower and projector; applied in order.
_VISION_TABLE: list[tuple[str, str]] = [
    (r"^vision_tower\.embeddings\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^vision_tower\.embeddings\.position_embeddings$", "vision_model.embeddings.position_embedding"),
    (r"^vision_tower\.embeddings\.patch_embeddings\.projection\.", "vision_model.embeddings.patch_embedding."),
    (r"^vision_tower\.encoder\.layer\.(\d+)\.attention\.projection_layer\.", r"vision_model.encoder.layers.\1.attn.proj."),
    (r"^vision_tower\.encoder\.layer\.(\d+)\.attention\.(q_norm|k_norm)\.", r"vision_model.encoder.layers.\1.attn.\2."),
    (r"^vision_tower\.encoder\.layer\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
    (r"^vision_tower\.encoder\.layer\.(\d+)\.layernorm_before\.", r"vision_model.encoder.layers.\1.norm1."),
    (r"^vision_tower\.encoder\.layer\.(\d+)\.layernorm_after\.", r"vision_model.encoder.layers.\1.norm2."),
    (r"^vision_tower\.encoder\.layer\.(\d+)\.lambda_1$", r"vision_model.encoder.layers.\1.ls1"),
    (r"^vision_tower\.encoder\.layer\.(\d+)\.lambda_2$", r"vision_model.encoder.layers.\1.ls2"),
    (r"^multi_modal_projector\.layer_norm\.", "mlp1.0."),
    (r"^multi_modal_projector\.linear_1\.", "mlp1.1."),
    (r"^multi_modal_projector\.linear_2\.", "mlp1.3."),
    (r"^language_model\.", "language_model.model."),
    (r"^lm_head\.weight$", "language_model.lm_head.weight"),
]

_QKV = re.compile(r"^vision_tower\.encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$")
_FUSED_QKV = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$")


# The same pairs read the other way (original regex, ours template).
_VISION_TABLE_INV: list[tuple[str, str]] = [
    (r"^vision_model\.embeddings\.class_embedding$", "vision_tower.embeddings.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "vision_tower.embeddings.position_embeddings"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "vision_tower.embeddings.patch_embeddings.projection."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.", r"vision_tower.encoder.layer.\1.attention.projection_layer."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.attn\.(q_norm|k_norm)\.", r"vision_tower.encoder.layer.\1.attention.\2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"vision_tower.encoder.layer.\1.mlp."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.norm1\.", r"vision_tower.encoder.layer.\1.layernorm_before."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.norm2\.", r"vision_tower.encoder.layer.\1.layernorm_after."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.ls1$", r"vision_tower.encoder.layer.\1.lambda_1"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.ls2$", r"vision_tower.encoder.layer.\1.lambda_2"),
    (r"^mlp1\.0\.", "multi_modal_projector.layer_norm."),
    (r"^mlp1\.1\.", "multi_modal_projector.linear_1."),
    (r"^mlp1\.3\.", "multi_modal_projector.linear_2."),
    (r"^language_model\.model\.", "language_model."),
    (r"^language_model\.lm_head\.weight$", "lm_head.weight"),
]


def _rename(key: str, table: list[tuple[str, str]]) -> str | None:
    for pattern, template in table:
        new, n = re.subn(pattern, template, key)
        if n:
            return new
    return None


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
        new = _rename(key, _VISION_TABLE_INV)
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
        new = _rename(key, _VISION_TABLE)
        if new is None:
            raise ValueError(f"no original-layout name for tensor {key!r}")
        out[new] = value
    for (layer, kind), qkv in parts.items():
        assert set(qkv) == {"q", "k", "v"}, f"layer {layer} {kind}: incomplete q/k/v {sorted(qkv)}"
        out[f"vision_model.encoder.layers.{layer}.attn.qkv.{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], 0)
    return out
