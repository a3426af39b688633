"""The one place that runs attention.

Every attention call in nativevl goes through `attention()`. It takes

- padded batches: q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D), an optional `key_padding_mask` (B, Tk)
  (True = real token) that covers cached keys as well as new ones;
- packed batches: B == 1 and `cu_seqlens` (S+1,) int, the document boundaries over the packed
  tokens; no token attends across a boundary.

Causal attention aligns the last query with the last key, so a cached decode step (Tq < Tk) works
without extra arguments. Backends: "sdpa" (torch's scaled_dot_product_attention with a boolean
block-diagonal causal mask; the CPU default) and "eager" (explicit softmax, the reference the
tests compare against). CUDA varlen / flex kernels plug in here behind the same signature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "eager")


def document_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Document index of each packed token: (total,) int64."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at the packed length {total}, got {cu_seqlens.tolist()}"
        )
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if bool((lengths < 0).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu_seqlens.tolist()}")
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths.long())


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Integer positions restarting at 0 in every packed document: (total,) float32."""
    doc = document_ids(cu_seqlens, total)
    starts = cu_seqlens[:-1].long()[doc]
    return (torch.arange(total, device=cu_seqlens.device) - starts).float()


def build_mask(
    batch: int,
    q_len: int,
    k_len: int,
    device: torch.device,
    *,
    causal: bool,
    cu_seqlens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean mask (B|1, 1, Tq, Tk), True = may attend; None when every query sees every key."""
    q_abs = torch.arange(q_len, device=device) + (k_len - q_len)  # absolute index of each query
    k_idx = torch.arange(k_len, device=device)
    mask = None
    if causal and q_len > 1:
        mask = k_idx[None, :] <= q_abs[:, None]  # (Tq, Tk)
    if cu_seqlens is not None:
        doc = document_ids(cu_seqlens.to(device), k_len)
        same_doc = doc[q_abs][:, None] == doc[None, :]  # (Tq, Tk)
        mask = same_doc if mask is None else mask & same_doc
    if mask is not None:
        mask = mask[None, None]  # (1, 1, Tq, Tk)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, k_len):
            raise ValueError(
                f"attention_mask has shape {tuple(key_padding_mask.shape)}, expected (batch, keys) = {(batch, k_len)}"
            )
        keep = key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, Tk)
        mask = keep if mask is None else mask & keep
        # A padding query may see no key at all; letting it see itself keeps softmax finite.
        mask = mask | (k_idx[None, :] == q_abs[:, None])[None, None]
    return mask


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    cu_seqlens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D) -> (B, Hq, Tq, D)."""
    batch, n_q_heads, q_len, head_dim = q.shape
    n_kv_heads, k_len = k.shape[1], k.shape[2]
    if n_q_heads % n_kv_heads:
        raise ValueError(f"{n_q_heads} query heads is not a multiple of {n_kv_heads} key/value heads")
    if cu_seqlens is not None and batch != 1:
        raise ValueError(f"a packed batch (cu_seqlens given) must have batch size 1, got {batch}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; known: {BACKENDS}")
    scale = head_dim**-0.5 if scale is None else scale
    mask = build_mask(
        batch, q_len, k_len, q.device, causal=causal, cu_seqlens=cu_seqlens, key_padding_mask=key_padding_mask
    )
    if n_kv_heads != n_q_heads:
        groups = n_q_heads // n_kv_heads
        k = k.repeat_interleave(groups, dim=1)  # (B, Hq, Tk, D)
        v = v.repeat_interleave(groups, dim=1)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, Hq, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), v.float()).to(q.dtype)
