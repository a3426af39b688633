"""Plain generation: cached greedy == uncached argmax, sampling is reproducible, ends and padding behave."""

from __future__ import annotations

import torch
from conftest import image_batch
from test_model import make_model

from nativevl.infer.generate import generate, sample_next


@torch.no_grad()
def test_cached_greedy_equals_uncached_argmax():
    model = make_model()
    input_ids, pixel_values = image_batch(model.config)
    out = generate(model, input_ids, pixel_values, max_new_tokens=12, eos_token_id=[])
    seq = input_ids
    for _ in range(12):
        nxt = model(input_ids=seq, pixel_values=pixel_values).logits[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    assert torch.equal(out, seq)


@torch.no_grad()
def test_left_padded_batch_generates_like_single_rows():
    model = make_model(seed=1)
    input_ids, pixel_values = image_batch(model.config)
    short = input_ids[0, :-6]  # drops trailing text only; keeps the 1-tile image
    padded = torch.stack([torch.cat([torch.zeros(6, dtype=torch.long), short]), input_ids[1]])
    mask = torch.ones_like(padded)
    mask[0, :6] = 0
    both = generate(model, padded, pixel_values, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    one = generate(model, short[None], pixel_values[:1], max_new_tokens=8, eos_token_id=[])
    two = generate(model, input_ids[1:], pixel_values[1:], max_new_tokens=8, eos_token_id=[])
    assert torch.equal(both[0, 6:], one[0])
    assert torch.equal(both[1], two[0])


@torch.no_grad()
def test_end_token_stops_and_pads():
    model = make_model(seed=2)
    input_ids, pixel_values = image_batch(model.config)
    free = generate(model, input_ids, pixel_values, max_new_tokens=6, eos_token_id=[])
    first = int(free[0, input_ids.shape[1]])  # make row 0's first token the end token
    out = generate(model, input_ids, pixel_values, max_new_tokens=6, eos_token_id=first, pad_token_id=0)
    new = out[:, input_ids.shape[1]:]
    assert new[0, 0] == first and (new[0, 1:] == 0).all()
    if first not in free[1, input_ids.shape[1]:].tolist():
        assert torch.equal(new[1], free[1, input_ids.shape[1]:])


def test_sampling_is_seeded_and_filters():
    logits = torch.tensor([[0.0, 3.0, 2.9, -5.0]]).repeat(64, 1)
    a = sample_next(logits, do_sample=True, temperature=1.0, generator=torch.Generator().manual_seed(0))
    b = sample_next(logits, do_sample=True, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert set(a.tolist()) > {1}  # really samples
    top1 = sample_next(logits, do_sample=True, top_k=1, generator=torch.Generator().manual_seed(1))
    assert (top1 == 1).all()
    nucleus = sample_next(logits, do_sample=True, top_p=0.6, generator=torch.Generator().manual_seed(1))
    assert set(nucleus.tolist()) <= {1, 2}
    assert (sample_next(logits, do_sample=False) == 1).all()


def test_right_padding_is_refused():
    import pytest

    model = make_model()
    ids = torch.tensor([[7, 8, 9], [7, 8, 0]])
    with pytest.raises(ValueError, match="left padding"):
        generate(model, ids, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]), max_new_tokens=2)


def test_a_generated_image_token_is_text_and_embeds_with_pixels_is_an_error():
    """transformers feeds a generated token by its embedding: an <IMG_CONTEXT> the model itself produces
    is no image slot (ours raised 'no pixel_values were given'). inputs_embeds with pixel_values dropped
    the image silently."""
    import pytest

    model = make_model()
    cfg = model.config
    bias = torch.zeros(cfg.text.vocab_size)
    bias[cfg.image_token_id] = 1e4  # the model answers with the image token, again and again
    orig = model.lm_head.forward
    model.lm_head.forward = lambda x: orig(x) + bias.to(x.dtype)
    out = generate(model, torch.tensor([[11, 12, 13]]), None, max_new_tokens=3, eos_token_id=[cfg.text.eos_token_id])
    assert out[0, 3:].tolist() == [cfg.image_token_id] * 3
    ids, pixel_values = image_batch(cfg)
    with pytest.raises(ValueError, match="pixel_values go with input_ids"):
        model(inputs_embeds=model.language_model.embed_tokens(ids), pixel_values=pixel_values)
