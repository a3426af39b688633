"""Videos at inference (server, chat): the frames transformers' InternVL video processor would pick, each one
tile as its image processor makes it, in the prompt its processor writes, through the official openai client."""

from __future__ import annotations

import base64
import io
import sys

import numpy as np
import pytest
import torch
from oracle import internvl_image_processor, internvl_processor
from PIL import Image
from test_model import make_model

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
av = pytest.importorskip("av")

from nativevl.cli import main
from nativevl.data.images import frame_indices, load_video_frames
from nativevl.infer.engine import Engine
from nativevl.infer.generate import generate
from nativevl.infer.server import ServerConfig, create_app, start_in_thread

N_FRAMES = 40  # the clip's length; frame k is a picture of its own (a bar at x = k, grey level 6k)


def write_clip(path, n: int = N_FRAMES, size: tuple[int, int] = (64, 48)) -> bytes:
    w, h = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for k in range(n):
            pixels = np.full((h, w, 3), 6 * k, np.uint8)
            pixels[:, k % w] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path.read_bytes()


def every_frame(path) -> list[Image.Image]:
    with av.open(str(path)) as container:
        return [f.to_image().convert("RGB") for f in container.decode(video=0)]


def oracle_prompt(tokenizer, cfg, n_frames: int, question: str, image_tiles: int | None = None):
    """(ids, transformers' text) of a question about a video (after an image of `image_tiles` tiles, if
    given) with no system turn: the checkpoint's chat template (an image part -> <IMG_CONTEXT>, a video part
    -> <video>) and transformers' InternVLProcessor's replacements of those by their spans."""
    proc = internvl_processor(tokenizer, cfg.image_seq_length, cfg.vision.image_size)
    parts = [{"type": "image"}] * (image_tiles is not None) + [{"type": "video"}, {"type": "text", "text": question}]
    text = tokenizer.apply_chat_template([{"role": "user", "content": parts}], tokenize=False,
                                         add_generation_prompt=True)
    if image_tiles is not None:
        text = text.replace(proc.image_token, proc.replace_image_token({"num_patches": [image_tiles]}, 0), 1)
    frames_text = proc.replace_video_token({"pixel_values_videos": [torch.zeros(n_frames, 1)]}, 0)
    text = text.replace(proc.video_token, frames_text)
    return tokenizer(text, add_special_tokens=False).input_ids, text


def oracle_pixels(frames: list[Image.Image], image_size: int) -> torch.Tensor:
    """Each frame one tile: transformers' GotOcr2 image processor with at most one patch (InternVL's max_num=1)."""
    ip = internvl_image_processor(image_size, max_patches=1)
    return torch.cat([torch.as_tensor(np.asarray(ip(images=f, return_tensors="pt")["pixel_values"])) for f in frames])


def greedy(model, ids, pixels, tokenizer, max_new_tokens: int, **kwargs) -> str:
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    out = generate(model, torch.tensor([ids]), pixels, max_new_tokens=max_new_tokens, eos_token_id=eos, **kwargs)
    new = out[0, len(ids):].tolist()
    new = new[: next((i for i, t in enumerate(new) if t in eos), len(new))]
    return tokenizer.decode(new, skip_special_tokens=True)


def test_frames_are_the_segment_centres_transformers_picks(tmp_path):
    # transformers' InternVLVideoProcessor.sample_frames (initial_shift=True): int(arange(n/2k, n, n/k)) in float32
    assert frame_indices(40, 8, rng=None) == [2, 7, 12, 17, 22, 27, 32, 37]
    assert frame_indices(10, 4, rng=None) == [1, 3, 6, 8]
    assert frame_indices(30, 11, rng=None) == [1, 4, 6, 9, 12, 15, 17, 20, 23, 25, 28]  # 15.0 in exact arithmetic
    # a clip shorter than asked: the count asked, frames repeated (as InternVL's load_video; it was every
    # frame once, a prompt of another length than asked)
    assert frame_indices(3, 8, rng=None) == [0, 0, 0, 1, 1, 2, 2, 2]
    assert sorted(frame_indices(3, 8, rng=np.random.default_rng(0))) == [0, 0, 0, 1, 1, 1, 2, 2]
    # training: one random frame inside each segment
    picks = frame_indices(40, 8, rng=np.random.default_rng(0))
    assert all(5 * k <= i < 5 * (k + 1) for k, i in enumerate(picks))
    # decoded from a file or from the bytes a request carries: the same frames, the ones picked
    data = write_clip(tmp_path / "clip.mp4")
    chosen = [np.asarray(f) for f in every_frame(tmp_path / "clip.mp4")]
    for source in (tmp_path / "clip.mp4", data):
        frames = load_video_frames(source, num_frames=8)
        assert [next(k for k, c in enumerate(chosen) if np.array_equal(c, np.asarray(f))) for f in frames] == \
            [2, 7, 12, 17, 22, 27, 32, 37]
    with pytest.raises(ValueError, match="over the limit"):
        load_video_frames(data, num_frames=8, max_pixels=64 * 47)
    with pytest.raises(ValueError, match="cannot decode the video in the request"):
        load_video_frames(b"not a video at all" * 50, num_frames=8)


