"""AdamW parameter groups (per module learning rate, no decay on biases / norms / layer scale) and
the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

NO_DECAY_SUFFIXES = ("bias", "lambda_1", "lambda_2", "cls_token", "position_embeddings")


def _no_decay(model: nn.Module) -> set[int]:
    ids = set()
    for mod_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if name.endswith(NO_DECAY_SUFFIXES) or "norm" in mod_name.split(".")[-1]:
                ids.add(id(p))
    return ids


def build_optimizer(
    model: nn.Module,
    params_by_module: dict[str, list[nn.Parameter]],
    lrs: dict[str, float],
    *,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
) -> torch.optim.AdamW:
    """One group per (module, decay) pair; fused AdamW when every parameter is on CUDA."""
    no_decay = _no_decay(model)
    groups = []
    for name, params in params_by_module.items():
        for decay in (True, False):
            ps = [p for p in params if (id(p) not in no_decay) == decay]
            if ps:
                groups.append({"params": ps, "lr": lrs[name], "base_lr": lrs[name], "module": name,
                               "weight_decay": weight_decay if decay else 0.0})
    if not groups:
        raise ValueError("nothing to train: every module is frozen")
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, betas=betas, eps=eps, fused=fused or None)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warmup from 0 to 1 over warmup_steps, then cosine from 1 down to min_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
