"""Pixel shuffle (InternVL's v2 order) and the mlp1 projector."""

from __future__ import annotations

import torch
from torch import nn

from nativevl.config import ModelConfig
from nativevl.model.layers import activation


def pixel_shuffle(x: torch.Tensor, downsample_ratio: float) -> torch.Tensor:
    """(N, rows, cols, C) -> (N, rows*r, cols*r, C/r^2), r = downsample_ratio.

    Output token (i, j) concatenates, along channels, the inputs (2i, 2j), (2i, 2j+1), (2i+1, 2j),
    (2i+1, 2j+1) for r = 0.5: InternVL's ps_version v2, which the released weights expect.
    """
    n, rows, cols, c = x.shape
    k = round(1 / downsample_ratio)
    if rows % k or cols % k:
        raise ValueError(f"feature grid {rows}x{cols} is not divisible by 1/downsample_ratio = {k}")
    x = x.reshape(n, rows, cols // k, c * k)  # merge column groups into channels
    x = x.permute(0, 2, 1, 3)  # (N, cols/k, rows, C*k)
    x = x.reshape(n, cols // k, rows // k, c * k * k)  # merge row groups
    return x.permute(0, 2, 1, 3).contiguous()  # (N, rows/k, cols/k, C*k*k)


class Projector(nn.Module):
    """mlp1: LayerNorm(C*4) -> Linear -> GELU -> Linear."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c_in, c_out = config.projector_in_features, config.text.hidden_size
        self.layer_norm = nn.LayerNorm(c_in)
        self.linear_1 = nn.Linear(c_in, c_out)
        self.act = activation(config.projector_hidden_act)
        self.linear_2 = nn.Linear(c_out, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.layer_norm(x))))
