"""Prefix reuse in the engine: a follow-up prompt runs only its new tokens on the keys a finished
sequence left in its slot, and gives the tokens a full prefill gives."""

from __future__ import annotations

import pytest
import torch
from conftest import image_batch
from test_engine import prompts, reference
from test_model import make_model

from nativevl.infer.engine import Engine, SamplingParams
from nativevl.infer.prefix_cache import ImageSpan, PrefixCache, common_prefix, image_spans


@pytest.fixture(scope="module")
def model():
    return make_model()


def engine_of(model, tokenizer, **kw) -> Engine:
    return Engine(model, tokenizer, max_batch_size=4, max_seq_len=512, prefix_min_tokens=4, **kw)


def test_a_follow_up_turn_prefills_only_its_new_tokens(model, tokenizer, caplog):
    caplog.set_level("INFO", logger="nativevl.infer.engine")
    engine = engine_of(model, tokenizer)
    first = prompts(tokenizer)[1]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    answer = engine.generate([first], params)[0][0].token_ids
    assert engine.stats["prefix_hits"] == 0
    follow = first + answer + tokenizer("and what next").input_ids
    got = engine.generate([follow], params)[0][0].token_ids
    assert got == reference(model, engine, follow, 10)
    # the slot held the prompt and the 9 answer tokens fed back (the 10th was never fed)
    assert engine.stats["prefix_hits"] == 1 and engine.stats["prefix_tokens"] == len(first) + 9
    assert f"{len(follow)} prompt ({len(first) + 9} reused) + 10 output tokens" in caplog.text  # the timing log
    # the same prompt again: all but its last token reused (its logits give the first new token)
    again = engine.generate([follow], params)[0][0].token_ids
    assert again == got and engine.stats["prefix_tokens"] == len(first) + 9 + len(follow) - 1
    # a prompt that shares fewer than prefix_min_tokens tokens is prefilled whole
    other = engine.generate([follow[:3] + [t + 1 for t in follow[3:]]], params)[0][0].token_ids
    assert engine.stats["prefix_hits"] == 2
    assert other == reference(model, engine, follow[:3] + [t + 1 for t in follow[3:]], 10)
    # an unrelated prompt on the idle engine takes a bare slot: the conversation's prefix stays kept
    engine.generate([prompts(tokenizer)[2]], params)
    hits, reused = engine.stats["prefix_hits"], engine.stats["prefix_tokens"]
    assert engine.generate([follow], params)[0][0].token_ids == got
    assert engine.stats["prefix_hits"] == hits + 1 and engine.stats["prefix_tokens"] == reused + len(follow) - 1
    off = engine_of(model, tokenizer, prefix_cache=False)
    off.generate([first], params)
    assert off.generate([follow], params)[0][0].token_ids == got and off.stats["prefix_hits"] == 0


def test_an_image_is_reused_only_under_the_same_key(model, tokenizer):
    """A prefix through an image serves a prompt whose image has the same key; with another key (other
    pixels behind the same placeholder tokens) reuse stops at the image, and the new image is encoded."""
    ids, pixel_values = image_batch(model.config)
    row0 = ids[0].tolist()  # 5 text tokens, a 1-tile image, then text
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    for cache_mb in (256, 0):  # with and without the vision cache
        engine = engine_of(model, tokenizer, vision_cache_mb=cache_mb)
        answer = engine.generate([row0], params, [pixel_values[:1]], [["pic-a"]], [[1]])[0][0].token_ids
        follow = row0 + answer + [11, 12, 13]
        same = engine.generate([follow], params, [pixel_values[:1]], [["pic-a"]], [[1]])[0][0].token_ids
        assert same == reference(model, engine, follow, 6, pixel_values[:1])
        assert engine.stats["prefix_tokens"] == len(row0) + 5
        # the same tokens about another picture (key pic-b): only the 5 tokens before the image are reused
        engine.generate([follow], params, [pixel_values[:1]], [["pic-a"]], [[1]])  # kept again, under pic-a
        before = engine.stats["prefix_tokens"]
        other = engine.generate([follow], params, [pixel_values[1:2]], [["pic-b"]], [[1]])[0][0].token_ids
        assert other == reference(model, engine, follow, 6, pixel_values[1:2])
        assert engine.stats["prefix_tokens"] - before == 5
        # a prompt that ends inside its image, asked again: the reuse stops one token short, inside the
        # image, whose features the new token still needs
        ends = row0[:5 + model.config.image_seq_length]
        engine.generate([ends], params, [pixel_values[:1]], [["pic-a"]], [[1]])
        before = engine.stats["prefix_tokens"]
        again = engine.generate([ends], params, [pixel_values[:1]], [["pic-a"]], [[1]])[0][0].token_ids
        assert again == reference(model, engine, ends, 6, pixel_values[:1])
        assert engine.stats["prefix_tokens"] - before == len(ends) - 1
        # pixels without keys are never taken from a prefix, not even after a keyless prompt of the same tokens
        engine.generate([follow], params, [pixel_values[:1]])
        before = engine.stats["prefix_tokens"]
        other = engine.generate([follow], params, [pixel_values[1:2]])[0][0].token_ids
        assert other == reference(model, engine, follow, 6, pixel_values[1:2])
        assert engine.stats["prefix_tokens"] - before == 5


