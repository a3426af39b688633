"""The Triton split-key decode attention (`decode_attention(..., backend="split")`) against sdpa:
on the CPU under Triton's interpreter (a subprocess with TRITON_INTERPRET=1, which must be set
before Triton is imported), and on CUDA when there is one (marked gpu)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nativevl.config import preset
from nativevl.infer.engine import Engine
from nativevl.model import decode_kernel
from nativevl.model.attention import decode_attention
from nativevl.model.vlm import VisionLanguageModel

SRC = Path(__file__).resolve().parents[1] / "src"

# shapes: (batch, query heads, key/value heads, head dim, window, cache length): InternVL3-1B's GQA
# 14:2 at batch 1, MHA, a head dim that is not a power of two, one key/value head for all
SHAPES = [(1, 14, 2, 64, 640, 1024), (3, 4, 2, 16, 48, 64), (2, 6, 6, 40, 200, 256), (4, 8, 1, 32, 320, 512)]


def make_inputs(batch, n_q, n_kv, head_dim, window, cache, dtype, device="cpu", seed=0):
    """q and k/v views [:batch, :, :window] of a larger cache (strided, as the engine's), and a bias
    that lets each row see keys [0, length] with lengths from 0 (only the new key) to the window's end."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_q, head_dim, generator=g).to(device, dtype)
    k = torch.randn(batch + 2, n_kv, cache, head_dim, generator=g).to(device, dtype)[:batch, :, :window]
    v = torch.randn(batch + 2, n_kv, cache, head_dim, generator=g).to(device, dtype)[:batch, :, :window]
    lengths = torch.randint(0, window, (batch,), generator=g)
    lengths[0] = 0
    lengths[-1] = window - 1
    valid = torch.arange(window)[None] <= lengths[:, None]
    bias = torch.zeros(batch, window).masked_fill(~valid, float("-inf")).to(device, dtype)
    return q, k, v, bias


INTERPRETED = textwrap.dedent(
    """
    import torch
    from test_decode_kernel import SHAPES, make_inputs
    from nativevl.model import decode_kernel
    from nativevl.model.attention import decode_attention

    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for shape in SHAPES:
            q, k, v, bias = make_inputs(*shape, dtype)
            want = decode_attention(q, k, v, bias)
            got = decode_attention(q, k, v, bias, backend="split")
            assert got.dtype == dtype and got.shape == q.shape, (got.dtype, got.shape)
            err = (got.float() - want.float()).abs().max().item()
            splits = decode_kernel.plan_splits(shape[0] * shape[1], shape[4], decode_kernel._target_programs(q.device))[1]
            print(dtype, shape, "splits", splits, "max abs diff", err)
            assert err < tol, (dtype, shape, err)

    # a row that sees no key gives zeros, as sdpa does (the engine never makes one)
    q, k, v, bias = make_inputs(*SHAPES[1], torch.float32)
    bias[1] = float("-inf")
    got = decode_attention(q, k, v, bias, backend="split")
    assert torch.equal(got[1], torch.zeros_like(got[1])) and torch.equal(decode_attention(q, k, v, bias)[1], got[1])

    # a compiled step calls the custom op as one opaque kernel pair
    step = torch.compile(lambda q, k, v, b: decode_attention(q, k, v, b, backend="split") * 2, fullgraph=True)
    q, k, v, bias = make_inputs(*SHAPES[0], torch.float32)
    assert torch.allclose(step(q, k, v, bias), decode_attention(q, k, v, bias) * 2, atol=1e-5)
    print("compiled: ok")

    # the engine's fused decode step with each kernel: the same greedy tokens, single steps and chunks
    from nativevl.config import preset
    from nativevl.infer.engine import Engine, SamplingParams
    from nativevl.model.vlm import VisionLanguageModel

    torch.manual_seed(0)
    model = VisionLanguageModel(preset("tiny")).eval()  # token ids from 10: the image token (5) needs pixels
    prompts = [[10 + (7 * i + j) % 400 for j in range(n)] for i, n in enumerate((3, 40, 97))]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    want = [c[0].token_ids for c in Engine(model, None, max_batch_size=4, max_seq_len=160).generate(prompts, params)]
    for chunk in (1, 4):
        engine = Engine(model, None, max_batch_size=4, max_seq_len=160, decode_attention="split", decode_chunk=chunk)
        got = [c[0].token_ids for c in engine.generate(prompts, params)]
        assert got == want, (chunk, got, want)
        assert engine.decode_mode.endswith("+split"), engine.decode_mode
    print("engine: ok")
    """
)


def test_split_kernel_matches_sdpa_under_the_triton_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SRC), str(Path(__file__).parent)])}
    proc = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "compiled: ok" in proc.stdout and "engine: ok" in proc.stdout
    assert "splits 5" in proc.stdout  # the 1B shape ran in several splits, masked ones among them


