"""`Processor`: a drop-in for transformers' InternVLProcessor, built from what a `-hf` checkpoint ships.

`processor(text=..., images=...)` expands one `<IMG_CONTEXT>` (or InternVL's `<image>`) placeholder
per image into `<img>` + `<IMG_CONTEXT>` x (image_seq_length x tiles) + `</img>`, tiles the images as
InternVL does, and returns `input_ids`, `attention_mask` (left padding) and `pixel_values`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from nativevl.data import images as img
from nativevl.data.template import image_span, render_chat
from nativevl.io.tokenizer import IMG_CONTEXT, load_tokenizer

_PLACEHOLDER = re.compile(re.escape(IMG_CONTEXT) + "|<image>")


def pad_batch(ids: list[list[int]], pad_id: int, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids, attention_mask), both (B, longest), padded on `side` (left for generation)."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be left or right, got {side!r}")
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        sl = slice(width - len(x), width) if side == "left" else slice(0, len(x))
        input_ids[row, sl] = torch.tensor(x, dtype=torch.long)
        mask[row, sl] = 1
    return input_ids, mask


def image_tiles(images: list, *, image_size: int, max_num: int = 1) -> list[torch.Tensor]:
    """Each image's tiles (n, 3, S, S) normalised, in order; an `images.VideoClip` gives one entry of one
    tile per frame (each frame is one `<image>` of the text)."""
    tiles = []
    for im in images:
        if isinstance(im, img.VideoClip):
            tiles += [img.normalize(t[None]) for t in img.frame_tiles(list(im.frames), image_size)]
        else:
            tiles.append(img.image_to_tiles(im, image_size=image_size, max_num=max_num))
    return tiles


def chat_ids(tokenizer, messages: list[dict[str, str]], tiles_per_image: list[int], *, image_seq_length: int,
             system_message: str | None = None, add_generation_prompt: bool = True) -> list[int]:
    """The token ids of a chat whose `<image>` marks stand for images of these tile counts, in order."""
    text = render_chat(messages, tiles_per_image=tiles_per_image, image_seq_length=image_seq_length,
                       system_message=system_message, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False).input_ids


def chat_inputs(
    tokenizer,
    messages: list[dict[str, str]],
    images: list,
    *,
    image_size: int,
    image_seq_length: int,
    max_num: int = 1,
    system_message: str | None = None,
    add_generation_prompt: bool = True,
) -> tuple[list[int], torch.Tensor | None]:
    """Chat messages + images -> (token ids, tiles (N, 3, S, S) normalised, or None): one prompt. An
    `images.VideoClip` among the images gives one tile per frame, each frame one `<image>` of the text."""
    tiles = image_tiles(images, image_size=image_size, max_num=max_num)
    ids = chat_ids(tokenizer, messages, [t.shape[0] for t in tiles], image_seq_length=image_seq_length,
                   system_message=system_message, add_generation_prompt=add_generation_prompt)
    return ids, (torch.cat(tiles) if tiles else None)


class Processor:
    def __init__(
        self,
        tokenizer,
        *,
        image_size: int = 448,
        image_seq_length: int = 256,
        min_patches: int = 1,
        max_patches: int = 12,
        use_thumbnail: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_size, self.image_seq_length = image_size, image_seq_length
        self.min_patches, self.max_patches, self.use_thumbnail = min_patches, max_patches, use_thumbnail

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Processor:
        path = Path(path)
        tokenizer = load_tokenizer(path)
        kwargs = {}
        cfg_file = path / "config.json"
        model_d = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        if model_d.get("model_type") in ("internvl", "internvl_chat"):
            # what the model itself needs; for -hf folders the processor files below take precedence
            from nativevl.io.hf import read_config

            cfg, _ = read_config(path)
            kwargs["image_size"], kwargs["image_seq_length"] = cfg.vision.image_size, cfg.image_seq_length
        pre = path / "preprocessor_config.json"
        if pre.is_file():
            d = json.loads(pre.read_text())
            size = d.get("size", {})
            kwargs["image_size"] = int(size.get("height", size.get("shortest_edge", 448))) if isinstance(size, dict) else int(size)
            kwargs["min_patches"] = int(d.get("min_patches", 1))
            kwargs["max_patches"] = int(d.get("max_patches", 12))
            mean, std = d.get("image_mean"), d.get("image_std")
            if mean is not None and [round(x, 3) for x in mean] != [0.485, 0.456, 0.406]:
                raise ValueError(f"{pre}: image_mean {mean} is not ImageNet's; InternVL checkpoints use ImageNet statistics")
            if std is not None and [round(x, 3) for x in std] != [0.229, 0.224, 0.225]:
                raise ValueError(f"{pre}: image_std {std} is not ImageNet's; InternVL checkpoints use ImageNet statistics")
        proc = path / "processor_config.json"
        if proc.is_file():
            kwargs["image_seq_length"] = int(json.loads(proc.read_text()).get("image_seq_length", 256))
        if model_d.get("model_type") == "internvl_chat":
            # The original layout keeps these in config.json; its preprocessor_config.json (if any) is
            # CLIP's, and it has no processor_config.json.
            kwargs["image_size"], kwargs["image_seq_length"] = cfg.vision.image_size, cfg.image_seq_length
            dynamic = bool(model_d.get("dynamic_image_size", True))
            kwargs["min_patches"] = int(model_d.get("min_dynamic_patch", 1)) if dynamic else 1
            kwargs["max_patches"] = int(model_d.get("max_dynamic_patch", 12)) if dynamic else 1
            kwargs["use_thumbnail"] = bool(model_d.get("use_thumbnail", True))
        return cls(tokenizer, **kwargs)

    def tile(self, image) -> torch.Tensor:
        # as transformers' processor: a file's EXIF orientation applied (its load_image does), an image
        # object taken as it is; transparency composited onto white
        from_file = isinstance(image, (str, Path, bytes))
        tiles = img.tile_array(
            img.load_image(image, exif=from_file, alpha_background=(255, 255, 255)),
            image_size=self.image_size,
            min_num=self.min_patches,
            max_num=self.max_patches,
            use_thumbnail=self.use_thumbnail,
        )
        return img.normalize(tiles)  # (tiles, 3, S, S)

    def __call__(self, text=None, images=None, *, padding: bool = True, padding_side: str = "left", return_tensors: str = "pt"):
        if text is None:
            raise ValueError("text is required (one <IMG_CONTEXT> or <image> placeholder per image)")
        if return_tensors != "pt":
            raise ValueError(f"only return_tensors='pt' is supported, got {return_tensors!r}")
        texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"text must be a string or a non-empty list of strings, got {text!r:.80}")
        flat = []
        if images is not None:
            for item in images if isinstance(images, (list, tuple)) else [images]:
                flat.extend(item if isinstance(item, (list, tuple)) else [item])
        n_placeholders = sum(len(_PLACEHOLDER.findall(t)) for t in texts)
        if n_placeholders != len(flat):
            raise ValueError(f"text holds {n_placeholders} image placeholder(s) but {len(flat)} image(s) were given")
        pixel_values = [self.tile(im) for im in flat]
        counts = iter([p.shape[0] for p in pixel_values])
        expanded = [_PLACEHOLDER.sub(lambda m: image_span(next(counts), self.image_seq_length), t) for t in texts]
        ids = [self.tokenizer(t, add_special_tokens=False).input_ids for t in expanded]
        if not padding and len({len(x) for x in ids}) > 1:
            raise ValueError("texts have different lengths; pass padding=True")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids, mask = pad_batch(ids, pad, side=padding_side)
        out = {"input_ids": input_ids, "attention_mask": mask}
        if pixel_values:
            out["pixel_values"] = torch.cat(pixel_values)
            out["num_patches"] = torch.tensor([p.shape[0] for p in pixel_values])
        return out

    def save_pretrained(self, path: str | Path) -> None:
        self.tokenizer.save_pretrained(str(path))
