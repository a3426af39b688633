"""GPU time per kernel kind for one call under torch.profiler, shared by the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

KERNEL_KINDS = (  # first match wins; lower-case substrings of CUDA kernel names
    ("attention", ("flash", "fmha", "attention")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "norm_kernel", "lpnorm")),
    ("matmul", ("gemm", "gemv", "sm90", "sm80", "cutlass", "xmma", "cublas", "nvjet", "matmul", "splitk", "conv")),
    ("cross-entropy", ("softmax", "nll", "log_softmax", "cross_entropy")),
    ("copy / cast", ("copy", "cast", "memcpy", "memset", "fill", "cat", "index", "scatter", "gather", "embedding")),
    ("elementwise (triton)", ("triton",)),
)


def profile_call(fn: Callable[[], object], device: torch.device, label: str = "one step") -> dict:
    """Run fn() once under the profiler: wall time, the GPU kernels' summed time (busy) and how many
    kernels ran (CUDA-graph nodes included: a replayed graph still runs every kernel, but launches
    them without the host), per kind and the busiest kernels, printed and returned. Busy well below
    wall means the GPU waited on the host (launches, syncs, Python)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        fn()
        sync()
    wall = time.perf_counter() - t0
    kinds: dict[str, float] = {}
    kernels = []
    kernels_run = 0
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0.0)
        if not us or (cuda and str(getattr(e, "device_type", "")).split(".")[-1] != "CUDA"):
            continue
        name = e.key.lower()
        kind = next((k for k, subs in KERNEL_KINDS if any(x in name for x in subs)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + us / 1e3
        kernels.append((us / 1e3, e.count, e.key[:90]))
        kernels_run += e.count
    kernels.sort(reverse=True)
    busy = sum(kinds.values())
    print(f"  profile: {label}, {wall * 1e3:.1f} ms wall (profiled), GPU kernels {busy:.1f} ms in {kernels_run} kernels")
    for k, ms in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"    {k:22s} {ms:8.2f} ms  {ms / max(busy, 1e-9):6.1%}")
    for ms, n, name in kernels[:15]:
        print(f"    {ms:8.2f} ms  x{n:<5d} {name}")
    return {"wall_ms": wall * 1e3, "gpu_busy_ms": busy, "kernels": kernels_run, "kinds_ms": kinds,
            "top_kernels": kernels[:30]}