def test_split_plan_covers_the_window_in_whole_blocks():
    for rows, length, target in [(14, 640, 264), (448, 640, 264), (1, 16, 264), (14, 4096, 264), (3, 1000, 64)]:
        split_len, n = decode_kernel.plan_splits(rows, length, target)
        assert split_len % decode_kernel.BLOCK_N == 0
        assert (n - 1) * split_len < length <= n * split_len  # no empty split, every key in one
        assert rows * n >= target or split_len == decode_kernel.BLOCK_N  # parallel enough, or as split as it gets
    assert decode_kernel.plan_splits(14, 640, 264) == (64, 10)  # InternVL3-1B at batch 1 on a 132-SM GPU


def test_split_kernel_choice_is_checked():
    model = VisionLanguageModel(preset("tiny"))
    with pytest.raises(ValueError, match="unknown decode_attention 'flash'"):
        Engine(model, None, max_seq_len=64, decode_attention="flash")
    with pytest.raises(ValueError, match="needs fused_decode"):
        Engine(model, None, max_seq_len=64, decode_attention="split", fused_decode=False)
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        with pytest.raises(ValueError, match="CUDA|triton"):
            Engine(model, None, max_seq_len=64, decode_attention="split")
    with pytest.raises(ValueError, match="unknown decode attention backend"):
        decode_attention(*make_inputs(*SHAPES[1], torch.float32), backend="flash")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", SHAPES + [(32, 14, 2, 64, 768, 1024), (1, 14, 2, 64, 4096, 4096)])
def test_split_kernel_matches_sdpa_on_cuda(shape):
    q, k, v, bias = make_inputs(*shape, torch.bfloat16, device="cuda")
    want = decode_attention(q.float(), k.float(), v.float(), bias.float())
    got = decode_attention(q, k, v, bias, backend="split")
    sdpa = decode_attention(q, k, v, bias)
    assert got.dtype == torch.bfloat16
    # within bf16's rounding of the float32 answer, as sdpa's own bf16 kernel is
    assert (got.float() - want).abs().max() <= max(2 * (sdpa.float() - want).abs().max().item(), 1e-2)


@pytest.mark.parametrize("arch", [90, 80])
def test_split_kernels_compile_for_the_gpu(arch):
    """Triton's own compiler (no GPU needed) takes both kernels to a cubin for Hopper and Ampere, in
    bf16 at InternVL3's head dim: what the interpreter tolerates but the GPU compiler rejects fails here."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ints = ["n_q_heads", "group", "length", "split_len", "sq_b", "sq_h", "sk_b", "sk_h", "sk_l", "sv_b", "sv_h",
            "sv_l", "sb_b"]
    split_sig = {**{p: "*bf16" for p in ("q_ptr", "k_ptr", "v_ptr", "bias_ptr")},
                 **{p: "*fp32" for p in ("acc_ptr", "m_ptr", "l_ptr")}, **dict.fromkeys(ints, "i32"), "scale": "fp32",
                 **dict.fromkeys(("HEAD_DIM", "BLOCK_D", "BLOCK"), "constexpr")}
    combine_sig = {"acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "out_ptr": "*bf16", "n_splits": "i32",
                   **dict.fromkeys(("HEAD_DIM", "BLOCK_D", "BLOCK_S"), "constexpr")}
    target = GPUTarget("cuda", arch, 32)
    for head_dim in (64, 128):
        split = triton.compile(ASTSource(decode_kernel._split_kernel, split_sig,
                                         {"HEAD_DIM": head_dim, "BLOCK_D": head_dim, "BLOCK": decode_kernel.BLOCK_N}),
                               target=target)
        combine = triton.compile(ASTSource(decode_kernel._combine_kernel, combine_sig,
                                           {"HEAD_DIM": head_dim, "BLOCK_D": head_dim, "BLOCK_S": 16}), target=target)
        assert split.asm["cubin"] and combine.asm["cubin"]
