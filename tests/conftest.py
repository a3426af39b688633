"""Shared fixtures: a small tokenizer and tiny random models, built locally (nothing is downloaded)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nativevl.config import ModelConfig, preset
from nativevl.io.hf_config import config_to_hf
from nativevl.io.tokenizer import train_tokenizer

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a red circle, a blue square and a green triangle",
    "what is shown in the image? a cat sitting on a mat",
    "one two three four five six seven eight nine ten",
] * 5


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=512)


def tiny_config(variant: str = "layer_norm", tied: bool = False) -> ModelConfig:
    """The tiny preset with the 300M-style ViT ("layer_norm") or the 6B-style one ("rms_norm": QK-norm, no bias)."""
    cfg = preset("tiny")
    if variant == "rms_norm":
        vision = dataclasses.replace(cfg.vision, norm_type="rms_norm", use_qk_norm=True, attention_bias=False)
        cfg = dataclasses.replace(cfg, vision=vision)
    return dataclasses.replace(cfg, tie_word_embeddings=tied)


def hf_model(cfg: ModelConfig, seed: int = 0):
    """transformers' InternVLForConditionalGeneration with every parameter random (so no key map hides behind a zero)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(InternVLConfig(**config_to_hf(cfg))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model


def image_batch(cfg: ModelConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of equal length: row 0 has a 1-tile image inside text, row 1 a 3-tile image then text."""
    g = torch.Generator().manual_seed(seed)
    n = cfg.image_seq_length
    tok = lambda k: torch.randint(10, cfg.text.vocab_size, (k,), generator=g)
    img = lambda tiles: torch.full((tiles * n,), cfg.image_token_id)
    row0 = torch.cat([tok(5), img(1), tok(7 + 2 * n)])
    row1 = torch.cat([tok(2), img(3), tok(10)])
    assert row0.numel() == row1.numel()
    pixel_values = torch.randn(4, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    return torch.stack([row0, row1]), pixel_values


def write_vit_folder(folder):
    """A standalone InternViT folder (InternVisionModel names, no prefix) of the tiny preset; returns the
    model whose vision tower it holds."""
    import json

    from safetensors.torch import save_file

    from nativevl import VisionLanguageModel
    from nativevl.io import keymap
    from nativevl.io.hf_config import config_to_internvl

    model = VisionLanguageModel(preset("tiny"))
    sd = {k.removeprefix("vision_model."): v.contiguous() for k, v in keymap.to_internvl(model.state_dict()).items()
          if k.startswith("vision_model.")}
    folder.mkdir()
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config_to_internvl(preset("tiny"))["vision_config"]))
    return model


def run_two_ranks(fn, *args) -> None:
    """fn(rank, *args) in 2 spawned processes joined in a gloo process group (on a free local port), which
    fn's processes are inside and which is ended when fn returns or raises."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_in_group, args=(port, fn, args), nprocs=2)


def _in_group(rank: int, port: int, fn, args) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()
