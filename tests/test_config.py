"""Presets have the published shapes: parameter counts equal transformers' model built from the same config."""

from __future__ import annotations

import pytest
import torch

from nativevl import VisionLanguageModel
from nativevl.config import PRESETS, TextConfig, preset, replace
from nativevl.io.hf_config import config_to_hf

# InternVL3 paper, Table 1 (#Param, rounded to 0.1B; the 8B entry reads 8.1B for 7.94B of weights).
PAPER_BILLIONS = {
    "internvl3_1b": 0.9,
    "internvl3_2b": 1.9,
    "internvl3_8b": 8.1,
    "internvl3_9b": 9.2,
    "internvl3_14b": 15.1,
    "internvl3_38b": 38.4,
    "internvl3_78b": 78.4,
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_count_equals_transformers(name):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    cfg = preset(name)
    with torch.device("meta"):
        ours = VisionLanguageModel(cfg)
        theirs = InternVLForConditionalGeneration(InternVLConfig(**config_to_hf(cfg)))
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert n_ours == n_theirs
    if name in PAPER_BILLIONS:
        assert abs(n_ours / 1e9 - PAPER_BILLIONS[name]) < 0.2


def test_derived_values():
    cfg = preset("internvl3_1b")
    assert cfg.image_seq_length == 256
    assert cfg.projector_in_features == 4096
    assert preset("internvl3_78b").projector_in_features == 12800
    assert cfg.text.head_dim == 64


def test_unknown_keys_and_bad_values_are_errors():
    with pytest.raises(ValueError, match="unknown preset 'internvl3_3b'"):
        preset("internvl3_3b")
    with pytest.raises(ValueError, match=r"unknown TextConfig key\(s\) \['hiden_size'\]"):
        replace(TextConfig(), hiden_size=3)
    with pytest.raises(ValueError, match="not a multiple of num_key_value_heads"):
        TextConfig(num_attention_heads=14, num_key_value_heads=3)
