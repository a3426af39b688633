"""The inference engine: equal to plain generate, batching-invariant, one prefill for n samples, stops, seeds."""

from __future__ import annotations

import copy
import threading
import time
from collections import Counter

import pytest
import torch
import torch._inductor.config as inductor_config
from conftest import image_batch
from test_model import make_model
from torch._inductor.decomposition import select_decomp_table
from torch.fx.experimental.proxy_tensor import make_fx

from nativevl.infer.engine import Engine, QueueFull, SamplingParams
from nativevl.infer.generate import generate
from nativevl.infer.slot_decoder import GEMV_OPTIONS, SlotDecoder


@pytest.fixture(scope="module")
def model():
    return make_model()


def prompts(tokenizer) -> list[list[int]]:
    texts = ["the quick brown fox", "one two three four five six seven", "a red circle", "what is shown"]
    return [tokenizer(t).input_ids for t in texts]


def reference(model, engine: Engine, ids: list[int], n: int, pixel_values=None) -> list[int]:
    out = generate(model, torch.tensor([ids]), pixel_values, max_new_tokens=n, eos_token_id=sorted(engine.eos_ids))
    new = out[0, len(ids):].tolist()
    return new[: next((i for i, t in enumerate(new) if t in engine.eos_ids), len(new))]


def test_greedy_equals_plain_generate_text_and_images(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=4, max_seq_len=512)
    ids, pixel_values = image_batch(model.config)
    row0 = ids[0].tolist()  # a 1-tile image inside text
    got = engine.generate([row0], SamplingParams(max_tokens=12), [pixel_values[:1]])[0][0]
    assert got.token_ids == reference(model, engine, row0, 12, pixel_values[:1])
    for p in prompts(tokenizer):
        got = engine.generate([p], SamplingParams(max_tokens=16))[0][0]
        assert got.token_ids == reference(model, engine, p, 16)
        assert got.text == tokenizer.decode(got.token_ids, skip_special_tokens=True)
        assert got.finish_reason == ("length" if len(got.token_ids) == 16 else "stop")


def test_batched_equals_one_by_one_and_buckets_do_not_matter(model, tokenizer):
    ps = prompts(tokenizer)
    ids, pixel_values = image_batch(model.config)
    ps.append(ids[1].tolist())  # a 3-tile image
    pvs = [None] * 4 + [pixel_values[1:]]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    alone = [Engine(model, tokenizer, max_batch_size=8, max_seq_len=512, length_quantum=1).generate([p], params, [pv])
             [0][0].token_ids for p, pv in zip(ps, pvs)]
    # a wide key window and a batch padded with free slots: the static shapes a CUDA graph replays
    engine = Engine(model, tokenizer, max_batch_size=8, max_seq_len=512, length_quantum=128)
    together = engine.generate(ps, params, pvs)
    assert [c[0].token_ids for c in together] == alone
    assert engine.stats["prefill_batches"] == 1 and engine.stats["decode_steps"] == 9


def test_n_samples_come_from_one_prefill(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=8, max_seq_len=256)
    p = prompts(tokenizer)[0]
    greedy = engine.generate([p], SamplingParams(max_tokens=8, n=3, ignore_eos=True))[0]
    assert engine.stats["prefills"] == 1 and len(greedy) == 3
    assert greedy[0].token_ids == greedy[1].token_ids == greedy[2].token_ids
    sampled = engine.generate([p], SamplingParams(max_tokens=8, n=4, temperature=1.5, seed=1, ignore_eos=True))[0]
    assert engine.stats["prefills"] == 2
    assert len({tuple(c.token_ids) for c in sampled}) == 4
    with pytest.raises(ValueError, match="n = 9 samples exceed max_batch_size 8"):
        engine.generate([p], SamplingParams(n=9))


def test_seeds_reproduce_whatever_the_batch(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=8, max_seq_len=256)
    ps = prompts(tokenizer)
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    alone = engine.generate([ps[0]], params)[0][0].token_ids
    crowd = engine.generate(ps, [params] + [SamplingParams(max_tokens=5, temperature=1.0)] * 3)[0][0].token_ids
    assert alone == crowd
    other = engine.generate([ps[0]], SamplingParams(max_tokens=12, temperature=1.0, seed=8, ignore_eos=True))
    assert other[0][0].token_ids != alone
    # top_k = 1 is greedy whatever the temperature
    top1 = engine.generate([ps[0]], SamplingParams(max_tokens=12, temperature=2.0, top_k=1, seed=3, ignore_eos=True))
    assert top1[0][0].token_ids == engine.generate([ps[0]], SamplingParams(max_tokens=12, ignore_eos=True))[0][0].token_ids


