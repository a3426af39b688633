"""LoRA adapters for nn.Linear layers (or QLoRA's NF4 ones), and merging them back into plain weights for export."""

from __future__ import annotations

import math

import torch
from torch import nn

from nativevl.train.qlora import NF4Linear


class LoRALinear(nn.Module):
    """y = base(x) + dropout(x) A^T B^T * (alpha / rank). The base (nn.Linear, or NF4Linear for QLoRA) is
    frozen; B starts at 0."""

    def __init__(self, base: nn.Linear | NF4Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        device, dtype = (base.device, base.dtype) if isinstance(base, NF4Linear) else (base.weight.device, base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding W + scale * B A (W dequantized for an NF4 base: the weights it trained with),
        in the adapter's precision when the base is kept in less (a bf16 frozen base under fp32 adapters)."""
        base = self.base.to_linear() if isinstance(self.base, NF4Linear) else self.base
        dtype = torch.promote_types(base.weight.dtype, self.lora_A.dtype)
        with torch.no_grad():
            for p in base.parameters():
                p.data = p.data.to(dtype)
            base.weight += (self.lora_B @ self.lora_A).to(dtype) * self.scale
        return base


LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VIT_TARGETS = ("q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2")
MLP_TARGETS = ("linear_1", "linear_2")


def add_lora(module: nn.Module, targets: tuple[str, ...], rank: int, alpha: float, dropout: float) -> int:
    """Wrap every nn.Linear (or NF4Linear) child named in `targets` (recursively); returns how many were wrapped."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, (nn.Linear, NF4Linear)) and name in targets:
            setattr(module, name, LoRALinear(child, rank, alpha, dropout))
            count += 1
        else:
            count += add_lora(child, targets, rank, alpha, dropout)
    return count


def merge_lora(module: nn.Module) -> int:
    """Replace every LoRALinear by its merged nn.Linear, in place; returns how many were merged."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, LoRALinear):
            setattr(module, name, child.merged())
            count += 1
        else:
            count += merge_lora(child)
    return count
