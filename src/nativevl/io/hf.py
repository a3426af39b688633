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

from nativevl.config import ModelConfig
from nativevl.io import keymap
from nativevl.io.hf_config import config_to_hf, config_to_internvl, read_config
from nativevl.model.vlm import VisionLanguageModel

log = logging.getLogger(__name__)

LAYOUTS = ("hf", "internvl")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")

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


def stored_dtypes(path: str | Path) -> set[str]:
    """The dtypes a checkpoint folder's weights are stored in ("BF16", "F32", ...), read from the
    safetensors headers (no tensor is loaded)."""
    out = set()
    for f in weight_files(Path(path)):
        with safe_open(str(f), "pt") as st:
            out.update(st.get_slice(k).get_dtype() for k in st.keys())  # noqa: SIM118 - a safe_open handle
    return out


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


def _json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _source_tiling(source: Path) -> dict[str, Any]:
    """The source checkpoint's tiling settings, in the original layout's keys (empty when unknown)."""
    layout = _folder_layout(source)
    if layout == "internvl":
        d = _json(source / "config.json")
        return {k: d[k] for k in ("dynamic_image_size", "use_thumbnail", "min_dynamic_patch", "max_dynamic_patch") if k in d}
    if layout == "hf":
        d = _json(source / "preprocessor_config.json")
        return {k: d[h] for h, k in (("min_patches", "min_dynamic_patch"), ("max_patches", "max_dynamic_patch")) if h in d}
    return {}


def _copy_source_files(source: Path, dst: Path, layout: str) -> None:
    """What a converted or re-saved checkpoint keeps of its source folder: tokenizer and processor files,
    remote code (the original layout's; a tokenizer's own in either), the model card, licence, examples
    and whatever else is not weights or a config written anew."""
    # An original repo's preprocessor_config.json is a CLIP center crop; in an -hf folder transformers
    # would load it in place of InternVL's tiling processor, so only an -hf source's processor files go
    # into an -hf folder (ours are written otherwise).
    foreign = layout == "hf" and _folder_layout(source) != "hf"
    auto_map = _json(source / "tokenizer_config.json").get("auto_map") or {}
    refs = [r for v in auto_map.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
    tokenizer_code = {r.rsplit("--", 1)[-1].split(".")[0] + ".py" for r in refs}
    weights = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
    for f in source.iterdir():
        name = f.name
        if (name in ("config.json", "generation_config.json") or name.endswith(".index.json") or f.suffix in weights
                or (name.startswith(".") and name != ".gitattributes")
                or (foreign and name in PROCESSOR_FILES)
                or (f.suffix == ".py" and layout != "internvl" and name not in tokenizer_code)):
            continue
        if f.is_dir():  # examples/ and the like; not a folder of other weights (a hub repo's original/)
            if not any(g.suffix in weights for g in f.rglob("*")):
                shutil.copytree(f, dst / name)
        elif f.is_file():
            shutil.copy2(f, dst / name)


def _processor_files(cfg: ModelConfig, tiling: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
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
        "min_patches": int((tiling or {}).get("min_dynamic_patch", 1)),
        "max_patches": int((tiling or {}).get("max_dynamic_patch", 12)),
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
    source = getattr(model, "source_path", None)
    source = Path(source) if source is not None and Path(source).is_dir() else None
    tiling = _source_tiling(source) if source is not None else {}
    config = config_to_hf(cfg) if layout == "hf" else config_to_internvl(cfg)
    if layout == "internvl":
        config.update(tiling)
        if source is not None and _folder_layout(source) == "internvl":  # its remote code's classes
            config.update({k: v for k, v in _json(source / "config.json").items() if k in ("auto_map", "template")})
    config["torch_dtype"] = str(next(iter(sd.values())).dtype).removeprefix("torch.")
    with staged_folder(path) as tmp:
        write_tensors(tensors, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = _json(source / "generation_config.json") if source is not None else {}  # sampling defaults kept
        eos = generation.get("eos_token_id")
        eos = [cfg.text.eos_token_id] + [e for e in (eos if isinstance(eos, list) else [eos]) if e not in (None, cfg.text.eos_token_id)]
        generation.update(eos_token_id=eos if len(eos) > 1 else eos[0], pad_token_id=cfg.text.pad_token_id)
        if cfg.text.bos_token_id is not None:
            generation["bos_token_id"] = cfg.text.bos_token_id
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if source is not None:  # also when re-saving in place: the old folder is still there
            _copy_source_files(source, tmp, layout)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if layout == "hf":
            _add_internvl_tokenizer_fields(tmp)
            for name, content in _processor_files(cfg, tiling).items():
                if not (tmp / name).exists():
                    (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)


def check_destination(path: str | Path) -> Path:
    """A folder a checkpoint may be written to (staged_folder's checks, for a command to make before its
    long work): not a file, nor a folder holding other things than a checkpoint."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file: a checkpoint is a folder (give another destination)")
    if path.is_dir() and any(path.iterdir()) and not any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
        raise ValueError(f"{path} is a folder holding other things than a checkpoint: it would be replaced whole "
                         "(give a new or empty folder, or the checkpoint's own folder)")
    return path


@contextlib.contextmanager
def staged_folder(path: str | Path):
    """A temporary folder beside `path` to write a checkpoint (or adapter) into: when the block ends
    it is fsynced and renamed onto `path` (an old folder there removed only after the move); if the
    block fails it is removed, and `path` is left as it was."""
    path = check_destination(path)
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
    named = {"start_image_token": IMG_START, "end_image_token": IMG_END, "context_image_token": IMG_CONTEXT}
    on_top = "context_image_token" in d  # (transformers 5 saves the named tokens at the top level)
    if isinstance(extra, list):  # transformers 5's additional special tokens: kept, the named ones beside them
        missing = not on_top
        if missing:
            d.update(named)
            d.setdefault("video_token", VIDEO)
    else:  # transformers 4 reads them from the extra_special_tokens dict only
        missing = not (isinstance(extra, dict) and "context_image_token" in extra)
        if missing:
            extra = dict(extra) if isinstance(extra, dict) else {}
            extra.update(named)
            extra.setdefault("video_token", VIDEO)
            d["extra_special_tokens"] = extra
    if missing:
        # An original tokenizer's template (if any) joins message['content'] as a string, with InternVL's
        # system prompt; the processor passes image parts, so it gets the -hf template, as the converter does.
        original_template = not on_top and d.pop("chat_template", None) is not None
        config_file.write_text(json.dumps(d, indent=2, ensure_ascii=False) + "\n")
        if original_template:
            (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    if "chat_template" not in d and not (folder / "chat_template.jinja").exists():
        (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_dir():
            _fsync_tree(f)
            continue
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
