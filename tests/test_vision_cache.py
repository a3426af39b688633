"""The engine's vision cache: an image already seen (by key) does not run through the ViT again, and the answers
are those of the engine without the cache; bounded by bytes, least recently used out, cleared with new weights."""

from __future__ import annotations

import pytest
import torch
from conftest import image_batch
from test_model import make_model

from nativevl.infer.engine import Engine, SamplingParams
from nativevl.infer.generate import generate
from nativevl.infer.vision_cache import VisionCache, derived_key, file_key, image_key


def vit_calls(model) -> list[int]:
    """Tiles of every ViT run on `model` from now on."""
    calls: list[int] = []
    real = model.encode_images
    model.encode_images = lambda pv: calls.append(pv.shape[0]) or real(pv)
    return calls


def greedy(model, engine, ids, pixels, n=10) -> list[int]:
    out = generate(model, torch.tensor([ids]), pixels, max_new_tokens=n, eos_token_id=sorted(engine.eos_ids))
    new = out[0, len(ids):].tolist()
    return new[: next((i for i, t in enumerate(new) if t in engine.eos_ids), len(new))]


def two_image_prompt(cfg, g: torch.Generator) -> list[int]:
    """text, a 3-tile image, text, a 1-tile image, text."""
    tok = lambda k: torch.randint(10, cfg.text.vocab_size, (k,), generator=g).tolist()
    span = lambda tiles: [cfg.image_token_id] * (tiles * cfg.image_seq_length)
    return tok(3) + span(3) + tok(4) + span(1) + tok(5)


def test_a_cached_image_skips_the_vit_and_answers_the_same(tokenizer):
    model = make_model()
    cfg = model.config
    ids, pv = image_batch(cfg)
    one, three = pv[:1], pv[1:]  # a 1-tile and a 3-tile image
    plain = Engine(model, tokenizer, max_batch_size=4, max_seq_len=512, vision_cache_mb=0)
    engine = Engine(model, tokenizer, max_batch_size=4, max_seq_len=512)
    calls = vit_calls(model)
    params = SamplingParams(max_tokens=10)
    row = ids[1].tolist()
    first = engine.generate([row], params, [three], )[0][0].token_ids
    assert calls == [3] and first == greedy(model, engine, row, three)
    del calls[:]
    # the same image asked again (by its key): no ViT run, the same answer as the engine without a cache
    req = engine.submit(row, params, three, image_keys=["B"], tiles_per_image=[3])
    while not req.done:
        engine.step()
    assert calls == [3]  # keyed the first time: features made and kept
    again = engine.submit(row, params, three, image_keys=["B"], tiles_per_image=[3])
    while not again.done:
        engine.step()
    assert calls == [3] and again.result()[0].token_ids == req.result()[0].token_ids == first
    assert again.timings["images_cached"] == 1 and engine.vision_cache.hits == 1
    # two images, one of them cached: the ViT runs on the other's one tile only; n samples share the lookup
    prompt = two_image_prompt(cfg, torch.Generator().manual_seed(1))
    both = torch.cat([three, one])
    mixed = engine.submit(prompt, SamplingParams(max_tokens=10, n=2), both, image_keys=["B", "A"],
                          tiles_per_image=[3, 1])
    while not mixed.done:
        engine.step()
    assert calls == [3, 1] and mixed.timings["images_cached"] == 1
    want = plain.generate([prompt], SamplingParams(max_tokens=10, n=2), [both])[0]
    assert [c.token_ids for c in mixed.result()] == [c.token_ids for c in want]
    # keys that do not match the tiles are refused at submit, naming the mismatch
    with pytest.raises(ValueError, match="do not match the 4 tiles"):
        engine.submit(prompt, params, both, image_keys=["B"], tiles_per_image=[3])


def test_new_weights_clear_the_cache(tokenizer):
    model = make_model()
    ids, pv = image_batch(model.config)
    row, three = ids[1].tolist(), pv[1:]
    engine = Engine(model, tokenizer, max_batch_size=2, max_seq_len=512)
    params = SamplingParams(max_tokens=8, ignore_eos=True)

    def ask():
        req = engine.submit(row, params, three, image_keys=["B"], tiles_per_image=[3])
        while not req.done:
            engine.step()
        return req.result()[0].token_ids

    before = ask()
    with torch.no_grad():
        for p in model.vision_tower.parameters():
            p.mul_(-1.0)
    engine.refresh_weights()
    assert len(engine.vision_cache) == 0
    after = ask()
    assert after == greedy(model, engine, row, three, 8) and after != before


def test_the_budget_is_bytes_least_recently_used_out():
    feats = lambda v: torch.full((4, 8), float(v))  # 128 bytes each
    cache = VisionCache(max_bytes=300)
    encoded: list[int] = []

    def encode(pv):
        encoded.append(pv.shape[0])
        return torch.cat([feats(v) for v in pv[:, 0, 0, 0].tolist()])  # each tile -> 4 rows of its value

    tiles = lambda *vs: torch.tensor(vs, dtype=torch.float32).view(-1, 1, 1, 1)
    out, hits = cache.features(["a", "b"], [1, 1], tiles(1, 2), encode)
    assert hits == 0 and encoded == [2] and torch.equal(out, torch.cat([feats(1), feats(2)])) and cache.bytes == 256
    cache.features(["a"], [1], tiles(1), encode)  # a is now the most recently used
    out, hits = cache.features(["c", "a"], [1, 1], tiles(3, 1), encode)  # c in: b (least recent) out
    assert hits == 1 and encoded == [2, 1] and torch.equal(out, torch.cat([feats(3), feats(1)]))
    assert cache.bytes == 256 and len(cache) == 2
    _, hits = cache.features(["b"], [1], tiles(2), encode)
    assert hits == 0 and encoded == [2, 1, 1]
    # one image bigger than the whole budget is encoded and not kept
    big = VisionCache(max_bytes=100)
    big.features(["x"], [1], tiles(5), encode)
    assert len(big) == 0 and big.bytes == 0
    # a key given again for another number of tiles is not a hit: encoded, and it replaces the entry
    roomy = VisionCache(max_bytes=10_000)
    roomy.features(["k"], [1], tiles(7), encode)
    out, hits = roomy.features(["k"], [2], tiles(8, 9), encode)
    assert hits == 0 and torch.equal(out, torch.cat([feats(8), feats(9)])) and roomy.bytes == 256
    assert roomy.features(["k"], [2], tiles(0, 0), encode)[1] == 1
    with pytest.raises(ValueError, match="budget"):
        VisionCache(-1)


def test_keys_name_the_bytes_and_the_tiling(tmp_path):
    assert image_key(b"png", "image", 12, 448) == image_key(b"png", "image", 12, 448)
    assert image_key(b"png", "image", 12, 448) != image_key(b"png", "image", 6, 448)
    assert image_key(b"png", "image", 12, 448) != image_key(b"jpg", "image", 12, 448)
    f = tmp_path / "x.png"
    f.write_bytes(b"one")
    k = file_key(f, "image", 12)
    assert file_key(f, "image", 12) == k
    f.write_bytes(b"three")  # written again: another size (and time): another key
    assert file_key(f, "image", 12) != k
    base = image_key(b"mp4")  # a video's frames: keys derived from the file's, one per frame
    assert derived_key(base, "video", 8, 0) != derived_key(base, "video", 8, 1) == derived_key(base, "video", 8, 1)
    assert derived_key(base, "video", 8, 0) != derived_key(image_key(b"mkv"), "video", 8, 0)