def test_n_samples_and_a_kept_prefix_beside_a_running_sequence(model, tokenizer):
    """A kept prefix in a slot that a running batch spans survives its decode steps (the free row writes
    at the scratch positions), and n samples from a reused prefix are n copies of its keys."""
    engine = engine_of(model, tokenizer)
    short, long = prompts(tokenizer)[1], prompts(tokenizer)[0]
    a = engine.submit(short, SamplingParams(max_tokens=3, ignore_eos=True))  # slot 0: finishes first
    b = engine.submit(long, SamplingParams(max_tokens=30, ignore_eos=True))  # slot 1: decodes 27 more steps over slots [0, 2)
    while not (a.done and b.done):
        engine.step()
    follow = short + a.result()[0].token_ids + tokenizer("go on").input_ids
    two = engine.generate([follow], SamplingParams(max_tokens=8, ignore_eos=True, n=2))[0]
    assert engine.stats["prefix_hits"] == 1 and engine.stats["prefix_tokens"] == len(short) + 2
    assert [c.token_ids for c in two] == [reference(model, engine, follow, 8)] * 2


def test_spans_prefixes_and_the_choice_of_slots():
    prompt = [1, 2, 9, 9, 9, 9, 3, 9, 9, 4]  # image token 9, 2 tokens per tile: a 2-tile image, a 1-tile one
    assert image_spans(prompt, 9, 2, [2, 1], ["a", "b"]) == [ImageSpan(2, 6, "a"), ImageSpan(7, 9, "b")]
    assert image_spans(prompt, 9, 2, None, None) == [ImageSpan(2, 9, None)]  # no keys: one unnamed span
    assert image_spans(prompt, 9, 2, [1, 1], ["a", "b"]) == [ImageSpan(2, 9, None)]  # counts that do not add up
    assert [common_prefix([1, 2, 3, 4], b) for b in ([1, 2, 3, 4, 5], [1, 2, 7], [5], [])] == [4, 2, 0, 0]
    cache = PrefixCache(4, min_tokens=2)
    cache.record(1, prompt + [5, 6], image_spans(prompt, 9, 2, [2, 1], ["a", "b"]))
    spans = image_spans(prompt, 9, 2, [2, 1], ["a", "b"])
    assert cache.match(prompt + [7], spans, free=[0, 2, 3]) is None  # slot 1 is not free
    assert cache.match(prompt + [7], spans, free=[0, 1]) == (1, len(prompt))
    assert cache.match(prompt + [7], spans, free=[0, 1]) is None  # the match dropped the record: the slot is written
    cache.record(1, prompt + [5, 6], spans)
    other = image_spans(prompt, 9, 2, [2, 1], ["a", "c"])  # the second image differs: reuse stops at its start
    assert cache.reusable(prompt + [7], other, cache._records[1]) == 7
    assert cache.reusable(prompt, spans, cache._records[1]) == len(prompt) - 1
    assert cache.reusable([1, 2, 9, 9], image_spans([1, 2, 9, 9], 9, 2, None, None), cache._records[1]) == 2
    # slots for prompts that reuse nothing: a bare slot inside the running batch, then the oldest record
    cache.record(0, [1, 1], [])
    assert cache.take([0, 1, 2, 3], bucket=4) == 2
    assert cache.take([0, 1, 3], bucket=2) == 1 and len(cache) == 1  # slot 1's record is the older
    assert cache.take([0, 3], bucket=0) == 0 and len(cache) == 0
    with pytest.raises(ValueError, match="prefix_min_tokens"):
        Engine(make_model(), None, prefix_cache=False, prefix_min_tokens=0)
    with pytest.raises(ValueError, match="prefix_min_tokens"):
        PrefixCache(2, min_tokens=0)


