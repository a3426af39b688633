"""Model behaviour users rely on: cache == full forward, packed == unpacked, backends agree, clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import image_batch, tiny_config

from nativevl import VisionLanguageModel
from nativevl.model.attention import attention
from nativevl.model.projector import pixel_shuffle


def make_model(variant: str = "layer_norm", tied: bool = False, seed: int = 0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    model = VisionLanguageModel(tiny_config(variant, tied))
    model.init_weights(std=0.2)
    return model.eval()


@torch.no_grad()
def test_cached_decoding_equals_full_forward():
    model = make_model()
    input_ids, pixel_values = image_batch(model.config)
    full = model(input_ids=input_ids, pixel_values=pixel_values).logits
    split = 30
    out = model(input_ids=input_ids[:, :split], pixel_values=pixel_values, use_cache=True)
    steps = [out.logits]
    cache = out.cache
    for t in range(split, input_ids.shape[1]):
        steps.append(model(input_ids=input_ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    assert cache.seq_len == input_ids.shape[1]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    """Equal up to float32 rounding: the largest difference within `rel` of b's largest magnitude."""
    return (a - b).abs().max().item() <= rel * b.abs().max().item()


@torch.no_grad()
def test_packed_equals_unpacked_with_integer_and_v2pe_positions():
    model = make_model("rms_norm")
    input_ids, pixel_values = image_batch(model.config)
    a, b = input_ids[0, :-6], input_ids[1]  # documents of different lengths
    packed = torch.cat([a, b])
    cu = torch.tensor([0, a.numel(), a.numel() + b.numel()], dtype=torch.int32)
    out = model(input_ids=packed, pixel_values=pixel_values, cu_seqlens=cu).logits  # (T, V)
    sep_a = model(input_ids=a[None], pixel_values=pixel_values[:1]).logits[0]
    sep_b = model(input_ids=b[None], pixel_values=pixel_values[1:]).logits[0]
    assert out.shape == (packed.numel(), model.config.text.vocab_size)
    # float32 rounding: within 1e-5 of the logits' scale (a document seeing the other would be ~1e-2 off)
    assert close(out, torch.cat([sep_a, sep_b]))

    # V2PE: image tokens advance by a fraction; positions restart at 0 in every document
    def v2pe(ids: torch.Tensor, delta: float) -> torch.Tensor:
        step = torch.where(ids == model.config.image_token_id, delta, 1.0)
        return torch.cat([torch.zeros(1), step.cumsum(0)[:-1]])

    pos = torch.cat([v2pe(a, 0.25), v2pe(b, 0.0625)])
    out = model(input_ids=packed, pixel_values=pixel_values, cu_seqlens=cu, position_ids=pos).logits
    sep_a = model(input_ids=a[None], pixel_values=pixel_values[:1], position_ids=v2pe(a, 0.25)[None]).logits[0]
    sep_b = model(input_ids=b[None], pixel_values=pixel_values[1:], position_ids=v2pe(b, 0.0625)[None]).logits[0]
    assert close(out, torch.cat([sep_a, sep_b]))
    integer = model(input_ids=a[None], pixel_values=pixel_values[:1]).logits[0]
    assert (integer - sep_a).abs().max().item() > 1e-3  # fractional positions really change the result


@torch.no_grad()
def test_left_padding_does_not_change_results():
    model = make_model()
    input_ids, pixel_values = image_batch(model.config)
    short = input_ids[1]
    padded = torch.cat([torch.zeros(4, dtype=torch.long), short])[None]
    mask = torch.cat([torch.zeros(4), torch.ones(short.numel())]).long()[None]
    got = model(input_ids=padded, pixel_values=pixel_values[1:], attention_mask=mask).logits[0, 4:]
    ref = model(input_ids=short[None], pixel_values=pixel_values[1:]).logits[0]
    assert (got - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("case", ["dense", "padded", "packed", "cached"])
def test_attention_backends_agree(case):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 8, generator=g)
    k = torch.randn(2, 2, 9, 8, generator=g)
    v = torch.randn(2, 2, 9, 8, generator=g)
    kwargs = {"causal": case != "dense"}
    if case == "padded":
        kwargs["key_padding_mask"] = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9])
    if case == "packed":
        q, k, v = q[:1], k[:1], v[:1]
        kwargs["cu_seqlens"] = torch.tensor([0, 4, 9])
    if case == "cached":
        q = q[:, :, -2:]
    sdpa = attention(q, k, v, backend="sdpa", **kwargs)
    eager = attention(q, k, v, backend="eager", **kwargs)
    assert torch.isfinite(sdpa).all()
    assert (sdpa - eager).abs().max().item() < 1e-5


