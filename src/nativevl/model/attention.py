"""The one place that runs attention.

Every attention call in nativevl goes through `attention()`. It takes

- padded batches: q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D), an optional `key_padding_mask` (B, Tk)
  (True = real token) that covers cached keys as well as new ones;
- packed batches: B == 1 and `cu_seqlens` (S+1,) int, the document boundaries over the packed
  tokens; no token attends across a boundary.

Causal attention aligns the last query with the last key, so a cached decode step (Tq < Tk) works
without extra arguments. Backends:
- "sdpa": torch's scaled_dot_product_attention with a boolean block-diagonal causal mask (the CPU
  default; O(T^2) mask memory for a packed batch);
- "eager": explicit softmax, the reference the tests compare against;
- "varlen": torch.nn.attention.varlen.varlen_attn over cu_seqlens (CUDA, bf16/fp16; causality
  through window_size=(-1, 0), since torch 2.11's varlen_attn has no is_causal);
- "flex": flex_attention with a document-causal BlockMask built from cu_seqlens (compiled on CUDA;
  eager and forward-only on the CPU).
varlen and flex only change how *packed* batches run; an unmasked batch (the ViT's tiles) and a padded
or cached batch go through sdpa, which already picks a flash kernel when there is no mask.

A packed forward calls `documents()` once and hands the result to every layer as `cu_seqlens`, so
that the longest document (a host sync) and the BlockMask are computed once, not once per layer.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "eager", "varlen", "flex")

try:  # torch >= 2.11; looked up once here so that compiled blocks see plain constants
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    _VARLEN_GQA = "enable_gqa" in inspect.signature(_varlen_attn).parameters  # torch 2.11 lacks it
except ImportError:
    _varlen_attn, _VARLEN_GQA = None, False


def resolve_backend(name: str, device: torch.device) -> str:
    """"auto" -> varlen on CUDA, sdpa elsewhere; a CUDA-only kernel on another device is an error."""
    if name == "auto":
        return "varlen" if device.type == "cuda" else "sdpa"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: auto, {', '.join(BACKENDS)}")
    if name == "varlen" and device.type != "cuda":
        raise ValueError(f"the varlen backend runs on CUDA only, not on {device.type}; use sdpa or flex")
    return name


@dataclass(frozen=True)
class Documents:
    """cu_seqlens (S+1,) int32 with what the kernels need, prepared once per packed forward."""

    cu_seqlens: torch.Tensor
    max_seqlen: int
    block_mask: object | None = None  # flex BlockMask (causal, within documents)


def documents(cu_seqlens: torch.Tensor | Documents, total: int, backend: str) -> Documents:
    """Validate cu_seqlens against the packed length and prepare it for `backend`."""
    if isinstance(cu_seqlens, Documents):
        return cu_seqlens
    doc = document_ids(cu_seqlens, total)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    cu = cu_seqlens.to(torch.int32)
    block_mask = None
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def doc_causal(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

        block_mask = create_block_mask(doc_causal, None, None, total, total, device=cu_seqlens.device)
    return Documents(cu, int(lengths.max()), block_mask)


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _varlen(q, k, v, docs: Documents, scale: float) -> torch.Tensor:
    """q (1, Hq, T, D), k/v (1, Hkv, T, D) -> (1, Hq, T, D) with varlen_attn's (T, H, D) layout."""
    if _varlen_attn is None:
        raise ValueError(f"the varlen backend needs torch >= 2.11 (torch.nn.attention.varlen), this is {torch.__version__}")
    if v.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the varlen backend needs bf16 or fp16 activations, got {v.dtype}; use autocast or bf16 weights")
    q, k = q.to(v.dtype), k.to(v.dtype)  # under autocast, RoPE in fp32 promotes q and k
    groups = q.shape[1] // k.shape[1]
    extra = {}
    if groups > 1 and _VARLEN_GQA:
        extra["enable_gqa"] = True
    elif groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    qt, kt, vt = (x[0].transpose(0, 1).contiguous() for x in (q, k, v))  # (T, H, D)
    cu = docs.cu_seqlens.to(q.device, torch.int32)
    out = _varlen_attn(qt, kt, vt, cu, cu, docs.max_seqlen, docs.max_seqlen, scale=scale, window_size=(-1, 0), **extra)
    return out.transpose(0, 1)[None]  # (1, Hq, T, D)


def _flex(q, k, v, docs: Documents, scale: float) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    if q.dtype != v.dtype:
        q, k = q.to(v.dtype), k.to(v.dtype)
    # compiled on CUDA (inside a compiled block it already is); the CPU path runs eagerly, forward only
    kernel = _compiled_flex() if q.is_cuda and not torch.compiler.is_compiling() else flex_attention
    return kernel(q, k, v, block_mask=docs.block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


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
    cu_seqlens: torch.Tensor | Documents | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D) -> (B, Hq, Tq, D).

    cu_seqlens may be a tensor or the `Documents` a packed forward prepared once."""
    batch, n_q_heads, q_len, head_dim = q.shape
    n_kv_heads, k_len = k.shape[1], k.shape[2]
    if n_q_heads % n_kv_heads:
        raise ValueError(f"{n_q_heads} query heads is not a multiple of {n_kv_heads} key/value heads")
    if cu_seqlens is not None and batch != 1:
        raise ValueError(f"a packed batch (cu_seqlens given) must have batch size 1, got {batch}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; known: {BACKENDS}")
    scale = head_dim**-0.5 if scale is None else scale
    if backend in ("varlen", "flex"):
        if cu_seqlens is not None and causal and q_len == k_len and key_padding_mask is None:
            docs = documents(cu_seqlens, k_len, backend)
            if backend == "flex" and docs.block_mask is None:
                docs = documents(docs.cu_seqlens, k_len, backend)
            return (_varlen if backend == "varlen" else _flex)(q, k, v, docs, scale)
        backend = "sdpa"  # unmasked, padded or cached batches: sdpa's own kernels
    if isinstance(cu_seqlens, Documents):
        cu_seqlens = cu_seqlens.cu_seqlens
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


DECODE_BACKENDS = ("sdpa", "split")


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                     scale: float | None = None, backend: str = "sdpa") -> torch.Tensor:
    """One new query per row against a fixed key window, for a static-shape decode step.

    q (B, Hq, D); k/v (B, Hkv, L, D), typically a view of a preallocated cache (not copied, not
    expanded to Hq heads); bias (B, L) additive in q's dtype (0 = attend, -inf = masked), built once
    per step and shared by all layers. -> (B, Hq, D).

    "sdpa": GQA without repeat_interleave: the Hq // Hkv query heads of one key/value head become that
    head's query rows, q (B, Hkv, G, D) against k (B, Hkv, L, D), one sdpa call with no causal mask
    (query head h reads key/value head h // G, as repeat_interleave orders them).
    "split": the Triton split-key kernel (`decode_kernel`), the keys of each query head cut into
    splits that run in parallel; CUDA only (or Triton's CPU interpreter).
    """
    batch, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    if n_q_heads % n_kv_heads:
        raise ValueError(f"{n_q_heads} query heads is not a multiple of {n_kv_heads} key/value heads")
    scale = head_dim**-0.5 if scale is None else scale
    if backend == "split":
        from nativevl.model import decode_kernel

        return decode_kernel.split_decode_attention(q, k, v, bias, scale)
    if backend != "sdpa":
        raise ValueError(f"unknown decode attention backend {backend!r}; known: {DECODE_BACKENDS}")
    qg = q.reshape(batch, n_kv_heads, n_q_heads // n_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=bias[:, None, None, :], scale=scale)
    return out.reshape(batch, n_q_heads, head_dim)
