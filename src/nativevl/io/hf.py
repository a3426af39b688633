"""Checkpoint folders: config.json + safetensors in the `-hf` layout or the original InternVL layout.

Loading validates everything before the model is built: every expected tensor present, nothing
unexpected, every shape right, every file readable; each error names the file, key and shapes.
Saving writes into a temporary sibling folder and renames it into place, so an interrupted save
never leaves a half-written checkpoint where a complete one is expected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nativevl.config import ModelConfig, TextConfig, VisionConfig
from nativevl.io import keymap
from nativevl.model.vlm import VisionLanguageModel

log = logging.getLogger(__name__)

LAYOUTS = ("hf", "internvl")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
# Files that travel with the weights when a checkpoint is converted or re-saved.
AUX_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")
QWEN_IM_END_ID = 151645

# ---------------------------------------------------------------- config.json <-> ModelConfig


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
    else:
        d.update(attention_bias=t.attention_bias, mlp_bias=False)
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


# ---------------------------------------------------------------- safetensors


def weight_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {missing}")
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        return [single]
    if (path / "pytorch_model.bin").is_file() or (path / "pytorch_model.bin.index.json").is_file():
        raise ValueError(f"{path}: only safetensors checkpoints are read; convert pytorch_model.bin first")
    raise FileNotFoundError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of a checkpoint folder, and the file each came from."""
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if key in tensors:
                        raise ValueError(f"tensor {key!r} appears in both {origin[key]} and {file}")
                    tensors[key] = f.get_tensor(key)
                    origin[key] = file
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: damaged or truncated safetensors file ({type(e).__name__}: {e})") from None
    return tensors, origin