@pytest.fixture(scope="module")
def served(tokenizer, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    model = make_model()
    engine = Engine(model, tokenizer, max_batch_size=4, max_seq_len=512, max_queue=16)
    cfg = ServerConfig(model_name="tiny", system_message="", allowed_local_media=str(media), max_video_frames=16,
                       max_image_pixels=64 * 64, max_body_bytes=400_000)
    engine.start()
    server, url = start_in_thread(create_app(engine, cfg))
    yield engine, url, media
    server.should_exit = True
    engine.shutdown()


def client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def video_url(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


def test_a_served_video_question_equals_transformers_prompt_and_pixels(served, tokenizer):
    engine, url, media = served
    data = write_clip(media / "clip.mp4")
    all_frames = every_frame(media / "clip.mp4")
    model, cfg = engine.model, engine.model.config
    for num_frames, part in ((None, {"url": video_url(data)}),  # the server's default: 8 frames
                             (5, {"url": f"file://{media / 'clip.mp4'}", "num_frames": 5})):
        n = num_frames or 8
        ids, text = oracle_prompt(tokenizer, cfg, n, "what happens?")
        assert text.count("Frame") == n and "Frame1: <img>" in text
        picks = [int(i) for i in torch.arange(N_FRAMES / n / 2, N_FRAMES, N_FRAMES / n).int()]
        want = greedy(model, ids, oracle_pixels([all_frames[i] for i in picks], cfg.vision.image_size), tokenizer, 12)
        messages = [{"role": "user", "content": [{"type": "video_url", "video_url": part},
                                                 {"type": "text", "text": "what happens?"}]}]
        r = client(url).chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
        assert r.usage.prompt_tokens == len(ids)
        assert r.choices[0].message.content == want
        stream = client(url).chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                     stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want
    # a picture beside the video: the frames where the video part stands, then "<image>\n" as for any image
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    mixed = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}},
        {"type": "video_url", "video_url": {"url": video_url(data), "num_frames": 2}},
        {"type": "text", "text": "and now?"}]}]
    r = client(url).chat.completions.create(model="tiny", messages=mixed, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == len(oracle_prompt(tokenizer, cfg, 2, "and now?", image_tiles=1)[0])


def test_text_after_a_video_part_follows_it_as_text_follows_an_image(tmp_path):
    """A video's prefix ends in a newline as an image's "<image>\\n" does: the text part after either is
    not joined by another newline (consecutive text parts are)."""
    from nativevl.infer.server import IMAGE, Video, parse_messages

    data = write_clip(tmp_path / "clip.mp4")
    png = "data:image/png;base64," + base64.b64encode(b"\x89PNG").decode()

    def content(media: dict) -> list:
        turns, _ = parse_messages([{"role": "user", "content": [
            {"type": "text", "text": "A"}, media, {"type": "text", "text": "B"}, {"type": "text", "text": "C"}]}],
            ServerConfig())
        return turns[0]["content"]

    video = content({"type": "video_url", "video_url": {"url": video_url(data)}})
    image = content({"type": "image_url", "image_url": {"url": png}})
    assert image == ["A", IMAGE, "\n", "B", "\n", "C"]
    assert video[0] == "A" and isinstance(video[1], Video) and video[2:] == ["B", "\n", "C"]


@pytest.mark.parametrize("part, message", [
    ({"url": "data:video/mp4;base64,bm90IGEgdmlkZW8="}, "cannot decode the video"),
    ({"url": "data:video/mp4;base64,###"}, "not valid base64"),
    ({"url": "https://example.com/v.mp4"}, "does not fetch URLs"),
    ({"url": "/etc/passwd"}, "not a file under the allowed folder"),
    ("clip", "num_frames must be an integer in \\[1, 16\\]"),
    ("big", "over the limit"),
    ("two", "at most 1 video"),
])
def test_bad_videos_are_400s_and_the_server_keeps_serving(served, part, message, tmp_path):
    url = served[1]
    data = write_clip(tmp_path / "c.mp4", n=6)
    content = [{"type": "video_url", "video_url": part}]
    if part == "clip":
        content = [{"type": "video_url", "video_url": {"url": video_url(data), "num_frames": 17}}]
    elif part == "big":
        content = [{"type": "video_url", "video_url": {"url": video_url(write_clip(tmp_path / "b.mp4", 3, (96, 64)))}}]
    elif part == "two":
        content = [{"type": "video_url", "video_url": {"url": video_url(data)}}] * 2
    with pytest.raises(openai.BadRequestError, match=message) as e:
        client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], max_tokens=2)
    assert e.value.status_code == 400
    assert_video = [{"role": "assistant", "content": [{"type": "video_url", "video_url": {"url": video_url(data)}}]}]
    with pytest.raises(openai.BadRequestError, match="only allowed in user messages"):
        client(url).chat.completions.create(model="tiny", messages=assert_video, max_tokens=2)
    ok = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video_url(data), "num_frames": 2}}]}]
    assert client(url).chat.completions.create(model="tiny", messages=ok, max_tokens=2).choices[0].finish_reason


