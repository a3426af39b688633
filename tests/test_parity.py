"""Parity with transformers' InternVLForConditionalGeneration on tiny random weights.

Our loader reads the folder transformers itself saved; float32 logits must agree within 1e-4.
"""

from __future__ import annotations

import pytest
import torch
from conftest import hf_model, image_batch, tiny_config
from safetensors.torch import save_file

from nativevl import VisionLanguageModel
from nativevl.infer.generate import generate
from nativevl.io.hf_config import config_to_hf

VARIANTS = [("layer_norm", False), ("layer_norm", True), ("rms_norm", False), ("rms_norm", True)]


@pytest.fixture(scope="module", params=VARIANTS, ids=[f"{v}-{'tied' if t else 'untied'}" for v, t in VARIANTS])
def pair(request, tmp_path_factory):
    variant, tied = request.param
    cfg = tiny_config(variant, tied)
    hf = hf_model(cfg, seed=VARIANTS.index(request.param))
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(folder)
    ours = VisionLanguageModel.from_pretrained(folder)
    return cfg, hf, ours, folder


def test_logits_match_transformers(pair):
    cfg, hf, ours, _ = pair
    assert ours.config == cfg
    input_ids, pixel_values = image_batch(cfg)
    with torch.no_grad():
        ref = hf(input_ids=input_ids, pixel_values=pixel_values, attention_mask=torch.ones_like(input_ids)).logits
        got = ours(input_ids=input_ids, pixel_values=pixel_values).logits
    assert got.shape == ref.shape == (2, input_ids.shape[1], cfg.text.vocab_size)
    assert (got - ref).abs().max().item() < 1e-4


def test_left_padded_batch_matches_transformers(pair):
    cfg, hf, ours, _ = pair
    input_ids, pixel_values = image_batch(cfg)
    input_ids = input_ids.clone()
    mask = torch.ones_like(input_ids)
    mask[0, :3] = 0  # left padding on row 0 (text only, so the image tokens stay)
    input_ids[0, :3] = cfg.text.pad_token_id
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=input_ids, pixel_values=pixel_values, attention_mask=mask, position_ids=position_ids).logits
        got = ours(input_ids=input_ids, pixel_values=pixel_values, attention_mask=mask).logits
    valid = mask.bool()
    assert (got[valid] - ref[valid]).abs().max().item() < 1e-4


def test_in_memory_key_names_load(pair, tmp_path):
    """A folder holding transformers' in-memory names (model.vision_tower..., lm_head) loads too."""
    cfg, hf, ours, folder = pair
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight")
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    again = VisionLanguageModel.from_pretrained(tmp_path)
    for key, value in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_greedy_generation_matches_transformers(pair):
    cfg, hf, ours, _ = pair
    input_ids, pixel_values = image_batch(cfg)
    input_ids, pixel_values = input_ids[1:], pixel_values[1:]  # the 3-tile row
    never = cfg.text.vocab_size + 7  # no end token: both must produce all 32 tokens
    with torch.no_grad():
        ref = hf.generate(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=never,
            pad_token_id=0,
        )
    got = generate(ours, input_ids, pixel_values, max_new_tokens=32, eos_token_id=never)
    assert got.shape == (1, input_ids.shape[1] + 32)
    assert torch.equal(got, ref)


def test_vision_position_interpolation_matches_transformers(pair):
    """A tile of another size interpolates the learned position grid (bicubic) exactly as transformers does."""
    cfg, hf, ours, _ = pair
    side = cfg.vision.image_size + 2 * cfg.vision.patch_size
    pixel_values = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf.model.vision_tower(pixel_values=pixel_values).last_hidden_state
        got = ours.vision_tower(pixel_values)
    assert (got - ref).abs().max().item() < 1e-4


def test_param_names_and_count_match_transformers(pair):
    cfg, hf, ours, _ = pair
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    assert n_ours == n_hf
    assert config_to_hf(cfg)["tie_word_embeddings"] == cfg.tie_word_embeddings


def test_llama_style_decoder_matches_transformers(tmp_path):
    """The InternLM3 (InternVL3-9B) variant: llama-style decoder without q/k/v bias."""
    import dataclasses

    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, model_type="llama", attention_bias=False))
    hf = hf_model(cfg, seed=5)
    assert type(hf.model.language_model).__name__ == "LlamaModel"
    hf.save_pretrained(tmp_path)
    ours = VisionLanguageModel.from_pretrained(tmp_path)
    assert ours.config == cfg
    input_ids, pixel_values = image_batch(cfg)
    with torch.no_grad():
        ref = hf(input_ids=input_ids, pixel_values=pixel_values, attention_mask=torch.ones_like(input_ids)).logits
        got = ours(input_ids=input_ids, pixel_values=pixel_values).logits
    assert (got - ref).abs().max().item() < 1e-4


def test_dynamic_rope_beyond_trained_length_matches_transformers(tmp_path):
    import dataclasses

    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, max_position_embeddings=16))
    hf = hf_model(cfg, seed=6)
    hf.save_pretrained(tmp_path)
    ours = VisionLanguageModel.from_pretrained(tmp_path)
    input_ids, pixel_values = image_batch(cfg)  # 24 tokens > 16
    with torch.no_grad():
        ref = hf(input_ids=input_ids, pixel_values=pixel_values, attention_mask=torch.ones_like(input_ids)).logits
        got = ours(input_ids=input_ids, pixel_values=pixel_values).logits
        plain = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, rope_type="default"))
        unscaled = VisionLanguageModel(plain)
        unscaled.load_state_dict(ours.state_dict())
        other = unscaled.eval()(input_ids=input_ids, pixel_values=pixel_values).logits
    assert (got - ref).abs().max().item() < 1e-4
    assert (other - ref).abs().max().item() > 1e-3  # the scaling is really exercised


@pytest.mark.parametrize("size", [(800, 600), (1920, 1080), (100, 100), (300, 1000)])
def test_tiles_match_transformers_pil_image_processor(size):
    """Dynamic tiling + thumbnail + normalisation equal GotOcr2ImageProcessorPil (the -hf checkpoints' processor)."""
    import numpy as np
    from oracle import GotOcr2ImageProcessorPil
    from PIL import Image

    from nativevl.data.images import IMAGENET_MEAN, IMAGENET_STD, image_to_tiles

    w, h = size
    image = Image.fromarray(np.random.default_rng(w).integers(0, 255, (h, w, 3), dtype=np.uint8))
    processor = GotOcr2ImageProcessorPil(
        size={"height": 448, "width": 448},
        image_mean=IMAGENET_MEAN.tolist(),
        image_std=IMAGENET_STD.tolist(),
        crop_to_patches=True,
        max_patches=12,
    )
    ref = processor(images=image, return_tensors="pt")["pixel_values"]
    got = image_to_tiles(image)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-6
