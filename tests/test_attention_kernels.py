"""Packed-attention kernels (varlen, flex) agree with sdpa's block-diagonal causal mask; the model
gives the same hidden states with each. CUDA tests are marked gpu and skipped without a GPU."""

from __future__ import annotations

import warnings

import pytest
import torch

from nativevl.config import preset
from nativevl.model.attention import attention, resolve_backend
from nativevl.model.vlm import VisionLanguageModel

CUDA = torch.cuda.is_available()


def packed(device, dtype, heads=(8, 2), dim=64, lengths=(17, 300, 1, 190), seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(1, heads[0], total, dim, generator=g).to(device, dtype)
    k = torch.randn(1, heads[1], total, dim, generator=g).to(device, dtype)
    v = torch.randn(1, heads[1], total, dim, generator=g).to(device, dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)
    return q, k, v, cu


def test_flex_forward_matches_sdpa_on_the_cpu():
    q, k, v, cu = packed("cpu", torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention warns when it runs uncompiled
        flex = attention(q, k, v, causal=True, cu_seqlens=cu, backend="flex")
    ref = attention(q, k, v, causal=True, cu_seqlens=cu, backend="sdpa")
    assert (flex - ref).abs().max().item() < 1e-5


def test_unpacked_batches_fall_back_to_sdpa():
    q, k, v, _ = packed("cpu", torch.float32)
    for backend in ("flex", "varlen"):  # dense (the ViT) and padded inputs never need a CUDA kernel
        assert torch.equal(attention(q, k, v, causal=False, backend=backend), attention(q, k, v, causal=False))


def test_backend_choice_is_checked():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "varlen"
    with pytest.raises(ValueError, match="CUDA only"):
        resolve_backend("varlen", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash9", torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend", ["varlen", "flex"])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)])
def test_cuda_kernels_match_sdpa_forward_and_backward(backend, heads):
    q, k, v, cu = packed("cuda", torch.bfloat16, heads=heads)
    grads = {}
    for name in (backend, "sdpa"):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = attention(*leaves, causal=True, cu_seqlens=cu, backend=name)
        (out.float() * torch.linspace(-1, 1, out.shape[-1], device="cuda")).sum().backward()
        grads[name] = (out.detach().float(), *[t.grad.float() for t in leaves])
    for a, b in zip(grads[backend], grads["sdpa"]):
        assert (a - b).abs().max().item() < 2e-2 * max(1.0, b.abs().max().item()), backend


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend", ["varlen", "flex"])
def test_packed_model_agrees_across_backends_on_cuda(backend):
    torch.manual_seed(0)
    model = VisionLanguageModel(preset("tiny")).cuda()
    model.init_weights()
    ids = torch.randint(10, 500, (200,), device="cuda")
    cu = torch.tensor([0, 64, 150, 200], device="cuda")
    out = {}
    for name in ("sdpa", backend):
        model.attn_backend = name
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out[name] = model(input_ids=ids, cu_seqlens=cu, compute_logits=False).hidden_states.float()
    assert (out[backend] - out["sdpa"]).abs().max().item() < 5e-2
