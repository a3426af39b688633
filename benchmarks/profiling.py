"""GPU time per kernel kind for one call under torch.profiler, and where the GPU sat idle and what the
host was doing meanwhile; shared by the benchmarks."""

from __future__ import annotations

import bisect
import gzip
import itertools
import json
import os
import re
import tempfile
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


def profile_call(fn: Callable[[], object], device: torch.device, label: str = "one step",
                 trace: str | None = None, stack: bool = False) -> dict:
    """Run fn() once under the profiler: wall time, the GPU kernels' summed time (busy) and how many
    kernels ran (CUDA-graph nodes included: a replayed graph still runs every kernel, but launches
    them without the host), per kind and the busiest kernels, printed and returned. Busy well below
    wall means the GPU waited on the host (launches, syncs, Python): on CUDA, `idle_gaps` says where
    (with `stack`, down to this project's Python lines, at some cost to the profiled wall time).
    `trace`: also keep the profiler's Chrome trace there, gzipped."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with profile(activities=acts, with_stack=stack) as prof:
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
    out = {"wall_ms": wall * 1e3, "gpu_busy_ms": busy, "kernels": kernels_run, "kinds_ms": kinds,
           "top_kernels": kernels[:30]}
    if cuda or trace:
        try:
            out["idle"] = trace_idle(prof, trace)
            print_idle(out["idle"])
        except Exception as e:  # noqa: BLE001 - the kernel breakdown above still counts
            print(f"    idle-time analysis failed: {type(e).__name__}: {e}")
    return out


# ---------------------------------------------------------------- where the GPU waited
#
# From the profiler's Chrome trace (Kineto's categories): GPU activity is "kernel", "gpu_memcpy" and
# "gpu_memset" events; the host's are "cpu_op", "user_annotation", "python_function" (with_stack) and
# the CUDA "cuda_runtime" / "cuda_driver" calls, which share a "correlation" id with what they launched
# (every kernel of a replayed CUDA graph carries its cudaGraphLaunch's). Host events of one thread nest.

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATS = ("cpu_op", "user_annotation", "python_function", "cuda_runtime", "cuda_driver")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize")
PROJECT_FRAMES = ("nativevl/", "benchmarks/")
MAX_TRACE_MIB = 15


class _HostThread:
    """One host thread's events as a nesting tree: which events were open at a given time."""

    def __init__(self, events: list[dict]) -> None:
        self.events = sorted(events, key=lambda e: (e["ts"], -e["dur"]))
        self.starts = [e["ts"] for e in self.events]
        self.parent = []
        open_: list[int] = []
        for i, e in enumerate(self.events):
            while open_ and _end(self.events[open_[-1]]) < e["ts"]:
                open_.pop()
            self.parent.append(open_[-1] if open_ else -1)
            open_.append(i)

    def open_at(self, t: float) -> list[dict]:
        """The events open at time t, innermost first (an event open at t that started before the
        last one to start is, by nesting, one of its ancestors)."""
        i = bisect.bisect_right(self.starts, t) - 1
        out = []
        while i >= 0:
            e = self.events[i]
            if e["ts"] <= t <= _end(e):
                out.append(e)
            i = self.parent[i]
        return out


def _end(e: dict) -> float:
    return e["ts"] + e.get("dur", 0.0)


def _where(open_events: list[dict]) -> str:
    """What the host was in: the innermost frame of this project's code (with_stack traces) and the two
    innermost operators (outer > inner)."""
    frame = next((e["name"] for e in open_events if e.get("cat") == "python_function"
                  and any(p in e["name"] for p in PROJECT_FRAMES) and "profiling.py" not in e["name"]), None)
    ops = [e["name"] for e in open_events if e.get("cat") in ("cpu_op", "user_annotation")][:2]
    where = " > ".join(reversed(ops)) or "no operator"
    if frame:
        where = f"{frame.rsplit('/', 1)[-1]}: {where}"
    return where