def test_chat_answers_about_a_video_as_transformers_would_ask(tmp_path, tokenizer, capsys, monkeypatch):
    model = make_model()
    model.save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    write_clip(tmp_path / "clip.mp4")
    frames = every_frame(tmp_path / "clip.mp4")
    cfg = model.config
    ids, _ = oracle_prompt(tokenizer, cfg, 4, "what happens?")
    want = greedy(model, ids, oracle_pixels([frames[i] for i in (5, 15, 25, 35)], cfg.vision.image_size), tokenizer, 8)
    base = ["chat", "--model", str(tmp_path / "m"), "--system", "", "--max_new_tokens", "8", "--num_frames", "4"]
    assert main(base + ["--video", str(tmp_path / "clip.mp4"), "--prompt", "what happens?"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == want.strip() and "4 tile(s)" in err
    # a session: a file that is not a video is refused when named, and loses nothing: the conversation
    # goes on as one in which it was never typed (it was found only at the next question, which it took
    # with it, and the pictures attached before it)
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 300)
    clip = f"/video {tmp_path / 'clip.mp4'}\nwhat happens?\n"
    outs, engines = [], []
    import nativevl.infer.engine as engine_module

    real = engine_module.Engine
    monkeypatch.setattr(engine_module, "Engine", lambda *a, **k: engines.append(real(*a, **k)) or engines[-1])
    for session in (clip + f"/video {tmp_path / 'bad.mp4'}\nand then?\n", clip + "and then?\n"):
        monkeypatch.setattr(sys, "stdin", io.StringIO(session))
        assert main(base) == 0
        outs.append(capsys.readouterr())
    assert "cannot decode the video" in outs[0].err and "(not attached)" in outs[0].err
    assert outs[0].err.count("tile(s)") == 2
    assert outs[0].out == outs[1].out and outs[0].out.startswith(want.strip())
    # the second question about the clip runs on the keys its first turn left (the frames included):
    # the ViT ran once, on the first turn's 4 frames
    assert [(e.vision_cache.misses, e.stats["prefix_hits"]) for e in engines] == [(4, 1), (4, 1)]
    assert main(base[:-1] + ["0", "--video", str(tmp_path / "clip.mp4"), "--prompt", "x"]) != 0
    assert "--num_frames must be >= 1" in capsys.readouterr().err


def test_eval_asks_a_jsonl_sets_video_questions_as_transformers_would(tmp_path, tokenizer):
    import json

    from nativevl.eval.runner import evaluate
    from nativevl.pipelines.questions import jsonl_questions

    model = make_model()
    write_clip(tmp_path / "clip.mp4")
    frames = every_frame(tmp_path / "clip.mp4")
    rows = [{"video": "clip.mp4", "conversations": [{"from": "human", "value": "<video>\nwhat happens?"},
                                                     {"from": "gpt", "value": "a bar moves"}]},
            {"video": "clip.mp4", "conversations": [{"from": "human", "value": "what happens?"},  # no placeholder
                                                     {"from": "gpt", "value": "it gets brighter"}]}]
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = evaluate(model, tokenizer, [str(tmp_path / "set.jsonl")], n=None, system_message=None, batch_size=2,
                      num_frames=4, model_name="tiny")
    entry = report[str(tmp_path / "set.jsonl")]
    ids, _ = oracle_prompt(tokenizer, model.config, 4, "what happens?")
    want = greedy(model, ids, oracle_pixels([frames[i] for i in (5, 15, 25, 35)], model.config.vision.image_size),
                  tokenizer, 64, suppress_tokens=[model.config.image_token_id])  # evaluation never writes <IMG_CONTEXT>
    assert [r["prediction"] for r in entry["records"]] == [want, want]
    assert entry["settings"]["num_frames"] == 4
    default = evaluate(None, tokenizer, [str(tmp_path / "set.jsonl")], n=None, model_name="tiny",
                       predictor=lambda task, items: ["x"] * len(items))
    assert "num_frames" not in default[str(tmp_path / "set.jsonl")]["settings"]  # 8: as reports before videos
    # read without videos=True (an API caller that asks images only), a video record is said, not dropped
    with pytest.raises(ValueError, match="a video record"):
        jsonl_questions(tmp_path / "set.jsonl")
    # a video file that is not there stops the evaluation, naming it
    (tmp_path / "gone.jsonl").write_text(json.dumps({**rows[0], "video": "gone.mp4"}) + "\n")
    with pytest.raises(ValueError, match="gone.mp4 does not exist"):
        evaluate(model, tokenizer, [str(tmp_path / "gone.jsonl")], n=None)


def test_preference_pairs_about_a_video_ask_it_as_eval_does_and_train_on_its_frames(tmp_path, tokenizer, monkeypatch,
                                                                                    capsys):
    """`data preference` on video questions: each is sampled with the frames and the prompt transformers'
    processor would give (one tile per frame), DropoutNTP continues without the video, the pairs name the
    video, and the MPO loader makes both sides of a pair from the same frames."""
    import json

    from nativevl.data.pipeline import DataConfig
    from nativevl.data.records import DatasetSpec, parse_record
    from nativevl.data.samples import build_sample
    from nativevl.pipelines import questions as qmod

    model = make_model()
    model.save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    cfg = model.config
    write_clip(tmp_path / "clip.mp4")
    frames = every_frame(tmp_path / "clip.mp4")
    rows = [{"video": "clip.mp4", "conversations": [{"from": "human", "value": "<video>\nwhat happens?"}]},  # no answer
            {"video": "clip.mp4", "conversations": [{"from": "human", "value": "what happens?"},
                                                     {"from": "gpt", "value": "a bar moves"}]}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    real, asked = qmod.generate_texts, []
    monkeypatch.setattr(qmod, "generate_texts", lambda m, t, r, **k: asked.append(list(r)) or real(m, t, r, **k))
    out = tmp_path / "pref.jsonl"
    args = ["data", "preference", "--model", str(tmp_path / "m"), "--input", str(tmp_path / "q.jsonl"), "--samples", "4",
            "--max_new_tokens", "6", "--num_frames", "4", "--out", str(out)]
    assert main(args) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want_ids, _ = oracle_prompt(tokenizer, cfg, 4, "what happens?")
    want_pixels = oracle_pixels([frames[i] for i in (5, 15, 25, 35)], cfg.vision.image_size)
    responses, continuations = asked[0], asked[1]
    assert len(responses) == 2 * 4
    for ids, tiles in responses:  # both questions (with and without the placeholder) are the same prompt
        assert ids == want_ids
        assert torch.allclose(tiles, want_pixels, atol=1e-5)
    for ids, tiles in continuations:  # DropoutNTP: the question without its video
        assert (tiles is None or tiles.numel() == 0) and cfg.image_token_id not in ids
        assert "video" not in tokenizer.decode(ids) and "Frame" not in tokenizer.decode(ids)
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert records and stats["dropout_ntp_pairs"] >= 1 and all(r["video"] == "clip.mp4" for r in records)
    assert all(r["question"] == "<video>\nwhat happens?" for r in records)  # its frames' place, said
    spec = DatasetSpec("pref", out, tmp_path)
    data = DataConfig(max_tokens=2000, max_tiles=64, image_size=cfg.vision.image_size,
                      image_seq_length=cfg.image_seq_length, image_token_id=cfg.image_token_id, system_message=None)
    pair = build_sample(parse_record(records[0], spec, "pref:1"), tokenizer, data, index=3)
    n_frames = pair.num_tiles
    assert 8 <= n_frames <= 32  # training draws its own frames, as InternVL's loader does
    chosen_ids, rejected_ids = pair.input_ids, pair.rejected[0]
    for ids in (chosen_ids, rejected_ids):
        text = tokenizer.decode(ids)
        assert (ids == cfg.image_token_id).sum() == n_frames * cfg.image_seq_length and "<video>" not in text
        assert f"Frame-{n_frames}: <img>" in text
    # a video that cannot be decoded is left out and named; past 5% of the video questions, an error
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 300)
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({**r, "video": "bad.mp4"}) + "\n" for r in rows[:1])
                                      + "".join(json.dumps(r) + "\n" for r in rows))
    assert main([*args[:-1], str(tmp_path / "pref2.jsonl")]) != 0
    assert "1 of 3 videos cannot be decoded" in capsys.readouterr().err
    # what the loader refuses in a video preference record, by name
    from nativevl.data.records import RecordError

    Image.new("RGB", (20, 20)).save(tmp_path / "x.png")
    pair = {"question": "<video>\nwhat happens?", "chosen": "a", "rejected": "b"}
    for bad, kind in (({**pair, "video": "clip.mp4", "image": "x.png"}, "malformed"),
                      ({**pair, "video": ["clip.mp4", "clip.mp4"]}, "malformed"),
                      (pair, "placeholder_mismatch"),  # <video> but no video
                      ({**pair, "video": "clip.mp4", "chosen": "it shows <video>"}, "placeholder_mismatch")):
        with pytest.raises(RecordError) as e:
            parse_record(bad, spec, "pref:x")
        assert e.value.kind == kind


