"""Losses as pure functions of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

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


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.t()).float()  # (chunk, V)
    return (F.cross_entropy(logits, labels, reduction="none") * weights).sum()


def labelled_lm_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    normalizer: torch.Tensor | float | None = None,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """The weighted cross-entropy of `weighted_cross_entropy`, with logits computed only at labelled
    positions, `chunk_size` rows at a time and recomputed in backward, so the (tokens x vocab) matrix
    never exists. hidden (..., C), labels / weights (...)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    w = weights.reshape(-1).float()
    keep = (y != IGNORE_INDEX).nonzero().squeeze(1)
    h, y, w = h.index_select(0, keep), y.index_select(0, keep), w.index_select(0, keep)
    if normalizer is None:
        normalizer = w.sum()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, y.numel(), chunk_size):
        sl = slice(start, start + chunk_size)
        total = total + torch.utils.checkpoint.checkpoint(
            _chunk_loss, h[sl], lm_head_weight, y[sl], w[sl], use_reentrant=False
        )
    return total / normalizer
