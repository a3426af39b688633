"""Split-key ("flash-decoding") attention for one new query per row, in Triton.

At batch 1 the decode step's attention has one query per head and a few hundred to a few thousand
keys. sdpa's kernels give each (row, key/value head) one thread block that walks every key: 2 blocks
for InternVL3-1B's 2 key/value heads, on a GPU with 132 SMs. Here the keys of each query head are cut
into splits that run in parallel (about two programs per SM in all), each leaving an unnormalised
partial output with its running max and sum, and a second kernel combines the splits with the usual
log-sum-exp rescaling. The arithmetic runs in float32 whatever the input dtype.

`attention.decode_attention(..., backend="split")` is the entry point. The op is registered as a
torch custom op, so a compiled decode step calls it as one opaque kernel pair and a CUDA graph
captures it. It runs on CUDA, or on the CPU under Triton's interpreter (`TRITON_INTERPRET=1`, set
before Triton is imported), which is how the CPU tests check it against sdpa.
"""

from __future__ import annotations

import contextlib
import os
from functools import cache

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the sdpa backend needs none of this
    triton = None

BLOCK_N = 64  # keys per inner iteration of a split
TARGET_PROGRAMS_PER_SM = 2


def available(device: torch.device) -> str | None:
    """None if the split kernel can run on `device`, else why not."""
    if triton is None:
        return "the split decode-attention kernel needs the triton package (pip install triton)"
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if device.type != "cuda" and not interpreted:
        return (f"the split decode-attention kernel runs on CUDA (or on the CPU under TRITON_INTERPRET=1), "
                f"not on {device.type}; use the sdpa decode attention")
    return None


if triton is not None:

    @triton.jit
    def _split_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, acc_ptr, m_ptr, l_ptr,
                      n_q_heads, group, length, split_len, scale,
                      sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sb_b,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)  # b * n_q_heads + h
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        b = (row // n_q_heads).to(tl.int64)  # 64-bit offsets: a layer's cache may pass 2**31 elements
        h = row % n_q_heads
        kvh = h // group  # query head h reads key/value head h // group, as repeat_interleave orders them
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(q_ptr + b * sq_b + h * sq_h + d, mask=d_ok, other=0.0).to(tl.float32) * scale  # (D,)
        start = split * split_len
        end = tl.minimum(start + split_len, length)
        offs = tl.arange(0, BLOCK)
        m_i = tl.full([1], float("-inf"), tl.float32)
        l_i = tl.zeros([1], tl.float32)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for n0 in range(start, end, BLOCK):
            n = n0 + offs
            n_ok = n < end
            kv_ok = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + b * sk_b + kvh * sk_h + n[:, None] * sk_l + d[None, :], mask=kv_ok, other=0.0)
            s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)  # (BLOCK,)
            s += tl.load(bias_ptr + b * sb_b + n, mask=n_ok, other=0.0).to(tl.float32)
            s = tl.where(n_ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a split masked so far adds nothing
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe)
            v = tl.load(v_ptr + b * sv_b + kvh * sv_h + n[:, None] * sv_l + d[None, :], mask=kv_ok, other=0.0)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        slot = row * n_splits + split
        tl.store(acc_ptr + slot * BLOCK_D + d, acc)
        tl.store(m_ptr + slot, tl.max(m_i, axis=0))  # (1,) -> scalar
        tl.store(l_ptr + slot, tl.sum(l_i, axis=0))

    @triton.jit
    def _combine_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, n_splits,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
        row = tl.program_id(0)
        s = tl.arange(0, BLOCK_S)
        s_ok = s < n_splits
        m = tl.load(m_ptr + row * n_splits + s, mask=s_ok, other=float("-inf"))
        l_s = tl.load(l_ptr + row * n_splits + s, mask=s_ok, other=0.0)
        m_max = tl.max(m, axis=0)
        w = tl.exp(m - tl.where(m_max > float("-inf"), m_max, 0.0))  # a fully masked split (m = -inf) weighs 0
        w = tl.where(s_ok & (m > float("-inf")), w, 0.0)
        d = tl.arange(0, BLOCK_D)
        acc = tl.load(acc_ptr + (row * n_splits + s)[:, None] * BLOCK_D + d[None, :], mask=s_ok[:, None], other=0.0)
        denom = tl.sum(l_s * w, axis=0)
        out = tl.sum(acc * w[:, None], axis=0) / tl.where(denom > 0, denom, 1.0)  # a row that sees no key: 0
        tl.store(out_ptr + row.to(tl.int64) * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@cache
def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return TARGET_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return 64  # the interpreter (CPU tests): several splits per head at their small sizes


def plan_splits(rows: int, length: int, target: int) -> tuple[int, int]:
    """(keys per split, number of splits) for `rows` query heads over `length` keys: enough splits
    that rows * splits reaches `target` programs (or one BLOCK_N-key block each), each split a whole
    number of blocks."""
    splits = max(1, -(-target // rows))
    split_len = max(BLOCK_N, length // splits // BLOCK_N * BLOCK_N)
    return split_len, -(-length // split_len)


def _split_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                            scale: float) -> torch.Tensor:
    batch, n_q, head_dim = q.shape
    n_kv, length = k.shape[1], k.shape[2]
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or bias.stride(-1) != 1:
        raise ValueError("split decode attention needs the head dimension (and the bias's keys) contiguous")
    split_len, n_splits = plan_splits(batch * n_q, length, _target_programs(q.device))
    block_d = triton.next_power_of_2(head_dim)
    rows = batch * n_q
    acc = torch.empty(rows, n_splits, block_d, device=q.device, dtype=torch.float32)
    m = torch.empty(rows, n_splits, device=q.device, dtype=torch.float32)
    l_sum = torch.empty(rows, n_splits, device=q.device, dtype=torch.float32)
    out = torch.empty(batch, n_q, head_dim, device=q.device, dtype=q.dtype)
    # Triton launches on the current device: make it q's (a server on cuda:1 does not set it)
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        _split_kernel[(rows, n_splits)](
            q, k, v, bias, acc, m, l_sum, n_q, n_q // n_kv, length, split_len, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            bias.stride(0), HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK=BLOCK_N,
        )
        _combine_kernel[(rows,)](acc, m, l_sum, out, n_splits, HEAD_DIM=head_dim, BLOCK_D=block_d,
                                 BLOCK_S=max(triton.next_power_of_2(n_splits), 2))
    return out


@torch.library.custom_op("nativevl::split_decode_attention", mutates_args=())
def split_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """q (B, Hq, D), k/v (B, Hkv, L, D) (any strides but a contiguous D), bias (B, L) additive
    -> (B, Hq, D) in q's dtype (0 for a row that attends to no key)."""
    if triton is None:
        raise RuntimeError(available(q.device))
    return _split_decode_attention(q, k, v, bias, scale)


@split_decode_attention.register_fake
def _(q, k, v, bias, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