def write_tensors(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------- load / save a model


def _check_and_build(
    cfg: ModelConfig, sd: dict[str, torch.Tensor], origin: dict[str, Path], path: Path
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    where = lambda key: origin.get(key, path)
    embed_key = "language_model.embed_tokens.weight"
    if cfg.tie_word_embeddings and "lm_head.weight" in sd and embed_key in sd:
        if sd["lm_head.weight"].shape != sd[embed_key].shape or not torch.equal(sd["lm_head.weight"], sd[embed_key]):
            log.warning("%s: config ties lm_head to the embeddings but the checkpoint's lm_head differs; untying", path)
            cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
    with torch.device("meta"):
        expected = {k: (v.shape, v.dtype) for k, v in VisionLanguageModel(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
        sd.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing:
        files = sorted({str(f) for f in origin.values()})
        raise ValueError(
            f"{path}: checkpoint is missing {len(missing)} tensor(s), e.g. "
            + ", ".join(f"{k} {tuple(expected[k][0])}" for k in missing[:5])
            + f" (read {files})"
        )
    if unexpected:
        raise ValueError(
            f"{path}: checkpoint has {len(unexpected)} unexpected tensor(s), e.g. "
            + ", ".join(f"{k} {tuple(sd[k].shape)} in {where(k)}" for k in unexpected[:5])
        )
    for key, (shape, _) in expected.items():
        if tuple(sd[key].shape) != tuple(shape):
            raise ValueError(
                f"{where(key)}: tensor {key!r} has shape {tuple(sd[key].shape)}, the config expects {tuple(shape)}"
            )
    return cfg, sd


def load_model(
    path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
    adapter: str | Path | None = None,
) -> VisionLanguageModel:
    """A checkpoint folder (-hf or original layout); `adapter`: a PEFT LoRA adapter folder merged into
    the weights (io/adapter.py)."""
    path = Path(path)
    cfg, layout = read_config(path)
    raw, raw_origin = read_tensors(path)
    quantization = json.loads((path / "config.json").read_text()).get("quantization_config")
    if quantization:  # a quantized checkpoint (io/quantize.py, llm-compressor): its weights dequantized
        from nativevl.io.quantize import dequantize_state

        raw = dequantize_state(raw, quantization, str(path / "config.json"))
        raw_origin = {k: raw_origin.get(k, raw_origin.get(f"{k}_packed")) for k in raw}
    if layout == "hf":
        sd = keymap.from_hf(raw)
        origin = {k2: raw_origin[k1] for k1, k2 in zip(raw, sd)}
    else:
        sd = keymap.from_internvl(raw)
        origin = {}
    cfg, sd = _check_and_build(cfg, sd, origin, path)
    if dtype is None:
        dtype = sd["language_model.embed_tokens.weight"].dtype
    if adapter is not None:
        from nativevl.io.adapter import decode_qlora_base

        if decoded := decode_qlora_base(sd, adapter):  # before any cast: from the weights training quantized
            log.info("%s was trained by QLoRA: %d base layers decoded from NF4 first, as in training (PEFT on a "
                     "full-precision base merges it into those weights as they are)", adapter, decoded)
    with torch.device("meta"):
        model = VisionLanguageModel(cfg)
    sd = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=not cfg.tie_word_embeddings, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.language_model.embed_tokens.weight
    model.source_path = path
    if adapter is not None:
        from nativevl.io.adapter import merge_adapter

        merge_adapter(model, adapter)
    return model.eval()


def _processor_files(cfg: ModelConfig) -> dict[str, dict[str, Any]]:
    pixels = {  # 448 px, bicubic, ImageNet statistics: what InternVL was trained with
        "processor_class": "InternVLProcessor",
        "size": {"height": cfg.vision.image_size, "width": cfg.vision.image_size},
        "do_resize": True,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(cfg.vision.image_mean),
        "image_std": list(cfg.vision.image_std),
        "do_convert_rgb": True,
    }
    image = {
        "image_processor_type": "GotOcr2ImageProcessor",
        **pixels,
        "crop_to_patches": False,  # InternVLProcessor turns it on per call
        "min_patches": 1,
        "max_patches": 12,
    }
    video = {"video_processor_type": "InternVLVideoProcessor", **pixels, "initial_shift": True, "do_sample_frames": False}
    processor = {"image_seq_length": cfg.image_seq_length, "processor_class": "InternVLProcessor"}
    return {
        "preprocessor_config.json": image,
        "video_preprocessor_config.json": video,
        "processor_config.json": processor,
    }


def save_model(
    model: VisionLanguageModel,
    path: str | Path,
    *,
    layout: str = "hf",
    tokenizer=None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
    extra_files: dict[str, str] | None = None,
) -> None:
    """Write a complete checkpoint folder; replaces `path` atomically if it exists. `extra_files`: {name:
    text} written into the folder too (so they are there exactly when the weights are)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    path = Path(path)
    cfg = model.config
    sd = {k: v if dtype is None or not v.is_floating_point() else v.to(dtype) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight")  # shared with the embeddings; transformers re-ties on load
    tensors = keymap.to_hf(sd) if layout == "hf" else keymap.to_internvl(sd)
    config = config_to_hf(cfg) if layout == "hf" else config_to_internvl(cfg)
    config["torch_dtype"] = str(next(iter(sd.values())).dtype).removeprefix("torch.")
    with staged_folder(path) as tmp:
        write_tensors(tensors, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {"eos_token_id": cfg.text.eos_token_id, "pad_token_id": cfg.text.pad_token_id}
        if cfg.text.bos_token_id is not None:
            generation["bos_token_id"] = cfg.text.bos_token_id
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        source = getattr(model, "source_path", None)
        if source is not None:  # also when re-saving in place: the old folder is still there
            # An original repo's preprocessor_config.json is a CLIP center crop; in an -hf folder
            # transformers would load it in place of InternVL's tiling processor, so only an -hf
            # source's processor files go into an -hf folder (ours are written below otherwise).
            foreign = layout == "hf" and _folder_layout(Path(source)) != "hf"
            for f in Path(source).iterdir():
                if not f.is_file() or (foreign and f.name in PROCESSOR_FILES):
                    continue
                if f.name in AUX_FILES or (layout == "internvl" and f.suffix == ".py"):
                    shutil.copy2(f, tmp / f.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if layout == "hf":
            _add_internvl_tokenizer_fields(tmp)
            for name, content in _processor_files(cfg).items():
                if not (tmp / name).exists():
                    (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)


@contextlib.contextmanager
def staged_folder(path: str | Path):
    """A temporary folder beside `path` to write a checkpoint (or adapter) into: when the block ends
    it is fsynced and renamed onto `path` (an old folder there removed only after the move); if the
    block fails it is removed, and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (*path.parent.glob(glob.escape(f".{path.name}.tmp-") + "*"),
                  *path.parent.glob(glob.escape(f".{path.name}.old-") + "*")):
        shutil.rmtree(stale, ignore_errors=True)  # left by a process killed while writing this folder
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()  # the umask's mode, as any folder the user makes (a checkpoint is for everyone)
    try:
        yield tmp
        _fsync_tree(tmp)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _folder_layout(folder: Path) -> str | None:
    """The layout a checkpoint folder's config.json names, None if it cannot be read."""
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return {"internvl": "hf", "internvl_chat": "internvl"}.get(model_type)


def _add_internvl_tokenizer_fields(folder: Path) -> None:
    """What transformers' InternVLProcessor reads from the tokenizer: the named image tokens and the
    ChatML template. Original-layout tokenizers lack them; added when converting to the -hf layout."""
    from nativevl.io.tokenizer import CHAT_TEMPLATE, IMG_CONTEXT, IMG_END, IMG_START, VIDEO

    config_file = folder / "tokenizer_config.json"
    if not config_file.is_file():
        return
    d = json.loads(config_file.read_text())
    extra = d.get("extra_special_tokens")
    if not isinstance(extra, dict) or "context_image_token" not in extra:
        extra = dict(extra) if isinstance(extra, dict) else {}
        extra.update(start_image_token=IMG_START, end_image_token=IMG_END, context_image_token=IMG_CONTEXT)
        extra.setdefault("video_token", VIDEO)
        d["extra_special_tokens"] = extra
        # An original tokenizer's template (if any) joins message['content'] as a string, with InternVL's
        # system prompt; the processor passes image parts, so it gets the -hf template, as the converter does.
        # (transformers 5 saves the named tokens at the top level: such a tokenizer is an -hf one)
        original_template = "context_image_token" not in d and d.pop("chat_template", None) is not None
        config_file.write_text(json.dumps(d, indent=2, ensure_ascii=False) + "\n")
        if original_template:
            (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    if "chat_template" not in d and not (folder / "chat_template.jinja").exists():
        (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as h:
            os.fsync(h.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move a finished folder into place; an old folder at dst is removed only after the move."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex}")
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        if old is not None:  # the previous folder goes back in place
            os.replace(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