@torch.no_grad()
def test_packed_documents_past_the_trained_length_take_their_own_dynamic_rope_base():
    """Dynamic RoPE's base came from the pack's longest position: a document next to one past
    max_position_embeddings was rotated with the other's rescaled base."""
    import dataclasses

    cfg = tiny_config()
    assert cfg.text.rope_type == "dynamic"
    model = VisionLanguageModel(dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, max_position_embeddings=16)))
    torch.manual_seed(0)
    model.init_weights(std=0.1)
    model.eval()
    g = torch.Generator().manual_seed(0)
    short, long = torch.randint(10, 500, (8,), generator=g), torch.randint(10, 500, (40,), generator=g)
    packed = model(input_ids=torch.cat([short, long, short]), cu_seqlens=torch.tensor([0, 8, 48, 56])).logits
    alone = [model(input_ids=d[None]).logits[0] for d in (short, long)]
    assert close(packed, torch.cat([alone[0], alone[1], alone[0]]))


def test_misshaped_inputs_are_named():
    model = make_model()
    ids = torch.randint(10, 200, (2, 12))
    with pytest.raises(ValueError, match="one row of documents"):
        model(input_ids=ids, cu_seqlens=torch.tensor([0, 6, 12]))
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(input_ids=ids[0], attention_mask=torch.ones(12, dtype=torch.long))
    size = model.config.vision.image_size
    ids = torch.full((1, model.config.image_seq_length), model.config.image_token_id)
    with pytest.raises(ValueError, match=f"tiles must be {size} x {size} pixels, got \\({2 * size}, {2 * size}\\)"):
        model(input_ids=ids, pixel_values=torch.zeros(1, 3, 2 * size, 2 * size))


def test_packed_attention_never_crosses_documents():
    q = torch.randn(1, 1, 6, 4)
    v = torch.zeros(1, 1, 6, 4)
    v[..., :3, :] = 1.0  # only document 0 carries signal
    out = attention(q, q, v, causal=True, cu_seqlens=torch.tensor([0, 3, 6]))
    assert torch.allclose(out[0, 0, 3:], torch.zeros(3, 4))


def test_pixel_shuffle_v2_order():
    x = torch.arange(4 * 4).float().reshape(1, 4, 4, 1)  # value = row * 4 + col
    y = pixel_shuffle(x, 0.5)  # (1, 2, 2, 4)
    assert y.shape == (1, 2, 2, 4)
    # token (i, j) = [x(2i,2j), x(2i,2j+1), x(2i+1,2j), x(2i+1,2j+1)] in v2 order
    assert y[0, 0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]
    assert y[0, 1, 0].tolist() == [8.0, 9.0, 12.0, 13.0]
    assert y[0, 1, 1].tolist() == [10.0, 11.0, 14.0, 15.0]


def test_image_token_mismatch_names_both_counts():
    model = make_model()
    input_ids, pixel_values = image_batch(model.config)
    with pytest.raises(ValueError, match=r"hold 16 image tokens but pixel_values give 12 image features"):
        model(input_ids=input_ids, pixel_values=pixel_values[:3])
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=input_ids)


def test_tied_head_shares_the_embedding():
    model = make_model(tied=True)
    assert model.lm_head.weight.data_ptr() == model.language_model.embed_tokens.weight.data_ptr()


def test_packed_batches_refuse_a_cache():
    model = make_model()
    ids = torch.tensor([7, 8, 9, 10])
    with pytest.raises(ValueError, match="cannot use a KV cache"):
        model(input_ids=ids, cu_seqlens=torch.tensor([0, 2, 4]), use_cache=True)


def test_drop_path_rate_is_a_tensor_so_compiled_vit_layers_share_graphs():
    """A rate rising over the layers must not make torch.compile guard (and recompile) per layer."""
    from torch._dynamo.utils import counters

    from nativevl.config import preset
    from nativevl.model.vision import VisionModel

    vit = VisionModel(preset("tiny").vision)
    state = set(vit.state_dict())
    layers = list(vit.encoder.layer) * 3  # six calls, six different rates
    for i, layer in enumerate(vit.encoder.layer):
        layer.drop_path_rate = 0.1 + 0.05 * i
    assert set(vit.state_dict()) == state  # the rate is a setting, not a checkpoint key
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    fns = [torch.compile(layer, backend="eager") for layer in vit.encoder.layer]
    x = torch.randn(4, 5, vit.config.hidden_size)
    vit.train()
    for i, _ in enumerate(layers):
        vit.encoder.layer[i % 2].drop_path_rate = 0.05 * (i + 1)
        fns[i % 2](x, "sdpa")
    assert counters["stats"]["unique_graphs"] - before <= 2
    torch.manual_seed(0)
    layer = vit.encoder.layer[0]
    layer.drop_path_rate = 0.5
    y = torch.ones(4000, 1, 1)
    from nativevl.model.vision import drop_path

    out = drop_path(y, layer._drop_path_rate)
    assert set(out.unique().tolist()) <= {0.0, 2.0} and abs(out.mean().item() - 1.0) < 0.1