def test_top_p_applies_to_what_top_k_leaves_as_generate_does():
    """top_k then top_p: the cut on the distribution renormalised over the top k (generate, transformers,
    vLLM). The engine used the full distribution's sums, keeping tokens the others drop; a top_k past the
    64-bit range failed every request admitted with it."""
    from nativevl.infer.generate import sample_next
    from nativevl.infer.sampling import Request, Sequence, sample_tokens

    logits = torch.tensor([[0.5, 0.25, 0.15, 0.1]]).log()

    def engine_picks(**kw) -> set[int]:
        reqs = [Request([1, 2], SamplingParams(temperature=1.0, seed=seed, **kw), None, None) for seed in range(200)]
        return {t for r in reqs for t in sample_tokens(logits.clone(), [Sequence(r, 0, 0, frozenset())])}

    for bad in ({"temperature": float("nan")}, {"temperature": float("inf")}, {"repetition_penalty": float("nan")},
                {"repetition_penalty": float("inf")}, {"top_p": float("nan")}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be"):
            SamplingParams(**bad)
    g = torch.Generator().manual_seed(0)
    for kw, picks in [({"top_k": 2, "top_p": 0.6}, {0}), ({"top_p": 0.6}, {0, 1}), ({"top_k": 3, "top_p": 0.8}, {0, 1}),
                      ({"top_k": 10**30, "top_p": 0.6}, {0, 1}), ({"top_k": 3}, {0, 1, 2})]:
        assert engine_picks(**kw) == picks, kw
        ref = {int(sample_next(logits, do_sample=True, generator=g, **kw)) for _ in range(200)}
        assert ref == picks, kw


def test_stop_tokens_stop_strings_and_max_tokens(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=4, max_seq_len=256)
    p = prompts(tokenizer)[1]
    full = engine.generate([p], SamplingParams(max_tokens=20, ignore_eos=True))[0][0]
    assert full.finish_reason == "length" and len(full.token_ids) == 20
    stop_at = full.token_ids[5]
    first = full.token_ids.index(stop_at)
    by_token = engine.generate([p], SamplingParams(max_tokens=20, stop_token_ids=(stop_at,), ignore_eos=True))[0][0]
    assert by_token.token_ids == full.token_ids[:first] and by_token.finish_reason == "stop"
    text = full.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip("\ufffd")
    by_string = engine.generate([p], SamplingParams(max_tokens=20, stop=(stop,), ignore_eos=True))[0][0]
    assert by_string.finish_reason == "stop" and by_string.text == text[: text.find(stop)]
    deltas = []
    engine.submit(p, SamplingParams(max_tokens=20, stop=(stop,), ignore_eos=True),
                  on_event=lambda kind, i, x: deltas.append(x) if kind == "delta" else None)
    while engine.step():
        pass
    assert "".join(deltas) == by_string.text  # the stop string is never streamed
    # a full cache ends the sequence with "length"
    small = Engine(model, tokenizer, max_batch_size=2, max_seq_len=len(p) + 4)
    out = small.generate([p], SamplingParams(max_tokens=50, ignore_eos=True))[0][0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5  # the last token needs no cache entry
    with pytest.raises(ValueError, match="the prompt has"):
        small.generate([p * 2], SamplingParams())


def test_repetition_penalty_changes_the_output(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=2, max_seq_len=256)
    p = prompts(tokenizer)[2]
    plain = engine.generate([p], SamplingParams(max_tokens=30, ignore_eos=True))[0][0].token_ids
    penalised = engine.generate([p], SamplingParams(max_tokens=30, repetition_penalty=5.0, ignore_eos=True))[0][0]
    assert penalised.token_ids != plain
    assert len(set(penalised.token_ids)) >= len(set(plain))


def test_continuous_batching_joins_and_leaves(model, tokenizer):
    ps = prompts(tokenizer)
    engine = Engine(model, tokenizer, max_batch_size=3, max_seq_len=256)
    lengths = [14, 4, 9, 11]
    alone = [engine.generate([p], SamplingParams(max_tokens=k, ignore_eos=True))[0][0].token_ids
             for p, k in zip(ps, lengths)]
    reqs = [engine.submit(ps[0], SamplingParams(max_tokens=14, ignore_eos=True))]
    for _ in range(3):
        engine.step()
    reqs += [engine.submit(p, SamplingParams(max_tokens=k, ignore_eos=True)) for p, k in zip(ps[1:], lengths[1:])]
    while engine.step():
        pass
    assert [r.result()[0].token_ids for r in reqs] == alone
    # 3 slots: the fourth request waited for a free one
    assert reqs[3].timings["admitted"] > reqs[1].timings["admitted"]


def test_background_thread_serves_many_threads_and_bounds_its_queue(model, tokenizer):
    ps = prompts(tokenizer)
    engine = Engine(model, tokenizer, max_batch_size=4, max_seq_len=256, max_queue=3)
    expected = [engine.generate([p], SamplingParams(max_tokens=6))[0][0].token_ids for p in ps]
    for p in ps[:3]:
        engine.submit(p, SamplingParams(max_tokens=6))
    with pytest.raises(QueueFull):
        engine.submit(ps[3], SamplingParams(max_tokens=6))
    engine.start()
    engine.max_queue = 64
    try:
        results: dict[int, list[int]] = {}

        def worker(i: int) -> None:
            results[i] = engine.generate([ps[i % 4]], SamplingParams(max_tokens=6))[0][0].token_ids

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert all(results[i] == expected[i % 4] for i in range(12))
        assert "".join(engine.stream(ps[0], SamplingParams(max_tokens=6))) == tokenizer.decode(
            expected[0], skip_special_tokens=True)
    finally:
        engine.shutdown()


def test_a_bad_request_fails_alone(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=4, max_seq_len=256)
    ids, _ = image_batch(model.config)
    good = engine.submit(prompts(tokenizer)[0], SamplingParams(max_tokens=4))
    bad = engine.submit(ids[0].tolist(), SamplingParams(max_tokens=4))  # image tokens, no pixels
    while engine.step():
        pass
    assert len(good.result()[0].token_ids) <= 4
    with pytest.raises(ValueError, match="no pixel_values"):
        bad.result()
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\)"):
        engine.submit([1, 600], SamplingParams())


def test_a_failing_prefill_fails_its_requests_instead_of_hanging(model, tokenizer, monkeypatch):
    engine = Engine(model, tokenizer, max_batch_size=4, max_seq_len=256)
    req = engine.submit(prompts(tokenizer)[0], SamplingParams(max_tokens=4))

    def out_of_memory(reqs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(engine, "_prefill", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.step()
    assert req.done and engine.num_running == 0
    with pytest.raises(RuntimeError, match="out of memory"):
        req.result(timeout=1)


@pytest.mark.parametrize("fused,chunk", [(True, 1), (False, 1), (True, 4)])
def test_suppressed_tokens_are_never_generated(model, tokenizer, fused, chunk):
    """As generate's suppress_tokens: the tokens the engine would pick first are never picked, greedy (in
    the decode step, chunked or not, and at the prefill) or sampled; the rest of the output is
    plain generate's with the same tokens suppressed."""
    p = prompts(tokenizer)[1]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    kw = {"max_batch_size": 4, "max_seq_len": 256, "fused_decode": fused}
    free = Engine(model, tokenizer, **kw).generate([p], params)[0][0].token_ids
    # the first token (the prefill's pick), then the 4th token picked with the first one suppressed: the
    # run with both suppressed needs its decode step to suppress too, from the 4th token on at the latest
    then = Engine(model, tokenizer, suppress_token_ids=(free[0],), **kw).generate([p], params)[0][0].token_ids
    banned = sorted({free[0], then[3]})
    engine = Engine(model, tokenizer, decode_chunk=chunk, suppress_token_ids=tuple(banned), **kw)
    got = engine.generate([p], params)[0][0].token_ids
    vocab = model.config.text.vocab_size
    want = generate(model, torch.tensor([p]), max_new_tokens=12, eos_token_id=vocab, suppress_tokens=banned)
    assert got == want[0, len(p):].tolist() and not set(got) & set(banned)
    top1 = SamplingParams(max_tokens=12, ignore_eos=True, temperature=1.0, top_k=1, seed=0)  # sampled, from the same logits
    assert engine.generate([p], top1)[0][0].token_ids == got
    with pytest.raises(ValueError, match="suppress_token_ids"):
        Engine(model, tokenizer, suppress_token_ids=(vocab,), **kw)


def _decode_step_matmuls(model, batch: int, options: dict) -> Counter:
    """The aten operators of the fused decode step at `batch` rows after Inductor's decompositions with
    `options`, traced on the meta device, which those decompositions treat as they treat CUDA (they keep
    CPU matmuls as they are whatever the options)."""
    meta = copy.deepcopy(model).to("meta")
    hd = meta.config.text.head_dim

    def rope(positions, dtype):  # the model's RoPE turns autocast off, which the meta device does not have
        return (torch.ones(*positions.shape, hd, device="meta", dtype=dtype),) * 2

    decoder = SlotDecoder(meta, rope, max_batch_size=4, cache_len=64, fused=True, attention="sdpa", graphs=False,
                          compile=False, compile_mode=None, compile_options=None, compile_prefill=False, length_quantum=16,
                          chunk=1, suppress=None, stats={})
    inputs = (torch.zeros(batch, dtype=torch.long, device="meta"), torch.zeros(batch, device="meta"),
              torch.zeros(batch, dtype=torch.long, device="meta"))
    with inductor_config.patch(options):
        graph = make_fx(lambda t, p, n: decoder._fused_step(t, p, n, 32), decomposition_table=select_decomp_table())(*inputs)
    return Counter(str(n.target) for n in graph.graph.nodes if n.op == "call_function")


def test_decode_gemv_turns_batch_one_matrix_products_into_fusable_reductions(model, tokenizer):
    """`--decode-gemv` (GEMV_OPTIONS) is what lets Inductor fuse a batch-1 decode step's matrix products
    with the norms, activations and residual adds around them: at batch 1 every one of them (q/k/v with
    its bias, o, gate/up, down, lm_head) becomes a reduction, none is left to cuBLAS; at batch 2 the
    step keeps its matrix products. Without the option nothing changes."""
    per_step = 4 * model.config.text.num_hidden_layers + 1
    plain = _decode_step_matmuls(model, 1, {})
    assert plain["aten.mm.default"] + plain["aten.addmm.default"] == per_step
    gemv = _decode_step_matmuls(model, 1, GEMV_OPTIONS)
    assert gemv["aten.mm.default"] + gemv["aten.addmm.default"] == 0
    assert gemv["aten.sum.dim_IntList"] == plain["aten.sum.dim_IntList"] + per_step
    batch2 = _decode_step_matmuls(model, 2, GEMV_OPTIONS)
    assert batch2["aten.mm.default"] + batch2["aten.addmm.default"] == per_step
    with pytest.raises(ValueError, match="not both"):
        Engine(model, tokenizer, compile_mode="max-autotune-no-cudagraphs", compile_options=GEMV_OPTIONS)
    # on the CPU the step is not compiled: the option changes nothing there, and says so in decode_mode
    engine = Engine(model, tokenizer, max_batch_size=2, max_seq_len=128, compile_options=GEMV_OPTIONS)
    assert "gemv" not in engine.decode_mode
    p = prompts(tokenizer)[0]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    assert engine.generate([p], params)[0][0].token_ids == reference(model, engine, p, 8)


def test_compiled_prefill_gives_plain_generates_tokens_with_one_graph_for_all_lengths(model, tokenizer):
    """`compile_prefill`: the prefill's decoder layer compiled once for the 4 layers and every prompt
    length (a graph for one row, one for several), the greedy tokens those of plain generate: prompts
    of several lengths, a prompt with an image, n samples of one prompt, and two prompts of one length
    prefilled together."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    engine = Engine(model, tokenizer, max_batch_size=4, max_seq_len=256, compile_prefill=True)
    assert "compiled_prefill" in engine.decode_mode
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    before = counters["stats"]["unique_graphs"]
    ids, pixel_values = image_batch(model.config)
    image_prompt = ids[0].tolist()
    got = engine.generate([image_prompt], params, [pixel_values[:1]])[0][0].token_ids
    assert got == reference(model, engine, image_prompt, 6, pixel_values[:1])
    for p in prompts(tokenizer):
        assert engine.generate([p], params)[0][0].token_ids == reference(model, engine, p, 6)
    two = engine.generate([prompts(tokenizer)[0]], SamplingParams(max_tokens=6, ignore_eos=True, n=2))[0]
    assert [c.token_ids for c in two] == [reference(model, engine, prompts(tokenizer)[0], 6)] * 2
    p = prompts(tokenizer)[2]
    q = [(t + 7) % 100 + 3 for t in p]  # another prompt of the same length: one prefill of 2 rows
    together = engine.generate([p, q], params)
    assert [c[0].token_ids for c in together] == [reference(model, engine, p, 6), reference(model, engine, q, 6)]
    assert engine.stats["prefill_batches"] == 7
    assert counters["stats"]["unique_graphs"] - before <= 2
    with pytest.raises(ValueError, match="compile_prefill needs fused_decode"):
        Engine(model, tokenizer, compile_prefill=True, fused_decode=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile,chunk,attention,gemv,cprefill", [
    (False, 1, "sdpa", False, False), (True, 1, "sdpa", False, False), (True, 8, "sdpa", False, False),
    (False, 1, "split", False, False), (True, 8, "split", False, False), (True, 1, "sdpa", True, False),
    (True, 8, "split", True, True)])
def test_cuda_graph_decode_equals_eager(tokenizer, compile, chunk, attention, gemv, cprefill):
    ps = prompts(tokenizer)
    ids, pixel_values = image_batch(make_model().config)
    ps.append(ids[0].tolist())
    pvs = [None] * 4 + [pixel_values[:1]]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    eager = Engine(make_model(), tokenizer, max_batch_size=8, max_seq_len=512, device="cuda", cuda_graphs=False)
    graphs = Engine(make_model(), tokenizer, max_batch_size=8, max_seq_len=512, device="cuda", compile=compile,
                    decode_chunk=chunk, decode_attention=attention, compile_options=GEMV_OPTIONS if gemv else None,
                    compile_prefill=cprefill)
    assert ("gemv" in graphs.decode_mode) == gemv
    want = [c[0].token_ids for c in eager.generate(ps, params, pvs)]
    assert [c[0].token_ids for c in graphs.generate(ps, params, pvs)] == want
    assert graphs.stats["graph_captures"] >= 1 and "cuda_graph" in graphs.stats["decode_mode"]
    # continuous batching across buckets replays the right graphs
    alone = [graphs.generate([p], params, [pv])[0][0].token_ids for p, pv in zip(ps, pvs)]
    assert alone == want
    bf16 = Engine(make_model(), tokenizer, max_batch_size=8, max_seq_len=512, device="cuda", dtype=torch.bfloat16)
    out = bf16.generate(ps, params, pvs)
    assert all(len(c[0].token_ids) == 24 for c in out)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile,chunk", [(False, 1), (True, 8)])
def test_suppression_inside_cuda_graphs_equals_eager(tokenizer, compile, chunk):
    """The suppressed tokens' -inf is applied inside the captured (and compiled) decode step as in eager."""
    ps = prompts(tokenizer)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    kw = {"max_batch_size": 8, "max_seq_len": 256, "device": "cuda"}
    free = Engine(make_model(), tokenizer, cuda_graphs=False, **kw).generate(ps, params)
    banned = tuple(sorted({c[0].token_ids[2] for c in free}))  # tokens the decode step picks unsuppressed
    eager = Engine(make_model(), tokenizer, cuda_graphs=False, suppress_token_ids=banned, **kw)
    graphs = Engine(make_model(), tokenizer, compile=compile, decode_chunk=chunk, suppress_token_ids=banned, **kw)
    want = [c[0].token_ids for c in eager.generate(ps, params)]
    assert [c[0].token_ids for c in graphs.generate(ps, params)] == want
    assert not any(set(w) & set(banned) for w in want) and graphs.stats["graph_captures"] >= 1


def test_chat_repl_multi_turn_with_images(tmp_path, tokenizer, monkeypatch, capsys):
    import io

    import numpy as np
    from PIL import Image

    from nativevl.cli import main

    make_model().save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 60, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    script = f"/image {tmp_path / 'x.png'}\nwhat is shown\n/image {tmp_path / 'nope.png'}\nand now\n/reset\nhi\n/quit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert main(["chat", "--model", str(tmp_path / "m"), "--max_new_tokens", "4", "--system", ""]) == 0
    err = capsys.readouterr().err
    assert err.count("tokens in") == 3 and "1 tile(s)" in err and "no such image file" in err
    prompts = [int(x) for x in __import__("re").findall(r"prompt (\d+) tokens", err)]
    assert prompts[1] > prompts[0] > prompts[2]  # the second turn carries the first; /reset forgets it
    # single-shot, streamed per token or in chunks of 4 greedy steps: the same answer
    shot = ["chat", "--model", str(tmp_path / "m"), "--image", str(tmp_path / "x.png"), "--prompt", "what is shown",
            "--max_new_tokens", "9", "--system", ""]
    answers = []
    for extra in ([], ["--decode-chunk", "4"]):
        assert main(shot + extra) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and answers[0].strip()



def test_a_turn_past_the_engines_length_leaves_the_conversation_as_it_was(tmp_path, model, tokenizer):
    import numpy as np
    from PIL import Image

    from nativevl.infer.chat import Conversation

    Image.fromarray(np.random.default_rng(1).integers(0, 255, (60, 60, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    engine = Engine(model, tokenizer, max_batch_size=1, max_seq_len=160)
    chat = Conversation(engine, tokenizer, SamplingParams(max_tokens=4), system_message="", max_num=1, num_frames=4)
    chat.ask("what is shown", [str(tmp_path / "x.png")])
    state = ([dict(m) for m in chat.history], len(chat.tiles), list(chat.keys))
    with pytest.raises(ValueError, match="holds at most"):
        chat.ask("tell me more " * 40, [str(tmp_path / "x.png")])  # a second picture and a long question
    assert ([dict(m) for m in chat.history], len(chat.tiles), list(chat.keys)) == state
    _, took = chat.ask("and now")
    fresh = Conversation(engine, tokenizer, SamplingParams(max_tokens=4), system_message="", max_num=1, num_frames=4)
    fresh.ask("what is shown", [str(tmp_path / "x.png")])
    assert took["prompt_tokens"] == fresh.ask("and now")[1]["prompt_tokens"]  # as if never asked

def test_a_cancelled_waiting_request_leaves_the_queue_at_once(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=2, max_seq_len=256, max_queue=2)  # no step runs
    p = prompts(tokenizer)[0]
    events = []
    gone = engine.submit(p, SamplingParams(max_tokens=4), on_event=lambda k, i, x: events.append(k))
    engine.submit(p, SamplingParams(max_tokens=4))
    engine.cancel(gone)  # e.g. its client went away while every slot was busy
    assert gone.done and events == ["error"] and engine.num_waiting == 1
    with pytest.raises(RuntimeError, match="cancelled"):
        gone.result(timeout=1)
    kept = engine.submit(p, SamplingParams(max_tokens=4))  # its place in the queue is free again
    while engine.step():
        pass
    assert len(kept.result()[0].token_ids) <= 4


def test_an_interrupted_generate_leaves_no_request_behind(model, tokenizer, monkeypatch):
    """generate() running the steps itself, stopped by ^C (or a failing step): its requests used to stay
    queued and running, decoding for no one in the next call's steps."""
    engine = Engine(model, tokenizer, max_batch_size=2, max_seq_len=256)
    ps = prompts(tokenizer)
    real_step, calls = engine.step, []

    def step():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(engine, "step", step)
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    with pytest.raises(KeyboardInterrupt):
        engine.generate(ps, params)  # 4 prompts, 2 slots: two running, two waiting
    monkeypatch.setattr(engine, "step", real_step)
    assert engine.num_waiting == 0
    decoded = engine.stats["decode_steps"]
    again = engine.generate([ps[0]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert engine.num_running == 0 and engine.stats["decode_steps"] - decoded <= 3
    assert again[0][0].token_ids == reference(model, engine, ps[0], 3)


def test_closing_a_stream_early_frees_its_slot(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=2, max_seq_len=256)
    deltas = engine.stream(prompts(tokenizer)[1], SamplingParams(max_tokens=200, ignore_eos=True))
    next(deltas)
    deltas.close()  # the caller stops reading (e.g. breaks out of its loop)
    steps = engine.stats["decode_steps"]
    while engine.step():
        pass
    assert engine.num_running == 0 and engine.stats["decode_steps"] - steps <= 1


def test_generate_that_fails_on_one_prompt_leaves_no_orphan_requests(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=2, max_seq_len=64)
    good, too_long = prompts(tokenizer)[0], prompts(tokenizer)[1] * 20
    with pytest.raises(ValueError, match="the prompt has"):
        engine.generate([good, too_long], SamplingParams(max_tokens=4))
    assert engine.num_waiting == 0  # the first prompt was queued and no one would read its result
    engine.generate([good], SamplingParams(max_tokens=4))
    assert engine.stats["prefills"] == 1


def test_a_failing_prefill_in_the_background_loop_spares_the_running_requests(model, tokenizer, monkeypatch):
    engine = Engine(model, tokenizer, max_batch_size=4, max_seq_len=256)
    ps = prompts(tokenizer)
    want = engine.generate([ps[1]], SamplingParams(max_tokens=60, ignore_eos=True))[0][0].token_ids
    engine.start()
    try:
        running = engine.submit(ps[1], SamplingParams(max_tokens=60, ignore_eos=True))
        deadline = time.monotonic() + 30
        while engine.num_running == 0 and not running.done and time.monotonic() < deadline:
            time.sleep(0.001)

        def out_of_memory(reqs):
            raise RuntimeError("CUDA out of memory (simulated)")

        monkeypatch.setattr(engine, "_prefill", out_of_memory)
        big = engine.submit(ps[0], SamplingParams(max_tokens=4))
        with pytest.raises(RuntimeError, match="out of memory"):
            big.result(timeout=30)
        assert running.result(timeout=30)[0].token_ids == want  # it was not part of the failed prefill
    finally:
        engine.shutdown()


def test_a_raising_event_callback_fails_only_its_own_request(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=4, max_seq_len=256)
    ps = prompts(tokenizer)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    want = engine.generate([ps[0]], params)[0][0].token_ids

    def broken(kind, index, payload):
        if kind == "delta":
            raise ConnectionError("the consumer is gone")

    bad = engine.submit(ps[1], params, on_event=broken)
    good = engine.submit(ps[0], params)
    while engine.step():
        pass
    assert good.result()[0].token_ids == want
    with pytest.raises(ConnectionError, match="consumer is gone"):
        bad.result()
    assert engine.num_running == 0


@pytest.mark.parametrize("chunk", [1, 8])
def test_a_consumer_failing_or_cancelling_mid_chunk_stops_at_that_token(model, tokenizer, chunk):
    """With decode_chunk > 1 a chunk's later tokens are not handed to a request cancelled (or whose
    consumer raised) at an earlier one of them; and a consumer failing on the final events still fails."""
    p = prompts(tokenizer)[1]
    # (max_tokens, the event and its count that trigger, what the consumer does then)
    for max_tokens, kind_at, count_at, action in ((9, "delta", 2, "raise"), (9, "delta", 2, "cancel"),
                                                  (3, "finish", 1, "raise")):
        engine = Engine(model, tokenizer, max_batch_size=2, max_seq_len=256, decode_chunk=chunk)
        events: list[str] = []
        req = None

        def consumer(kind, index, payload, kind_at=kind_at, count_at=count_at, action=action):
            events.append(kind)
            if kind == kind_at and events.count(kind) == count_at:
                if action == "raise":
                    raise ConnectionError("the consumer is gone")
                engine.cancel(req)

        req = engine.submit(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True), on_event=consumer)
        while engine.step():
            pass
        with pytest.raises((ConnectionError, RuntimeError)):
            req.result()
        assert events.count(kind_at) == count_at and "done" not in events and engine.num_running == 0


def test_shutdown_fails_the_requests_it_leaves(model, tokenizer):
    """A server stopping its engine must not leave callers blocked on requests no loop will finish."""
    engine = Engine(model, tokenizer, max_batch_size=1, max_seq_len=512)
    p = prompts(tokenizer)[0]
    started = threading.Event()
    engine.start()
    running = engine.submit(p, SamplingParams(max_tokens=400, ignore_eos=True), on_event=lambda *a: started.set())
    waiting = engine.submit(p, SamplingParams(max_tokens=4))  # the only slot is busy
    assert started.wait(30)
    engine.shutdown()
    for req in (running, waiting):
        with pytest.raises(RuntimeError, match="shut down"):
            req.result(timeout=5)
    assert engine.num_running == 0 and engine.num_waiting == 0
    assert engine.generate([p], SamplingParams(max_tokens=3))[0][0].token_ids  # still usable step by step


def test_decode_chunks_give_the_tokens_of_single_steps(model, tokenizer):
    """decode_chunk = 8: greedy steps run 8 at a time with one host sync; stops, budgets, streaming,
    joining requests, a full cache and sampled neighbours give exactly what single steps give."""
    ps = prompts(tokenizer)
    one = Engine(model, tokenizer, max_batch_size=4, max_seq_len=256)
    eight = Engine(model, tokenizer, max_batch_size=4, max_seq_len=256, decode_chunk=8)
    assert eight.stats["decode_mode"] == "fused+eager+chunk8"
    full = one.generate([ps[1]], SamplingParams(max_tokens=20, ignore_eos=True))[0][0]
    text = full.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    params = [SamplingParams(max_tokens=20, ignore_eos=True), SamplingParams(max_tokens=3),
              SamplingParams(max_tokens=20, stop_token_ids=(full.token_ids[5],), ignore_eos=True),
              SamplingParams(max_tokens=20, stop=(stop,), ignore_eos=True)]
    batch = [ps[1], ps[0], ps[1], ps[1]]
    assert eight.generate(batch, params) == one.generate(batch, params)
    # one request: 19 tokens after the prefill's first in chunks of 8, 8, 2 and 1
    calls = eight.stats["decode_calls"]
    assert eight.generate([ps[1]], params[0])[0][0] == full
    assert eight.stats["decode_calls"] - calls == 4
    deltas = []
    eight.submit(ps[1], params[3], on_event=lambda kind, i, x: deltas.append(x) if kind == "delta" else None)
    while eight.step():
        pass
    assert "".join(deltas) == text[: text.find(stop)]
    # requests joining and leaving between chunks
    reqs = [eight.submit(ps[0], SamplingParams(max_tokens=30, ignore_eos=True))]
    eight.step()
    reqs += [eight.submit(p, SamplingParams(max_tokens=k, ignore_eos=True)) for p, k in zip(ps[1:], (5, 13, 9))]
    while eight.step():
        pass
    alone = [one.generate([p], SamplingParams(max_tokens=k, ignore_eos=True))[0][0].token_ids
             for p, k in zip(ps, (30, 5, 13, 9))]
    assert [r.result()[0].token_ids for r in reqs] == alone
    # a sampled neighbour: single steps while it runs, and its seeded tokens as ever
    mixed = [SamplingParams(max_tokens=12, ignore_eos=True),
             SamplingParams(max_tokens=12, temperature=1.0, seed=5, ignore_eos=True)]
    steps, calls = eight.stats["decode_steps"], eight.stats["decode_calls"]
    assert eight.generate(ps[:2], mixed) == one.generate(ps[:2], mixed)
    assert eight.stats["decode_steps"] - steps == eight.stats["decode_calls"] - calls == 11
    # a 12-token prompt in a 16-position cache: chunks stop at its end
    p12 = (ps[1] * 4)[:12]
    small = [Engine(model, tokenizer, max_batch_size=2, max_seq_len=16, decode_chunk=c) for c in (1, 8)]
    outs = [e.generate([p12], SamplingParams(max_tokens=50, ignore_eos=True))[0][0] for e in small]
    assert outs[0] == outs[1] and outs[1].finish_reason == "length" and len(outs[1].token_ids) == 5


def test_logprobs_are_the_models_distribution_at_each_token(model, tokenizer):
    """Each generated token's log-probability (and its top alternatives) equals log_softmax of a plain
    forward over prompt + tokens so far; asking for them changes no token, also with decode_chunk 8 and
    with sampling (temperature does not reshape the reported distribution)."""
    ids = prompts(tokenizer)[1]
    want = Engine(model, tokenizer, max_batch_size=4, max_seq_len=128).generate(
        [ids], SamplingParams(max_tokens=6, ignore_eos=True))[0][0]
    engine = Engine(model, tokenizer, max_batch_size=4, max_seq_len=128, decode_chunk=8)
    got = engine.generate([ids], SamplingParams(max_tokens=6, ignore_eos=True, logprobs=2))[0][0]
    assert got.token_ids == want.token_ids and len(got.logprobs) == 6
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids + got.token_ids])).logits[0].float()
    ref = logits[len(ids) - 1 : -1].log_softmax(-1)  # the distribution each token was drawn from
    for i, (tok, entry) in enumerate(zip(got.token_ids, got.logprobs)):
        assert entry["token_id"] == tok and abs(entry["logprob"] - ref[i, tok].item()) < 1e-4
        top = ref[i].topk(2)
        assert [t for t, _ in entry["top"]] == top.indices.tolist()
        assert max(abs(lp - r) for (_, lp), r in zip(entry["top"], top.values.tolist())) < 1e-4
    sampled = engine.generate([ids], SamplingParams(max_tokens=4, temperature=1.5, seed=1, logprobs=0))[0][0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids + sampled.token_ids])).logits[0].float()
    ref = logits[len(ids) - 1 : -1].log_softmax(-1)
    assert all(abs(e["logprob"] - ref[i, t].item()) < 1e-4 and e["top"] == []
               for i, (t, e) in enumerate(zip(sampled.token_ids, sampled.logprobs)))
    with pytest.raises(ValueError, match="logprobs must be in"):
        SamplingParams(logprobs=21)


def _metaspace_tokenizer():
    """A SentencePiece-style tokenizer (InternLM3's, InternVL3-9B's LLM, is one): '▁' marks a space, and
    decoding drops the space of the first word it decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<|im_end|>"], show_progress=False)
    tok.train_from_iterator(["Hello the quick brown fox jumps over the lazy dog, wörld", "naïve café déjà vu"] * 20,
                            trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", unk_token="<unk>")


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
def test_incremental_text_is_the_whole_decode_at_every_token(tokenizer, kind):
    """The engine decoded a sample's whole text at every token (streaming, stop strings): ~0.3 ms a token
    at 2,000 tokens, the time of a GPU decode step. It now decodes a few tokens; the text it grows must be
    the whole decode at every token, characters split over tokens (held back until whole) and leading
    spaces included."""
    import random

    from nativevl.infer.sampling import Request, Sequence, grow_text

    tok = tokenizer if kind == "byte_level" else _metaspace_tokenizer()
    text = "Hello wörld, naïve café — 東京 and 🎉 emoji; the quick brown fox jumps over the lazy dog déjà vu"
    ids = tok(text, add_special_tokens=False).input_ids
    rng = random.Random(0)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids = ids[:20] + [eos] + ids[20:] + [rng.randrange(len(tok)) for _ in range(40)]  # a skipped special token too
    prompt = tok("a prompt that ends", add_special_tokens=False).input_ids
    seq = Sequence(Request(prompt, SamplingParams(), None, None), 0, 0, frozenset())
    held = 0
    for i, t in enumerate(ids):
        seq.tokens.append(t)
        grown = grow_text(tok, seq)
        whole = tok.decode(ids[: i + 1], skip_special_tokens=True)
        assert whole.startswith(grown), (i, whole, grown)
        rest = whole[len(grown):]
        assert rest == "" or set(rest) == {"\ufffd"} or len(rest) <= 2, (i, rest)  # only what waits for bytes
        held += bool(rest)
    assert seq.text == tok.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
    if kind == "byte_level":
        assert held  # some character did arrive over two tokens
    else:  # every word keeps its space (one decoded first drops it, as in the whole decode)
        assert seq.text.startswith("Hello wörld, naïve café ")


def _bytes_tokenizer(extra: list[bytes]):
    """A byte-level BPE tokenizer (Qwen2's kind) whose vocabulary is the 256 bytes, then `extra`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's byte -> printable character table: printable bytes stand for themselves, the rest from 256 on
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    hidden = [b for b in range(256) if b not in shown]
    table = {**{b: chr(b) for b in shown}, **{b: chr(256 + k) for k, b in enumerate(hidden)}}
    vocab = {table[b]: b for b in range(256)}
    for token in extra:
        vocab["".join(table[b] for b in token)] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.add_special_tokens(["<|im_end|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")


def test_a_stop_string_in_a_token_that_ends_inside_a_character_stops_there():
    """A token holding 'STOP' and the first bytes of '—' (byte-level vocabularies have such tokens): the
    text grown so far waits for the character's last byte, and the stop string was not seen; the sample
    ran on (its tokens counted) or, ended by EOS or max_tokens, returned and streamed 'STOP'."""
    from nativevl.infer.sampling import Request, Sequence

    tok = _bytes_tokenizer([b"STOP\xe2\x80", b"\x94\xe2\x80"])
    stop_token, still_split = 256, 257
    eos = tok.convert_tokens_to_ids("<|im_end|>")

    def run(tokens, max_tokens=50):
        engine = object.__new__(Engine)  # its text and stop handling alone, driven token by token
        engine.tokenizer, engine.max_seq_len, engine.prefixes = tok, 1000, None
        engine.next_tokens, engine.lengths = [0], [0]
        deltas = []
        req = Request([1, 2], SamplingParams(stop=("STOP",), max_tokens=max_tokens), None,
                      lambda kind, i, x: deltas.append(x) if kind == "delta" else None)
        req.timings.update(admitted=0.0, first_token=0.0)
        seq = Sequence(req, 0, 0, frozenset({eos}))
        engine.slots = [seq]
        for t in tokens:
            if engine.slots[0] is seq:
                engine._append(seq, t)
        return req.completions[0], "".join(deltas)

    hi = [ord("h"), ord("i")]
    done, _ = run(hi + [stop_token, eos], 50)
    assert done.stop_token_id is None  # a string ended it, not the end token after it
    for tokens, max_tokens in [(hi + [stop_token, eos], 50), (hi + [stop_token], 3),
                               (hi + [stop_token] + [still_split] * 6 + [0x94], 50)]:
        done, streamed = run(tokens, max_tokens)
        assert (done.text, done.finish_reason, streamed) == ("hi", "stop", "hi")
        assert done.token_ids == hi + [stop_token]  # nothing after the token that holds the stop string
    done, streamed = run(hi + [0xE2, 0x80, 0x94, ord("x")], 6)  # no stop string: the character arrives whole
    assert (done.text, done.finish_reason, streamed) == ("hi\u2014x", "length", "hi\u2014x")
