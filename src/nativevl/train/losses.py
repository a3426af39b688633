"""Losses as pure functions of tensors."""

from __future__ import annotations

from dataclasses import dataclass

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


# ---------------------------------------------------------------- preference optimisation (MPO)
#
# Pair losses take *log-ratios*: log pi_theta(y|x) - log pi_0(y|x), each a sum over the response's
# tokens, one entry per pair. They return per-pair losses; the caller averages over the global batch.


def _token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.t()).float()  # (chunk, V)
    return -F.cross_entropy(logits, labels, reduction="none")  # (chunk,)


def sequence_logps(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    cu_seqlens: torch.Tensor,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Sum of log p(label) over each document's labelled positions -> (S,) float32.

    hidden (T, C) and labels (T,) of a packed batch (labels already shifted: the target at each
    position); logits exist only at labelled positions, a chunk at a time, recomputed in backward.
    """
    y = labels.reshape(-1)
    keep = (y != IGNORE_INDEX).nonzero().squeeze(1)
    doc = torch.bucketize(keep, cu_seqlens[1:].to(keep.device), right=True)  # document of each kept position
    h, y = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep), y.index_select(0, keep)
    parts = []
    for start in range(0, y.numel(), chunk_size):
        sl = slice(start, start + chunk_size)
        parts.append(torch.utils.checkpoint.checkpoint(_token_logps, h[sl], lm_head_weight, y[sl], use_reentrant=False))
    token_logps = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    out = hidden.new_zeros(cu_seqlens.numel() - 1, dtype=torch.float32)
    return out.index_add(0, doc, token_logps)


def dpo_sigmoid(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO: -log sigmoid(beta * (chosen - rejected)) per pair."""
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))


def bco_pair(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float, delta: float) -> torch.Tensor:
    """BCO (pair form) with reward shift delta: -log s(beta*c - delta) - log s(-(beta*r - delta)) per pair."""
    return -F.logsigmoid(beta * chosen_logratios - delta) - F.logsigmoid(-(beta * rejected_logratios - delta))


@dataclass
class RewardShift:
    """BCO's delta: the running mean of the batch-mean reward beta * log-ratio (chosen and rejected
    together), one observation per data-parallel rank and micro-batch. The state is saved in
    checkpoints so a resumed run continues with the same delta."""

    mean: float = 0.0
    count: float = 0.0

    def update(self, batch_mean: float, observations: int = 1) -> float:
        """Fold in `observations` batch means whose average is `batch_mean`; returns the new delta."""
        total = self.count + observations
        self.mean += (batch_mean - self.mean) * observations / total
        self.count = total
        return self.mean

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.count = float(state["mean"]), float(state["count"])


@dataclass(frozen=True)
class MPOWeights:
    preference: float = 0.8  # w_p: DPO sigmoid
    quality: float = 0.2  # w_q: BCO pair
    generation: float = 1.0  # w_g: SFT NLL on the chosen response
    beta: float = 0.1


def mpo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    nll: torch.Tensor,
    delta: float,
    weights: MPOWeights,
    pair_normalizer: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """w_p * DPO + w_q * BCO + w_g * NLL. The pair losses are summed and divided by `pair_normalizer`
    (default: the number of pairs; pass the global count under accumulation / data parallelism);
    `nll` is already normalised (the token mean over chosen responses). Returns (total, parts)."""
    n = chosen_logratios.numel() if pair_normalizer is None else pair_normalizer
    parts = {
        "dpo": dpo_sigmoid(chosen_logratios, rejected_logratios, weights.beta).sum() / n,
        "bco": bco_pair(chosen_logratios, rejected_logratios, weights.beta, delta).sum() / n,
        "nll": nll,
    }
    total = weights.preference * parts["dpo"] + weights.quality * parts["bco"] + weights.generation * parts["nll"]
    return total, parts