def idle_gaps(events: list[dict], top: int = 12) -> dict:
    """The profiled window's GPU idle time (no kernel, copy or memset running), each gap put in a class
    and a place: `sync` (a host synchronisation was waiting when the GPU ran dry: the GPU then waits
    for the host to launch again; the place is where the host synchronised), `launch` (the host was
    slower than the GPU: the place is where it launched the next work), `graph` (between two nodes of
    one CUDA-graph replay: device-side launch gaps, no host involved), `head` / `tail` (before the
    first or after the last GPU work). Times in ms."""
    xs = [e for e in events if e.get("ph") == "X" and isinstance(e.get("ts"), (int, float))]
    gpu = sorted((e for e in xs if e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    host = [e for e in xs if e.get("cat") in HOST_CATS]
    if not gpu:
        return {"gpu_events": 0}
    timed = [e for e in host if e.get("cat") != "python_function"] + gpu
    start, stop = min(e["ts"] for e in timed), max(_end(e) for e in timed)
    threads = {}
    for e in host:
        threads.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    threads = {k: _HostThread(v) for k, v in threads.items()}
    launches = {}
    for e in host:
        corr = (e.get("args") or {}).get("correlation")
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and corr is not None:
            launches[corr] = e
    syncs = sorted((e for e in host if e.get("name") in SYNC_CALLS), key=_end)
    sync_ends = [_end(e) for e in syncs]

    def place(e: dict, t: float) -> str:
        return _where(threads[(e.get("pid"), e.get("tid"))].open_at(t))

    # the GPU's busy intervals (all streams merged), each with its first and last event
    busy: list[list] = []
    for e in gpu:
        if busy and e["ts"] <= busy[-1][1]:
            if _end(e) > busy[-1][1]:
                busy[-1][1], busy[-1][3] = _end(e), e
        else:
            busy.append([e["ts"], _end(e), e, e])
    gaps = [(start, busy[0][0], None, busy[0][2])]
    gaps += [(a[1], b[0], a[3], b[2]) for a, b in itertools.pairwise(busy)]
    gaps.append((busy[-1][1], stop, busy[-1][3], None))
    classes = {k: 0.0 for k in ("sync", "launch", "graph", "head", "tail")}
    groups: dict[tuple[str, str], list] = {}
    for a, b, before, after in gaps:
        us = b - a
        if us <= 0:
            continue
        launch = launches.get(((after or {}).get("args") or {}).get("correlation"))
        if after is None:
            kind, where = "tail", "after the last GPU work"
        elif before is None:
            kind, where = "head", place(launch, launch["ts"]) if launch else "before the first GPU work"
        elif (launch is not None and "GraphLaunch" in launch.get("name", "")
              and (before.get("args") or {}).get("correlation") == (after.get("args") or {}).get("correlation")):
            kind, where = "graph", "inside a CUDA graph replay"
        else:
            i = bisect.bisect_left(sync_ends, a - 1.0)  # the first sync that returned once the GPU was idle
            sync = syncs[i] if i < len(syncs) and syncs[i]["ts"] <= a + 1.0 and sync_ends[i] <= b + 1.0 else None
            if sync is not None:
                kind, where = "sync", place(sync, sync["ts"])
            else:
                kind, where = "launch", place(launch, launch["ts"]) if launch else "a launch not in the trace"
        classes[kind] += us
        g = groups.setdefault((kind, where), [0.0, 0, 0.0])
        g[0], g[1], g[2] = g[0] + us, g[1] + 1, max(g[2], us)
    busy_us = sum(b - a for a, b, *_ in busy)
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "window_ms": (stop - start) / 1e3,
        "gpu_busy_ms": busy_us / 1e3,
        "idle_ms": sum(classes.values()) / 1e3,
        "idle_by_class_ms": {k: v / 1e3 for k, v in classes.items()},
        "host_syncs": len(syncs),
        "gaps": [{"class": k, "where": w, "ms": g[0] / 1e3, "count": g[1], "max_ms": g[2] / 1e3}
                 for (k, w), g in ranked],
    }


def print_idle(idle: dict) -> None:
    if not idle.get("gpu_events", 1):
        print("    idle: no GPU activity in the trace")
        return
    c = idle["idle_by_class_ms"]
    print(f"  GPU idle {idle['idle_ms']:.2f} ms of a {idle['window_ms']:.2f} ms window ({idle['host_syncs']} host syncs): "
          f"after syncs {c['sync']:.2f}, host-bound launches {c['launch']:.2f}, inside CUDA graphs {c['graph']:.2f}, "
          f"before the first / after the last GPU work {c['head']:.2f} / {c['tail']:.2f}")
    for g in idle["gaps"]:
        print(f"    {g['ms']:8.2f} ms  x{g['count']:<5d} max {g['max_ms']:7.3f}  {g['class']:6s} {g['where'][:110]}")


def trace_idle(prof, save_as: str | None = None) -> dict:
    """idle_gaps of a finished profile (through its Chrome trace); save_as keeps the trace, gzipped
    (written before it is read, so that a trace this code cannot parse is still kept)."""
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path, "rb") as f:
            raw = f.read()
    finally:
        os.unlink(path)
    kept = None
    if save_as:
        with gzip.open(save_as, "wb", compresslevel=6) as f:
            f.write(raw)
        mib = os.path.getsize(save_as) / 2**20
        if mib > MAX_TRACE_MIB:  # a device run returns files up to 16 MiB: a larger one would only crowd out the rest
            os.unlink(save_as)
            print(f"    trace not kept: {mib:.1f} MiB gzipped, over {MAX_TRACE_MIB} MiB")
        else:
            kept = save_as
            print(f"    trace written to {save_as} ({mib:.1f} MiB; chrome://tracing or perfetto)")
    idle = idle_gaps(json.loads(raw)["traceEvents"])
    if kept:
        idle["trace"] = kept
    return idle


def trace_name(folder: str, stem: str) -> str:
    """A trace's path: letters, digits, '.', '_' and '-' only (what a device run returns)."""
    return os.path.join(folder, re.sub(r"[^A-Za-z0-9._-]", "_", stem) + ".json.gz")


def write_json(path: str, payload) -> None:
    """Written whole through a temporary file: a run killed while writing leaves the last complete one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