def test_a_preference_pair_on_a_video_converts_and_loads(tmp_path, tokenizer):
    """ms-swift's DPO record on a video (`videos`, `rejected_response`) -> nativevl's preference record
    naming the video, with `<video>` before its question; the loader makes both sides from its frames."""
    import json

    from nativevl.data.convert import convert
    from nativevl.data.pipeline import DataConfig
    from nativevl.data.records import load_meta, parse_record
    from nativevl.data.samples import build_sample

    write_clip(tmp_path / "clip.mp4")
    raw = {"messages": [{"role": "user", "content": "what happens?"}, {"role": "assistant", "content": "a bar moves"}],
           "rejected_response": "nothing", "videos": ["clip.mp4"]}
    (tmp_path / "in.jsonl").write_text(json.dumps(raw) + "\n")
    stats = convert([tmp_path / "in.jsonl"], tmp_path / "out" / "pairs.jsonl")
    assert (stats.written, stats.pairs) == (1, 1)
    record = json.loads((tmp_path / "out" / "pairs.jsonl").read_text())
    assert record == {"video": "../clip.mp4", "question": "<video>\nwhat happens?", "chosen": "a bar moves",
                      "rejected": "nothing"}
    (spec,) = load_meta(tmp_path / "out" / "meta.json")
    image_token = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    cfg = DataConfig(max_tokens=4096, max_tiles=64, image_seq_length=2, image_token_id=image_token,
                     system_message=None, training=False)
    pair = build_sample(parse_record(record, spec, "pairs:1"), tokenizer, cfg)
    assert pair.num_tiles == 32  # InternVL's loader outside training: 32 frames
    for ids in (pair.input_ids, pair.rejected[0]):
        assert (ids == image_token).sum() == 32 * 2 and "<video>" not in tokenizer.decode(ids)


