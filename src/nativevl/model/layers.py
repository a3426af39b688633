"""Small building blocks shared by the vision and text towers."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, scaled in the input dtype (as Qwen2 and InternViT-6B do)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def make_norm(norm_type: str, hidden_size: int, eps: float) -> nn.Module:
    if norm_type == "layer_norm":
        return nn.LayerNorm(hidden_size, eps=eps)
    if norm_type == "rms_norm":
        return RMSNorm(hidden_size, eps=eps)
    raise ValueError(f"unknown norm_type {norm_type!r}")


def activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "silu":
        return nn.SiLU()
    raise ValueError(f"unsupported activation {name!r} (gelu, silu)")
