"""Losses as pure functions of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def weighted_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    normalizer: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """sum_t w_t * CE(logits_t, labels_t) / normalizer.

    logits (..., V), labels (...) with IGNORE_INDEX where there is no target, weights (...) (0 there).
    `normalizer` defaults to sum(w); pass the sum over all data-parallel ranks (and accumulation
    steps) for InternVL's global square averaging.
    """
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="none",
                         ignore_index=IGNORE_INDEX)  # (N,)
    w = weights.reshape(-1).to(ce.dtype)
    if normalizer is None:
        normalizer = w.sum()
    return (ce * w).sum() / normalizer