def test_prm_labels_for_a_video_question_ask_it_with_its_frames(tmp_path, tokenizer, monkeypatch, capsys):
    """`data prm` on a video question: solutions and step-prefix rollouts are asked with the frames and the
    prompt transformers' processor gives; the PRM conversation names the video, whose frames replace the
    `<video>` of its question when it trains."""
    import json

    from nativevl.data.pipeline import DataConfig
    from nativevl.data.records import DatasetSpec, parse_record
    from nativevl.data.samples import build_sample
    from nativevl.pipelines import questions as qmod

    model = make_model()
    model.save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    cfg = model.config
    write_clip(tmp_path / "clip.mp4")
    frames = every_frame(tmp_path / "clip.mp4")
    row = {"video": "clip.mp4", "conversations": [{"from": "human", "value": "<video>\nwhat happens?"},
                                                   {"from": "gpt", "value": "a bar moves"}]}
    (tmp_path / "q.jsonl").write_text(json.dumps(row) + "\n")
    asked = []

    def fake_sampler(m, t, rows, **kw):  # solutions of two steps, then rollouts
        asked.append(list(rows))
        return ["it moves\n\nto the right"] * len(rows) if len(asked) == 1 else ["a bar moves"] * len(rows)

    monkeypatch.setattr(qmod, "generate_texts", fake_sampler)
    out = tmp_path / "prm.jsonl"
    assert main(["data", "prm", "--model", str(tmp_path / "m"), "--input", str(tmp_path / "q.jsonl"), "--solutions", "2",
                 "--rollouts", "2", "--num_frames", "4", "--out", str(out)]) == 0
    want_ids, _ = oracle_prompt(tokenizer, cfg, 4, "what happens?")
    want_pixels = oracle_pixels([frames[i] for i in (5, 15, 25, 35)], cfg.vision.image_size)
    solutions, rollouts = asked
    step = tokenizer("it moves\n\n", add_special_tokens=False).input_ids
    for rows, extra in ((solutions, []), (rollouts, step)):
        assert rows and all(ids == want_ids + extra for ids, _ in rows)
        assert all(torch.allclose(tiles, want_pixels, atol=1e-5) for _, tiles in rows)
    (record,) = [json.loads(x) for x in out.read_text().splitlines()]  # the same solution twice: one record
    assert record["video"] == "clip.mp4" and record["conversations"][1]["value"].startswith("### Question:\n<video>")
    data = DataConfig(max_tokens=2000, max_tiles=64, image_size=cfg.vision.image_size,
                      image_seq_length=cfg.image_seq_length, image_token_id=cfg.image_token_id, system_message=None)
    sample = build_sample(parse_record(record, DatasetSpec("prm", out, tmp_path), "prm:1"), tokenizer, data, index=0)
    text = tokenizer.decode(sample.input_ids)
    assert "### Question:\nFrame-1: <img>" in text and "<video>" not in text
    assert (sample.input_ids == cfg.image_token_id).sum() == sample.num_tiles * cfg.image_seq_length


