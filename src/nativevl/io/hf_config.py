"""config.json <-> ModelConfig, for both checkpoint layouts: transformers' `-hf` one (model_type
"internvl": vision_config / text_config) and the original InternVL one (model_type "internvl_chat":
vision_config / llm_config with InternVL's own names). `read_config` also takes the chat's stop token
and the image token from the folder's generation config and tokenizer files (as JSON: no tokenizer
needed), the way transformers and InternVL's code find them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from nativevl.config import ModelConfig, TextConfig, VisionConfig

log = logging.getLogger(__name__)

QWEN_IM_END_ID = 151645



def _text_to_dict(t: TextConfig, *, architecture: str | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {
        "model_type": t.model_type,
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "head_dim": t.head_dim,
        "hidden_act": t.hidden_act,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "max_position_embeddings": t.max_position_embeddings,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id,
        "pad_token_id": t.pad_token_id,
        "use_cache": True,
        "attention_dropout": 0.0,
    }
    if t.rope_type != "default":
        d["rope_scaling"] = {"type": t.rope_type, "rope_type": t.rope_type, "factor": t.rope_factor}
    if t.model_type == "qwen2":
        if not t.attention_bias:
            raise ValueError("a qwen2 decoder always has q/k/v biases; use model_type 'llama' for none")
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=t.num_hidden_layers)
    elif t.attention_bias:  # transformers' llama attention_bias adds an o_proj bias too, which this model has not
        raise ValueError("q/k/v biases without an o_proj bias have no llama config (its attention_bias biases o_proj "
                         "too); use model_type 'qwen2'")
    else:
        d.update(attention_bias=False, mlp_bias=False)
    if architecture:
        d["architectures"] = [architecture]
    return d


# transformers' class defaults for the keys a language model config may omit; transformers fills them
# in on loading, so we do too. transformers 4.x wrote a composite config's sub-configs as a diff: a
# 4.x-saved `text_config` lacks generic keys whose value is its class's default (bos/eos/pad ids,
# tie_word_embeddings: an InternVL3-9B-hf text_config has no eos_token_id), and hand-written or
# trimmed configs may lack more.
_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2": {  # Qwen2Config
        "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu", "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    },
    "llama": {  # LlamaConfig (InternVL3-9B's InternLM3 decoder in the -hf layout)
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False,
    },
}


def text_from_dict(d: dict[str, Any], *, source: str) -> TextConfig:
    model_type = d.get("model_type", "qwen2")
    if model_type == "llama":
        d = {**_TEXT_DEFAULTS["llama"], **d}
    elif model_type == "qwen2":
        d = {**_TEXT_DEFAULTS["qwen2"], **d}
    elif model_type != "internlm3":  # remote code (the original layout): its configs are written whole
        raise ValueError(f"{source}: unsupported language model type {model_type!r} (qwen2, llama, internlm3)")
    if model_type in ("internlm3", "llama"):
        arch, bias = "llama", bool(d.get("attention_bias", d.get("qkv_bias", False)))
        if model_type == "llama" and bias:
            raise ValueError(f"{source}: a llama decoder with attention_bias has an o_proj bias, which is not supported")
    else:
        arch, bias = "qwen2", True
    rope = d.get("rope_scaling") or d.get("rope_parameters") or {}  # transformers 5.x: the legacy key first
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "dynamic"):
        raise ValueError(f"{source}: unsupported rope type {rope_type!r} (default, dynamic)")
    if "num_attention_heads" not in d or "hidden_size" not in d:
        raise ValueError(f"{source}: language model config lacks num_attention_heads / hidden_size")
    heads = d["num_attention_heads"]
    head_dim = d.get("head_dim")
    eos = d.get("eos_token_id")
    eos = (eos[0] if eos else None) if isinstance(eos, list) else eos
    try:
        return TextConfig(
            model_type=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            intermediate_size=d["intermediate_size"],
            head_dim_override=None if head_dim in (None, d["hidden_size"] // heads) else head_dim,
            attention_bias=bias,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            hidden_act=d.get("hidden_act", "silu"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos if eos is not None else 0,
            pad_token_id=d.get("pad_token_id"),
        )
    except KeyError as e:
        raise ValueError(f"{source}: language model config lacks {e.args[0]!r}") from None


def _size(v: Any) -> int:
    return int(v[0]) if isinstance(v, (list, tuple)) else int(v)


# VisionConfig field -> config.json key where a layout names it differently, and the layout's
# defaults for keys a file may omit (transformers' InternVLVisionConfig / InternVisionConfig).
_VISION_RENAMES = {
    "hf": {},
    "internvl": {"use_qk_norm": "qk_normalization", "attention_bias": "qkv_bias", "layer_scale_init_value": "initializer_factor"},
}
_VISION_DEFAULTS = {"hf": {"attention_bias": False}, "internvl": {"attention_bias": False, "norm_type": "rms_norm"}}
# ours only: transformers' vision config has no such fields (the statistics live in the processor files)
_VISION_OURS_ONLY = ("drop_path_rate", "image_mean", "image_std")


def _vision_to_dict(v: VisionConfig, layout: str) -> dict[str, Any]:
    renames = _VISION_RENAMES[layout]
    d = {
        renames.get(f.name, f.name): getattr(v, f.name)
        for f in dataclasses.fields(v)
        if not (f.name in _VISION_OURS_ONLY and (layout == "hf" or f.name != "drop_path_rate"))
    }
    if layout == "hf":
        d.update(image_size=[v.image_size] * 2, patch_size=[v.patch_size] * 2)
    return d


def vision_from_dict(d: dict[str, Any], layout: str) -> VisionConfig:
    renames = _VISION_RENAMES[layout]
    kwargs = dict(_VISION_DEFAULTS[layout])
    for f in dataclasses.fields(VisionConfig):
        key = renames.get(f.name, f.name)
        if key in d:
            kwargs[f.name] = d[key]
    for name in ("image_size", "patch_size"):
        if name in kwargs:
            kwargs[name] = _size(kwargs[name])
    return VisionConfig(**kwargs)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    vision = {
        "model_type": "internvl_vision",
        **_vision_to_dict(cfg.vision, "hf"),
        "use_mean_pooling": True,
        "use_absolute_position_embeddings": True,
    }
    text = _text_to_dict(cfg.text)
    text["tie_word_embeddings"] = cfg.tie_word_embeddings
    return {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "downsample_ratio": cfg.downsample_ratio,
        "image_token_id": cfg.image_token_id,
        "image_seq_length": cfg.image_seq_length,
        "projector_hidden_act": cfg.projector_hidden_act,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "text_config": text,
        "vision_config": vision,
    }


def config_from_hf(d: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    v = d.get("vision_config") or {}
    if d.get("vision_feature_select_strategy", "default") != "default":
        raise ValueError(
            f"{source}: vision_feature_select_strategy {d['vision_feature_select_strategy']!r} is not supported "
            "(only 'default', which drops the CLS token)"
        )
    if d.get("vision_feature_layer", -1) != -1:
        raise ValueError(f"{source}: vision_feature_layer {d['vision_feature_layer']} is not supported (only -1)")
    try:
        vision = vision_from_dict(v, "hf")
        text_d = d.get("text_config") or {}
        text = text_from_dict(text_d, source=source)
        # 5.x always writes the top-level key (its default is True); a file without it comes from 4.x,
        # which tied by the text config's own value (default False, so left out when untied)
        tie = d["tie_word_embeddings"] if "tie_word_embeddings" in d else text_d.get("tie_word_embeddings", False)
        return ModelConfig(
            vision=vision,
            text=text,
            downsample_ratio=d.get("downsample_ratio", 0.5),
            image_token_id=d.get("image_token_id", 151667),
            projector_hidden_act=d.get("projector_hidden_act", "gelu"),
            tie_word_embeddings=bool(tie),
        )
    except (TypeError, ValueError) as e:
        raise ValueError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None


def config_to_internvl(cfg: ModelConfig) -> dict[str, Any]:
    v, t = cfg.vision, cfg.text
    llm_arch = "Qwen2ForCausalLM" if t.model_type == "qwen2" else "LlamaForCausalLM"
    llm = _text_to_dict(t, architecture=llm_arch)
    llm["tie_word_embeddings"] = cfg.tie_word_embeddings
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "downsample_ratio": cfg.downsample_ratio,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "internvl2_5",
        "force_image_size": v.image_size,
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 12,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "image_token_id": cfg.image_token_id,  # not in the original schema (it reads the tokenizer); kept for us
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            **_vision_to_dict(v, "internvl"),
            "use_flash_attn": False,
        },
        "llm_config": llm,
    }


def config_from_internvl(
    d: dict[str, Any], *, source: str = "config.json", image_token_id: int | None = None, im_end_id: int | None = None
) -> ModelConfig:
    v = d.get("vision_config") or {}
    if d.get("ps_version", "v2") != "v2":
        raise ValueError(f"{source}: ps_version {d['ps_version']!r} is not supported (released weights use v2)")
    if d.get("select_layer", -1) != -1:
        raise ValueError(f"{source}: select_layer {d['select_layer']} is not supported (only -1)")
    llm = d.get("llm_config") or {}
    try:
        if d.get("force_image_size"):
            v = {**v, "image_size": d["force_image_size"]}
        vision = vision_from_dict(v, "internvl")
        text = text_from_dict(llm, source=source)
        if d.get("template", "internvl2_5") == "internvl2_5" and im_end_id is not None:
            # InternVL's chat() stops at the template's separator <|im_end|>, not at llm_config's
            # eos (<|endoftext|> in the hub's InternVL3-1B); transformers' converter does the same.
            text = dataclasses.replace(text, eos_token_id=im_end_id)
        if image_token_id is None:
            image_token_id = d.get("image_token_id", 151667 if text.model_type == "qwen2" else 92546)
        # the original model builds its LLM from llm_config, so that value decides
        tie = llm.get("tie_word_embeddings", d.get("tie_word_embeddings", False))
        return ModelConfig(
            vision=vision,
            text=text,
            downsample_ratio=d.get("downsample_ratio", 0.5),
            image_token_id=image_token_id,
            tie_word_embeddings=bool(tie),
        )
    except (TypeError, ValueError) as e:
        raise ValueError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None


def read_config(path: str | Path) -> tuple[ModelConfig, str]:
    """(config, layout) of a checkpoint folder."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder: {cfg_file} does not exist")
    try:
        d = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    model_type = d.get("model_type")
    if model_type == "internvl":
        cfg = config_from_hf(d, source=str(cfg_file))
        # the chat's stop token: generation_config.json's, as transformers' generate uses (the -hf
        # converter writes <|im_end|> there and keeps the LLM's own eos in text_config, e.g. </s> for
        # InternVL3-9B); else the tokenizer's <|im_end|> when text_config names no eos at all
        eos = _generation_eos(path)
        if eos is None and (d.get("text_config") or {}).get("eos_token_id") is None:
            eos = _tokenizer_token_id(path, "<|im_end|>")
        if eos is not None and eos != cfg.text.eos_token_id:
            cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, eos_token_id=eos))
        return cfg, "hf"
    if model_type == "internvl_chat":
        token_id = None if "image_token_id" in d else _tokenizer_token_id(path, "<IMG_CONTEXT>")
        im_end = _tokenizer_token_id(path, "<|im_end|>")
        llm = d.get("llm_config") or {}
        if im_end is None and llm.get("model_type", "qwen2") == "qwen2" and llm.get("vocab_size", 0) > QWEN_IM_END_ID:
            im_end = QWEN_IM_END_ID  # a Qwen vocabulary without tokenizer files next to it
        return config_from_internvl(d, source=str(cfg_file), image_token_id=token_id, im_end_id=im_end), "internvl"
    raise ValueError(f"{cfg_file}: model_type {model_type!r} is neither 'internvl' (-hf) nor 'internvl_chat' (original)")


def _generation_eos(path: Path) -> int | None:
    """generation_config.json's eos_token_id (the first of a list), if the folder has one."""
    f = path / "generation_config.json"
    try:
        eos = json.loads(f.read_text()).get("eos_token_id") if f.is_file() else None
    except (json.JSONDecodeError, AttributeError):
        log.warning("%s is not a JSON object; its eos_token_id is not read", f)
        return None
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return int(eos) if isinstance(eos, int) else None


def _tokenizer_token_id(path: Path, token: str) -> int | None:
    """A special token's id from a folder's tokenizer files, read as JSON (no tokenizer needed)."""
    for name in ("tokenizer.json", "added_tokens.json", "tokenizer_config.json"):
        f = path / name
        if not f.is_file():
            continue
        try:
            d = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: not valid JSON ({e})") from None
        if name == "tokenizer.json":
            for tok in d.get("added_tokens", []):
                if tok.get("content") == token:
                    return int(tok["id"])
        elif name == "added_tokens.json" and token in d:
            return int(d[token])
        elif name == "tokenizer_config.json":
            for tid, tok in (d.get("added_tokens_decoder") or {}).items():
                if tok.get("content") == token:
                    return int(tid)
    return None