def test_a_failed_step_forgets_every_kept_prefix(model, tokenizer, monkeypatch):
    engine = engine_of(model, tokenizer)
    engine.generate([prompts(tokenizer)[1]], SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(engine.prefixes) == 1

    def broken(*a, **k):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.decoder, "run", broken)
    engine.start()
    try:
        req = engine.submit(prompts(tokenizer)[0], SamplingParams(max_tokens=4, ignore_eos=True))
        with pytest.raises(RuntimeError, match="device lost"):
            req.result(timeout=30)
    finally:
        engine.shutdown()
    assert len(engine.prefixes) == 0  # what the failed step left in the cache is not trusted


def test_waves_of_requests_sharing_a_long_prefix_give_plain_generates_tokens(model, tokenizer):
    """Hits and whole prefills admitted together, n samples, queueing past the slots and requests joining
    a running batch: every sample is plain generate's greedy continuation of its own prompt."""
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(10, 200, (80,), generator=g).tolist()
    engine = Engine(model, tokenizer, max_batch_size=4, max_seq_len=256)  # reuse from 64 tokens on
    reqs = []
    for wave in range(3):
        for _ in range(4):
            suffix = torch.randint(10, 200, (int(torch.randint(3, 10, (), generator=g)),), generator=g).tolist()
            # every third prompt shares only 40 tokens with the others: too few to reuse, prefilled whole
            prompt = (shared if len(reqs) % 3 else shared[:40]) + suffix
            params = SamplingParams(max_tokens=int(torch.randint(4, 12, (), generator=g)), ignore_eos=True,
                                    n=1 + len(reqs) % 2)
            reqs.append((prompt, params, engine.submit(prompt, params)))
        for _ in range(3 + wave):
            engine.step()
    for _ in range(200):  # 12 requests of at most 11 tokens on 4 slots: far fewer steps when all is well
        if all(r.done for _, _, r in reqs):
            break
        engine.step()
    assert all(r.done for _, _, r in reqs), "requests left unfinished (two samples given one slot?)"
    for prompt, params, req in reqs:
        want = reference(model, engine, prompt, params.max_tokens)
        assert [c.token_ids for c in req.result()] == [want] * params.n
    assert engine.stats["prefix_hits"] >= 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_prefix_reuse_under_cuda_graphs_equals_whole_prefills(tokenizer):
    """Compiled decode steps replayed as CUDA graphs (chunks of 8, the split-key kernel), whose free rows
    write at the scratch positions: follow-up prompts on kept prefixes give the tokens of an eager engine
    that prefills every prompt whole."""
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(10, 200, (90,), generator=g).tolist()
    kw = {"max_batch_size": 4, "max_seq_len": 256, "device": "cuda"}
    graphs = Engine(make_model(), tokenizer, decode_chunk=8, decode_attention="split", **kw)
    eager = Engine(make_model(), tokenizer, cuda_graphs=False, prefix_cache=False, **kw)
    prompts_ = [shared + torch.randint(10, 200, (4 + i,), generator=g).tolist() for i in range(6)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    first = graphs.generate(prompts_[:3], params)  # three rows decode together; kept in slots 0-2
    follow = [p + c[0].token_ids + [7, 8, 9] for p, c in zip(prompts_[:3], first)]
    later = graphs.generate(follow + prompts_[3:], params)
    assert graphs.stats["prefix_hits"] >= 3 and "cuda_graph" in graphs.decode_mode
    want = eager.generate(prompts_[:3] + follow + prompts_[3:], params)
    assert [c[0].token_ids for c in first + later] == [c[0].token_ids for c in want]