def test_best_of_n_scores_a_video_questions_samples_with_its_frames(tmp_path, tokenizer, monkeypatch):
    """`eval --best-of-n --prm` on a jsonl set's video question: the PRM reads the question as the policy was
    asked it (its frames, one tile each, in transformers' pixels) and scores every sample."""
    import json

    from nativevl.eval.runner import evaluate_best_of_n
    from nativevl.infer import prm as prm_module

    model = make_model()
    write_clip(tmp_path / "clip.mp4")
    frames = every_frame(tmp_path / "clip.mp4")
    row = {"video": "clip.mp4", "conversations": [{"from": "human", "value": "<video>\nwhat happens?"},
                                                   {"from": "gpt", "value": "a bar moves"}]}
    (tmp_path / "set.jsonl").write_text(json.dumps(row) + "\n")
    real, seen = prm_module.step_scores, []

    def spy(prm, tok, question, responses, pixel_values=None, tiles_per_image=None, **kw):
        seen.append((question, pixel_values, tiles_per_image, len(responses)))
        return real(prm, tok, question, responses, pixel_values, tiles_per_image, **kw)

    monkeypatch.setattr(prm_module, "step_scores", spy)
    report = evaluate_best_of_n(model, tokenizer, [str(tmp_path / "set.jsonl")], n=None, samples=3, prm=model,
                                num_frames=4, seed=1, system_message=None)
    (question, pixels, per_image, n), = seen
    assert n == 3 and per_image == [1, 1, 1, 1] and question.endswith("what happens?")
    assert question.count("<image>") == 4 and "<video>" not in question
    want = oracle_pixels([frames[i] for i in (5, 15, 25, 35)], model.config.vision.image_size)
    assert torch.allclose(pixels.cpu(), want, atol=1e-5)
    entry = report[str(tmp_path / "set.jsonl")]
    assert entry["prm_best3"]["n"] == 1 and len(entry["records"]) == 1


