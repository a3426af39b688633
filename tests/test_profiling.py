"""benchmarks/profiling.py: where the GPU sat idle in a profiled call, and what the host was doing."""

import gzip
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import profiling


def X(cat, name, ts, dur, tid=1, corr=None):
    e = {"ph": "X", "cat": cat, "name": name, "pid": 0 if cat in profiling.GPU_CATS else 1, "tid": tid,
         "ts": float(ts), "dur": float(dur), "args": {}}
    if corr is not None:
        e["args"]["correlation"] = corr
    return e


def synthetic_trace():
    """A host thread that launches a kernel, waits on it (nonzero), launches late, replays a CUDA graph
    and synchronises at the end; times in microseconds."""
    return [
        {"ph": "X", "cat": "Trace", "name": "whole profile", "pid": 1, "tid": 1, "ts": -50.0, "dur": 500.0},
        X("python_function", "src/nativevl/train/losses.py(53): labelled_lm_loss", 0, 200),
        X("cpu_op", "aten::mm", 1, 10),
        X("cuda_runtime", "cudaLaunchKernel", 2, 2, corr=1),
        X("kernel", "gemm", 5, 100, tid=7, corr=1),
        X("cpu_op", "aten::nonzero", 20, 92),
        X("cuda_runtime", "cudaStreamSynchronize", 22, 85),  # returns at 107, once the gemm ended (105)
        X("cpu_op", "aten::index_select", 125, 15),
        X("cuda_runtime", "cudaLaunchKernel", 130, 2, corr=2),
        X("kernel", "index", 135, 15, tid=7, corr=2),
        X("python_function", "benchmarks/decode.py(10): step", 200, 100),
        X("cpu_op", "aten::add", 205, 10),
        X("cuda_runtime", "cudaLaunchKernel", 210, 1, corr=3),
        X("kernel", "add", 212, 2, tid=7, corr=3),
        X("cpu_op", "CUDAGraph::replay", 218, 7),
        X("cuda_driver", "cudaGraphLaunch", 220, 5, corr=4),
        X("kernel", "graph node 1", 240, 10, tid=7, corr=4),
        X("kernel", "graph node 2", 253, 7, tid=7, corr=4),
        X("cpu_op", "aten::mul", 226, 2),
        X("cuda_runtime", "cudaLaunchKernel", 226.5, 1, corr=5),
        X("kernel", "mul on another stream", 255, 15, tid=8, corr=5),  # overlaps node 2: one busy interval
        X("cuda_runtime", "cudaDeviceSynchronize", 275, 15),
    ]


def test_idle_gaps_classifies_each_gap_and_names_the_host_code():
    idle = profiling.idle_gaps(synthetic_trace())
    assert idle["window_ms"] == pytest.approx(0.289)  # 1 .. 290: host operators and GPU work, not Python frames
    assert idle["gpu_busy_ms"] == pytest.approx(0.144)  # 100 + 15 + 2 + 10 + 17 (two streams merged)
    assert idle["idle_ms"] == pytest.approx(0.145)
    assert idle["idle_by_class_ms"] == pytest.approx(
        {"head": 0.004, "sync": 0.030, "launch": 0.088, "graph": 0.003, "tail": 0.020})
    assert idle["host_syncs"] == 2
    gaps = {(g["class"], g["where"]): (g["ms"], g["count"]) for g in idle["gaps"]}
    assert gaps == pytest.approx({
        ("launch", "decode.py(10): step: aten::add"): (0.062, 1),
        ("sync", "losses.py(53): labelled_lm_loss: aten::nonzero"): (0.030, 1),
        ("launch", "decode.py(10): step: CUDAGraph::replay"): (0.026, 1),
        ("tail", "after the last GPU work"): (0.020, 1),
        ("head", "losses.py(53): labelled_lm_loss: aten::mm"): (0.004, 1),
        ("graph", "inside a CUDA graph replay"): (0.003, 1),
    })
    assert [g["ms"] for g in idle["gaps"]] == sorted((g["ms"] for g in idle["gaps"]), reverse=True)


def test_idle_gaps_without_gpu_work():
    assert profiling.idle_gaps([X("cpu_op", "aten::mm", 0, 5)]) == {"gpu_events": 0}


def test_profile_call_on_the_cpu_keeps_its_trace_and_nests_real_host_events(tmp_path, capsys):
    x = torch.randn(32, 32)
    path = tmp_path / "step.json.gz"
    out = profiling.profile_call(lambda: float((x @ x).sum()), torch.device("cpu"), trace=str(path), stack=True)
    assert out["idle"] == {"gpu_events": 0, "trace": str(path)}
    with gzip.open(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    host = [e for e in events if e.get("ph") == "X" and e.get("cat") in profiling.HOST_CATS]
    assert any(e["cat"] == "python_function" for e in host)
    dense = next(e for e in host if e["name"] == "aten::_local_scalar_dense")
    thread = profiling._HostThread([e for e in host if e["tid"] == dense["tid"]])
    assert profiling._where(thread.open_at(dense["ts"] + dense["dur"] / 2)) == "aten::item > aten::_local_scalar_dense"
    assert "trace written to" in capsys.readouterr().out


def test_host_thread_open_at_skips_operators_that_already_ended():
    thread = profiling._HostThread([X("cpu_op", "A", 0, 100), X("cpu_op", "B", 10, 10), X("cpu_op", "C", 30, 10),
                                    X("cpu_op", "D", 30, 5)])
    assert [e["name"] for e in thread.open_at(50)] == ["A"]
    assert [e["name"] for e in thread.open_at(37)] == ["C", "A"]
    assert [e["name"] for e in thread.open_at(32)] == ["D", "C", "A"]
    assert thread.open_at(150) == []