def _encode(path, n: int, fmt: str | None = None, codec: str = "mpeg4", options=None, pts=None, rotate90=False) -> None:
    """Frame k: grey level 4k with a white band at x < 4, in another container or timing."""
    import fractions
    import struct

    tb = fractions.Fraction(1, 1000)
    with av.open(str(path), "w", format=fmt, options=options or {}) as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.bit_rate = 2_000_000  # each frame decodes to a picture of its own
        if pts:
            stream.codec_context.time_base = tb
        for k in range(n):
            pixels = np.full((48, 64, 3), 4 * k, np.uint8)
            pixels[:, :4] = 255
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            if pts:
                frame.pts, frame.time_base = pts[k], tb
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    if rotate90:  # a phone's portrait video: stored landscape, its track matrix turning it 90 degrees clockwise
        data = bytearray(path.read_bytes())
        at = data.find(b"tkhd") + 4 + 4 + 4 * 5 + 8 + 8  # version 0: the matrix
        struct.pack_into(">9i", data, at, 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)
        path.write_bytes(bytes(data))


def test_frames_are_chosen_among_those_the_file_holds_and_shown_upright(tmp_path):
    """The frame count was taken from the file's header (or duration x rate): a fragmented MP4 (8 of 60
    said), a file cut short (its frames padded with the last one kept), a variable frame rate (only
    its first half sampled) put the segment centres elsewhere; a raw stream (.m4v) could not seek back
    after its packets were counted; a phone's rotation was ignored; a clip shorter than asked gave fewer
    frames than asked."""
    def ids(frames, path):  # where each frame stands among all the file's frames
        every = [np.asarray(f) for f in every_frame(path)]
        return [next(k for k, e in enumerate(every) if np.array_equal(e, np.asarray(f))) for f in frames]

    cases = {"frag.mp4": {"options": {"movflags": "frag_keyframe+empty_moov"}},
             "vfr.ts": {"fmt": "mpegts",
                        "pts": [k * 100 for k in range(30)] + [3000 + k * 10 for k in range(30)]},
             "raw.m4v": {"fmt": "m4v"},
             "full.mp4": {"options": {"movflags": "faststart"}}}
    for name, kw in cases.items():
        _encode(tmp_path / name, 60, **kw)
        every = every_frame(tmp_path / name)
        assert len(every) == 60 and len({f.tobytes() for f in every}) == 60, name
        got = ids(load_video_frames(tmp_path / name, num_frames=8), tmp_path / name)
        assert got == frame_indices(60, 8, rng=None), name
    data = (tmp_path / "full.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) * 55 // 100])  # its header still says 60
    n = len(every_frame(tmp_path / "cut.mp4"))
    assert 10 < n < 60
    assert ids(load_video_frames(tmp_path / "cut.mp4", num_frames=8), tmp_path / "cut.mp4") == frame_indices(n, 8, rng=None)
    assert len(load_video_frames(tmp_path / "cut.mp4", rng=np.random.default_rng(0), min_frames=6, max_frames=6)) == 6

    _encode(tmp_path / "short.mp4", 3)
    assert ids(load_video_frames(tmp_path / "short.mp4", num_frames=8), tmp_path / "short.mp4") == [0, 0, 0, 1, 1, 2, 2, 2]
    _encode(tmp_path / "turned.mp4", 4, fmt="mp4", rotate90=True)
    frame = np.asarray(load_video_frames(tmp_path / "turned.mp4", num_frames=1)[0].convert("L"), dtype=float)
    assert frame.shape == (64, 48)  # shown portrait, as players show it
    assert frame[:3].mean() > 200 and frame[8:].mean() < 50  # the band stored on the left is on top
