"""Records -> samples -> packed batches: losses, bad records, workers, exact resume, mixing, CLI."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_model import make_model

from nativevl.cli import main as cli_main
from nativevl.data.mixture import Enumeration, Mixture, mixture_weights
from nativevl.data.packing import collate, document_weight
from nativevl.data.pipeline import DataConfig, PackedDataset, StreamTracker, iterate_batches, make_loader
from nativevl.data.records import PreferenceRecord, RecordError, load_meta, parse_record
from nativevl.data.samples import build_sample, build_samples
from nativevl.train.losses import weighted_cross_entropy

N_RECORDS = 40


def make_dataset(root, n_bad: int = 4, n: int = N_RECORDS) -> object:
    """n records (text-only, one image, two images) of which the first n_bad are broken in four ways."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    for k in range(6):
        w, h = [(120, 60), (60, 60), (40, 130), (200, 50), (56, 56), (90, 70)][k]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "img" / f"{k}.png")
    (root / "img" / "corrupt.png").write_bytes(b"\x89PNG broken")
    words = ["the quick brown fox", "one two three", "a red circle", "what is shown", "nine ten"]
    lines = []
    for i in range(n):
        q, a = words[i % 5], words[(i + 2) % 5]
        if i % 3 == 0:
            rec = {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
        elif i % 3 == 1:
            rec = {"image": f"img/{i % 6}.png", "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]}
        else:
            rec = {"image": [f"img/{i % 6}.png", f"img/{(i + 1) % 6}.png"],
                   "conversations": [{"from": "human", "value": f"<image> and <image> {q}"}, {"from": "gpt", "value": a}]}
        lines.append(rec)
    bad = [
        {"image": "img/nope.png", "conversations": [{"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "y"}]},
        {"image": "img/corrupt.png", "conversations": [{"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "y"}]},
        {"image": "img/1.png", "conversations": [{"from": "human", "value": "<image> <image> x"}, {"from": "gpt", "value": "y"}]},
        {"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": ""}]},
    ]
    lines[:n_bad] = bad[:n_bad]
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    (root / "meta.json").write_text(json.dumps({"toy": {"root": "", "annotation": "train.jsonl", "data_augment": True,
                                                         "max_dynamic_patch": 4, "repeat_time": 1}}))
    return root / "meta.json"


def data_config(**kw) -> DataConfig:
    base = dict(max_tokens=160, max_tiles=12, image_size=56, image_seq_length=4, image_token_id=5,
                system_message=None, min_records_before_abort=10, max_reject_fraction=0.2, max_records=N_RECORDS)
    return DataConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def meta(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ds"))


@pytest.mark.parametrize("reduction", ["token", "sample", "square"])
def test_packed_loss_equals_weighted_per_document_losses(meta, tokenizer, reduction):
    torch.manual_seed(0)
    model = make_model("rms_norm").train()
    ds = PackedDataset(load_meta(meta), tokenizer, data_config(v2pe="random", loss_reduction=reduction))
    samples = []
    for i in range(N_RECORDS):
        try:
            samples.append(ds.samples(i)[0])
        except RecordError:
            continue
        if len(samples) == 8:
            break
    batch = collate(samples, reduction)
    assert batch.num_documents == 8 and batch.num_tiles == sum(s.num_tiles for s in samples)

    model.zero_grad()
    packed = weighted_cross_entropy(model(**batch.model_inputs()).logits, batch.labels, batch.loss_weights)
    packed.backward()
    g_packed = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    model.zero_grad()
    total, norm = 0.0, 0.0
    for s in samples:
        logits = model(input_ids=torch.from_numpy(s.input_ids)[None], pixel_values=s.pixel_values,
                       position_ids=torch.from_numpy(s.position_ids)[None]).logits[0]
        targets = torch.from_numpy(s.labels[1:])
        mean_ce = torch.nn.functional.cross_entropy(logits[:-1], targets, ignore_index=-100)
        w = document_weight(s.num_targets, reduction) * s.num_targets
        total, norm = total + w * mean_ce, norm + w
    separate = total / norm
    separate.backward()
    g_separate = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert abs(packed.item() - separate.item()) / separate.item() < 1e-5
    assert torch.nn.functional.cosine_similarity(g_packed, g_separate, dim=0).item() > 0.9999


def test_bad_records_are_skipped_counted_and_training_finishes(meta, tokenizer, tmp_path):
    model = make_model().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = data_config()
    ds = PackedDataset(load_meta(meta), tokenizer, cfg, rejects_dir=tmp_path)
    tracker = StreamTracker(cfg.max_reject_fraction, cfg.min_records_before_abort)
    documents = 0
    for batch in iterate_batches(make_loader(ds, num_workers=0), tracker):
        assert batch.num_tokens <= cfg.max_tokens and batch.num_tiles <= cfg.max_tiles
        loss = weighted_cross_entropy(model(**batch.model_inputs()).logits, batch.labels, batch.loss_weights)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        documents += batch.num_documents
    assert tracker.seen == N_RECORDS and documents == N_RECORDS - 4
    assert tracker.by_kind == {"missing_file": 1, "unreadable_image": 1, "placeholder_mismatch": 1, "no_assistant_turn": 1}
    rejects = [json.loads(line) for line in (tmp_path / "rejects-rank0-worker0.jsonl").read_text().splitlines()]
    assert sorted(r["kind"] for r in rejects) == sorted(tracker.by_kind)


def test_too_many_bad_records_stop_the_run(meta, tokenizer):
    cfg = data_config(max_reject_fraction=0.05)
    ds = PackedDataset(load_meta(meta), tokenizer, cfg)
    tracker = StreamTracker(cfg.max_reject_fraction, cfg.min_records_before_abort)
    with pytest.raises(RuntimeError, match=r"\d+ of \d+ records rejected \(\d+\.\d%\), over the limit of 5.0%; by kind"):
        for _ in iterate_batches(make_loader(ds), tracker):
            pass


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_of_only_bad_records_stops_instead_of_hanging(tmp_path, tokenizer, workers):
    """The limit was checked only when a batch was consumed; an endless stream whose records are all
    bad made no batch, so training read it forever. Now the shard itself stops."""
    meta = make_dataset(tmp_path, n_bad=0, n=20)
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(line.replace("img/", "gone/") if "img/" in line else
                                                   json.dumps({"conversations": [{"from": "human", "value": "x"}]})
                                                   for line in lines) + "\n")
    cfg = data_config(max_records=None, max_reject_fraction=0.05, min_records_before_abort=30)
    tracker = StreamTracker(cfg.max_reject_fraction, cfg.min_records_before_abort)
    with pytest.raises(RuntimeError, match=r"records rejected \(100.0%\) in shard \d, the last \d+ records without a batch"):
        for _ in iterate_batches(make_loader(PackedDataset(load_meta(meta), tokenizer, cfg), num_workers=workers), tracker):
            pass


def test_train_cli_reports_a_dataset_of_bad_records(tmp_path, capsys):
    meta = make_dataset(tmp_path, n_bad=0, n=30)
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"conversations": [{"from": "human", "value": "x"}]})
                                                   for _ in lines) + "\n")
    code = cli_main(["train", "debug_tiny", "--out", str(tmp_path / "run"), "--meta", str(meta), "--max_steps=3",
                     "--tensorboard=false", "--num_workers=1"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "stopped: data: " in err and "records rejected (100.0%)" in err and "no_assistant_turn" in err
    assert "Traceback" not in err


def test_resume_writes_each_rejected_record_once(meta, tokenizer, tmp_path):
    """Workers read ahead of the consumed batches; a resume re-reads those records and wrote the bad
    ones to the rejects files a second time."""
    specs = load_meta(meta)
    cfg = data_config(max_records=120, max_reject_fraction=1.0)
    tracker = StreamTracker(1.0)
    for k, _ in enumerate(iterate_batches(make_loader(PackedDataset(specs, tokenizer, cfg, rejects_dir=tmp_path), 2),
                                          tracker)):
        if k == 1:
            break
    resumed = PackedDataset(specs, tokenizer, cfg, rejects_dir=tmp_path)
    resumed.load_state_dict(tracker.state_dict())
    for _ in make_loader(resumed, num_workers=1):
        pass
    written = [json.loads(line)["index"] for f in tmp_path.glob("rejects-*.jsonl") for line in f.read_text().splitlines()]
    assert len(written) == len(set(written)) == 12  # 4 bad records x 3 passes, each once


def batch_indices(loader) -> list[list[int]]:
    return [b.indices for b in loader]


def test_workers_split_the_stream_and_resume_is_exact(meta, tokenizer):
    specs = load_meta(meta)
    cfg = data_config(max_records=120)  # three passes over the data
    single = batch_indices(make_loader(PackedDataset(specs, tokenizer, cfg)))
    seen = sorted(i for b in single for i in b)
    assert len(seen) == len(set(seen)) == 120 - 12  # every good record once, bad ones never

    two = batch_indices(make_loader(PackedDataset(specs, tokenizer, cfg), num_workers=2))
    assert sorted(i for b in two for i in b) == seen

    for workers, stop in [(0, 3), (2, 5)]:
        full = PackedDataset(specs, tokenizer, cfg)
        uninterrupted = batch_indices(make_loader(full, num_workers=workers))
        tracker = StreamTracker(1.0)
        first = []
        for k, batch in enumerate(iterate_batches(make_loader(PackedDataset(specs, tokenizer, cfg), workers), tracker)):
            first.append(batch.indices)
            if k + 1 == stop:
                break
        resumed = PackedDataset(specs, tokenizer, cfg)
        resumed.load_state_dict(json.loads(json.dumps(tracker.state_dict())))  # states survive a JSON checkpoint
        rest = batch_indices(make_loader(resumed, num_workers=workers))
        assert first + rest == uninterrupted


def test_mixture_is_deterministic_weighted_and_random_access():
    m = Mixture([50, 200, 10], [0.5, 0.3, 0.2], seed=3, block=64)
    items = [m.locate(i) for i in range(3000)]
    again = Mixture([50, 200, 10], [0.5, 0.3, 0.2], seed=3, block=64)
    assert [again.locate(i) for i in range(2500, 3000)] == items[2500:]
    share = np.bincount([d for d, _ in items], minlength=3) / 3000
    assert np.allclose(share, [0.5, 0.3, 0.2], atol=0.03)
    first_epoch = [r for d, r in items if d == 2][:10]
    assert sorted(first_epoch) == list(range(10))  # each record once per epoch
    w = mixture_weights([100, 300, 600], [1, 1, 1], is_text=[True, False, False], text_ratio=0.25)
    assert np.isclose(w[0], 0.25) and np.isclose(w[1] + w[2], 0.75) and np.isclose(w[2] / w[1], 2)
    with pytest.raises(ValueError, match="every dataset is multimodal"):
        mixture_weights([1, 2], [1, 1], is_text=[False, False], text_ratio=0.25)


def test_enumeration_reads_every_record_once_in_a_seeded_order():
    e = Enumeration([5, 50, 1], seed=3)
    first = [e.locate(i) for i in range(56)]
    assert sorted(first) == [(d, r) for d, n in enumerate([5, 50, 1]) for r in range(n)]
    assert first != sorted(first) and [Enumeration([5, 50, 1], seed=3).locate(i) for i in range(56)] == first
    assert sorted(e.locate(i) for i in range(56, 112)) == sorted(first)  # a second pass, another order
    assert [e.locate(i) for i in range(56, 112)] != first
    with pytest.raises(ValueError, match="at least one record"):
        Enumeration([3, 0])


def test_a_finite_set_read_once_is_every_record_once_on_every_world_size(tmp_path, tokenizer):
    """A validation / calibration set (read_once): the weighted mixture used to draw each item's dataset
    independently, so reading as many items as records repeated some records and skipped others."""
    specs = load_meta(make_dataset(tmp_path / "small", n_bad=0, n=5)) + load_meta(make_dataset(tmp_path / "big", n_bad=0, n=30))
    everything = [(d, r) for d, n in enumerate([5, 30]) for r in range(n)]

    def read(cfg, world=1):
        got = []
        for rank in range(world):
            ds = PackedDataset(specs, tokenizer, cfg, rank=rank, world_size=world)
            got += [ds.mixture.locate(i) for b in make_loader(ds, num_workers=0) for i in b.indices]
        return got

    for world in (1, 2):
        assert sorted(read(data_config(max_records=None, read_once=True), world)) == everything
    assert sorted(read(data_config(max_records=1000, read_once=True))) == everything  # no more than the set holds
    part = read(data_config(max_records=12, read_once=True))
    assert len(part) == len(set(part)) == 12
    with pytest.raises(ValueError, match="read_once reads every record once"):
        PackedDataset(specs, tokenizer, data_config(read_once=True, text_ratio=0.25))


def test_explicit_weights_and_text_ratio_conflict(meta, tokenizer):
    """Weights given to PackedDataset used to override text_ratio without a word."""
    with pytest.raises(ValueError, match="override DataConfig.text_ratio=0.25"):
        PackedDataset(load_meta(meta), tokenizer, data_config(text_ratio=0.25), weights=[1.0])
    assert PackedDataset(load_meta(meta), tokenizer, data_config(), weights=[1.0]).mixture is not None


def test_video_record_becomes_frames(tmp_path, tokenizer):
    import av

    container = av.open(str(tmp_path / "clip.mp4"), "w")
    stream = container.add_stream("mpeg4", rate=10)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    for k in range(40):
        frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), k * 6, np.uint8), format="rgb24")
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    (tmp_path / "v.jsonl").write_text(json.dumps({"video": "clip.mp4", "conversations": [
        {"from": "human", "value": "<video>\nwhat happens?"}, {"from": "gpt", "value": "it gets brighter"}]}) + "\n")
    (tmp_path / "meta.json").write_text(json.dumps({"v": {"annotation": "v.jsonl"}}))
    spec = load_meta(tmp_path / "meta.json")[0]
    rec = parse_record(json.loads((tmp_path / "v.jsonl").read_text()), spec, "v:1")
    train = build_sample(rec, tokenizer, data_config(max_tokens=2000, max_tiles=64), index=0)
    assert 8 <= train.num_tiles <= 32
    text = tokenizer.decode(train.input_ids)
    assert "Frame-1: <img>" in text and f"Frame-{train.num_tiles}: <img>" in text and "<video>" not in text
    infer = build_sample(rec, tokenizer, data_config(max_tokens=2000, max_tiles=64, training=False), index=0)
    assert infer.num_tiles == 32


def test_formats_llava_preference_and_meta_errors(tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    (tmp_path / "llava.json").write_text(json.dumps([
        {"id": "1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "yo"}]},
        {"image": "a.png", "question": "<image>\nwhich?", "chosen": "left", "rejected": "right"},
    ]))
    (tmp_path / "meta.json").write_text(json.dumps({"l": {"annotation": "llava.json"}}))
    from nativevl.data.records import Annotation

    spec = load_meta(tmp_path / "meta.json")[0]
    ann = Annotation(spec)
    assert len(ann) == 2 and not ann.is_text_only()
    # a file that begins with many text-only records is still multimodal (only its first 64 were looked at)
    text = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    pic = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "yo"}]}
    (tmp_path / "late.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [text] * 200 + [pic] * 20))
    (tmp_path / "late.json").write_text(json.dumps({"l": {"annotation": "late.jsonl"}}))
    assert not Annotation(load_meta(tmp_path / "late.json")[0]).is_text_only()
    rec = parse_record(ann[0][1], spec, "l:1")
    assert rec.images == [tmp_path / "a.png"] and rec.is_multimodal
    pref = parse_record(ann[1][1], spec, "l:2")
    assert isinstance(pref, PreferenceRecord) and pref.chosen == "left"
    (tmp_path / "bad.json").write_text(json.dumps({"l": {"annotation": "llava.json", "repeat": 2}}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['repeat'\]"):
        load_meta(tmp_path / "bad.json")


def test_data_validate_command(meta, tokenizer, tmp_path, capsys):
    tokenizer.save_pretrained(tmp_path / "tok")
    code = cli_main(["data", "validate", str(meta), "--tokenizer", str(tmp_path / "tok"), "--max_tokens", "160",
                     "--max_tiles", "12", "--image_seq_length", "4", "--system", ""])
    out = capsys.readouterr().out
    assert code == 1
    assert f"{N_RECORDS} records, 4 bad" in out
    for kind in ("missing_file: 1", "unreadable_image: 1", "placeholder_mismatch: 1", "no_assistant_turn: 1"):
        assert kind in out
    assert "e.g. toy:train.jsonl:1:" in out
    clean = make_dataset(tmp_path / "clean", n_bad=0)
    assert cli_main(["data", "validate", str(clean)]) == 0


def test_second_resume_and_forked_readers(meta, tokenizer):
    """A resumed run's tracker carries every shard forward (a second resume stays exact), and forked
    workers each read with their own file handle."""
    specs = load_meta(meta)
    cfg = data_config(max_records=120)
    full = batch_indices(make_loader(PackedDataset(specs, tokenizer, cfg), num_workers=2))
    got, state = [], None
    for stop in (3, 2):
        ds = PackedDataset(specs, tokenizer, cfg)
        ds.sources[0].annotation[0]  # the parent opens the file before the workers fork
        tracker = StreamTracker(1.0)
        if state is not None:
            ds.load_state_dict(state)
            tracker.load_state_dict(state)
        for k, batch in enumerate(iterate_batches(make_loader(ds, 2), tracker)):
            got.append(batch.indices)
            if k + 1 == stop:
                break
        state = json.loads(json.dumps(tracker.state_dict()))
    ds = PackedDataset(specs, tokenizer, cfg)
    ds.load_state_dict(state)
    got += batch_indices(make_loader(ds, 2))
    assert got == full


def test_unforeseen_record_shapes_are_counted_not_fatal(tmp_path, tokenizer):
    lines = [
        {"conversations": [{"from": ["human"], "value": "x"}, {"from": "gpt", "value": "y"}]},
        {"image": "a" * 300 + ".png", "conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}]},
        {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "<image> is text in an answer"}]},
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n" + "[" * 5000 + "\n")
    (tmp_path / "meta.json").write_text(json.dumps({"a": {"annotation": "a.jsonl"}}))
    cfg = data_config(max_records=4, min_records_before_abort=1000)
    tracker = StreamTracker(1.0)
    batches = list(iterate_batches(make_loader(PackedDataset(load_meta(tmp_path / "meta.json"), tokenizer, cfg)), tracker))
    assert tracker.seen == 4 and tracker.by_kind == {"malformed": 2, "missing_file": 1}
    assert sum(b.num_documents for b in batches) == 1  # the answer's "<image>" stays text


def test_text_ratio_is_a_share_of_tokens_by_default(tmp_path, tokenizer):
    """InternVL3's text : multimodal 1 : 3 is ~50B : 150B tokens. With long text documents and short
    image conversations, a 0.25 share of samples would make text most of the tokens; the default unit
    measures each dataset's tokens per sample and sets the sample shares so text is 0.25 of the tokens."""
    from nativevl.data.mixture import sample_share_for_token_share

    assert sample_share_for_token_share(0.25, 100.0, 100.0) == pytest.approx(0.25)
    assert sample_share_for_token_share(0.25, 300.0, 100.0) == pytest.approx(0.1)  # 0.1*300 : 0.9*100 = 1 : 3
    assert sample_share_for_token_share(0.0, 300.0, 100.0) == 0.0
    root = tmp_path / "d"
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for k in range(4):
        Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(root / "img" / f"{k}.png")
    words = "the quick brown fox jumps over the lazy dog one two three four five six seven".split()
    docs = [{"text": " ".join(rng.choice(words, size=120))} for _ in range(30)]
    convs = [{"image": f"img/{i % 4}.png", "conversations": [{"from": "human", "value": "<image>\nwhat?"},
                                                            {"from": "gpt", "value": "a fox"}]} for i in range(30)]
    (root / "text.jsonl").write_text("\n".join(json.dumps(r) for r in docs) + "\n")
    (root / "mm.jsonl").write_text("\n".join(json.dumps(r) for r in convs) + "\n")
    (root / "meta.json").write_text(json.dumps({"text": {"root": "", "annotation": "text.jsonl"},
                                                "mm": {"root": "", "annotation": "mm.jsonl"}}))
    specs = load_meta(root / "meta.json")
    shares = {}
    for unit in ("tokens", "samples"):
        ds = PackedDataset(specs, tokenizer, data_config(text_ratio=0.25, text_ratio_unit=unit, max_tokens=400,
                                                         max_records=None))
        tokens = {"text": 0, "mm": 0}
        samples = {"text": 0, "mm": 0}
        for i in range(2000):
            d, _ = ds.mixture.locate(i)
            name = ds.sources[d].name
            samples[name] += 1
            tokens[name] += sum(s.num_tokens for s in ds.samples(i))
        shares[unit] = (tokens["text"] / sum(tokens.values()), samples["text"] / 2000)
    assert shares["tokens"][0] == pytest.approx(0.25, abs=0.03)  # text's share of the tokens
    assert shares["samples"][1] == pytest.approx(0.25, abs=0.03) and shares["samples"][0] > 0.5
    with pytest.raises(ValueError, match="text_ratio_unit"):
        data_config(text_ratio_unit="bytes")


def test_a_preference_pair_loads_its_images_once_and_each_side_as_a_record_of_its_own(tmp_path, tokenizer,
                                                                                     monkeypatch):
    """A pair's image is decoded, tiled and JPEG-augmented once for both sides; each side is what the
    conversation record of that side alone gives at the same index (tiles, V2PE strides drawn after them)."""
    from nativevl.data import samples
    from nativevl.data.records import Record

    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (90, 150, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    pair = PreferenceRecord("<image>\nwhat is shown?", "a red circle", "a blue square", [tmp_path / "a.png"],
                            "p:1", max_dynamic_patch=4, data_augment=True)
    cfg = data_config(max_tokens=400, max_tiles=12, v2pe="random")
    real, calls = samples.load_visuals, []
    monkeypatch.setattr(samples, "load_visuals", lambda *a: calls.append(1) or real(*a))
    sample = build_sample(pair, tokenizer, cfg, index=2)
    assert len(calls) == 1 and sample.num_tiles > 1
    for side, (ids, labels, positions) in ((pair.chosen, (sample.input_ids, sample.labels, sample.position_ids)),
                                           (pair.rejected, sample.rejected)):
        alone = build_sample(Record([{"from": "human", "value": pair.question}, {"from": "gpt", "value": side}],
                                    pair.images, source="p:1", max_dynamic_patch=4, data_augment=True),
                             tokenizer, cfg, index=2)
        assert np.array_equal(alone.input_ids, ids) and np.array_equal(alone.labels, labels)
        assert np.array_equal(np.asarray(alone.position_ids), np.asarray(positions))
        assert torch.equal(alone.pixel_values, sample.pixel_values)
    strides = np.diff(np.asarray(sample.position_ids))
    assert len(np.unique(strides)) > 1  # V2PE drew a stride below 1 for the image tokens


def test_a_config_made_for_another_model_is_named_and_for_model_fits_one(tmp_path, tokenizer):
    """With DataConfig's defaults (448-px tiles of 256 tokens) and a smaller model's data, text_ratio's
    probe said only that no record could be read; `data validate` found nothing wrong. The error now
    shows the first record's problem and names DataConfig.for_model."""
    from nativevl.config import tiny

    make_dataset(tmp_path / "a", n_bad=0, n=6)
    (tmp_path / "a" / "train.jsonl").write_text("".join(
        line + "\n" for line in (tmp_path / "a" / "train.jsonl").read_text().splitlines() if '"image"' in line))
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "text.jsonl").write_text(json.dumps({"text": "plain words " * 20}) + "\n")
    (tmp_path / "t" / "meta.json").write_text(json.dumps({"text": {"root": "", "annotation": "text.jsonl"}}))
    sources = load_meta(tmp_path / "a" / "meta.json") + load_meta(tmp_path / "t" / "meta.json")
    wrong = DataConfig(max_tokens=160, max_tiles=12, text_ratio=0.5, system_message=None)
    with pytest.raises(ValueError, match=r"the first: record \d+: .*DataConfig.for_model"):
        PackedDataset(sources, tokenizer, wrong)
    cfg = tiny()
    right = wrong.for_model(cfg)
    assert (right.image_size, right.image_seq_length, right.image_token_id) == (
        cfg.vision.image_size, cfg.image_seq_length, cfg.image_token_id)
    PackedDataset(sources, tokenizer, right)


def test_a_text_document_longer_than_a_pack_is_split_into_parts_that_train_every_token(tokenizer):
    """Its tail was dropped: pre-training on long documents lost most of their tokens."""
    from nativevl.data.records import Record

    text = " ".join(f"word{k % 37} and {k % 11}" for k in range(60))
    ids = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    cfg = data_config(max_tokens=16)
    assert len(ids) > 4 * 16
    parts = build_samples(Record([], text=text, source="doc"), tokenizer, cfg, index=9)
    assert [p.part for p in parts] == list(range(len(parts))) and {p.index for p in parts} == {9}
    assert all(p.num_tokens <= 16 for p in parts) and all(p.num_tokens == 16 for p in parts[:-1])
    for p in parts:  # each part is its own document: positions from 0, every token of it learnt
        assert p.position_ids.tolist() == list(range(p.num_tokens)) and (p.labels == p.input_ids).all()
    # consecutive parts share one token, so every token after the document's first is predicted exactly once
    predicted = [int(t) for p in parts for t in p.labels[1:]]
    assert predicted == ids[1:]
    assert [int(t) for t in parts[0].input_ids] + [int(t) for p in parts[1:] for t in p.input_ids[1:]] == ids
    # a document that fits is one part, as before; the first part is what build_sample gives
    assert len(build_samples(Record([], text="short"), tokenizer, cfg)) == 1
    assert build_sample(Record([], text=text), tokenizer, cfg, index=9).input_ids.tolist() == parts[0].input_ids.tolist()
    # <IMG_CONTEXT> in any part refuses the record, as for a document that fits
    with pytest.raises(RecordError, match="IMG_CONTEXT"):
        build_samples(Record([], text=text), tokenizer, data_config(max_tokens=16, image_token_id=ids[-20]))
    with pytest.raises(ValueError, match="long_text"):
        data_config(long_text="drop")


def test_with_long_text_cut_a_long_document_keeps_its_first_tokens_and_is_said_once(tokenizer, caplog, monkeypatch):
    import logging

    from nativevl.data import samples
    from nativevl.data.records import Record

    monkeypatch.setattr(samples, "_TRUNCATION_TOLD", [])
    cfg = data_config(max_tokens=16, long_text="cut")
    with caplog.at_level(logging.WARNING, logger="nativevl.data.samples"):
        for i in range(3):
            (sample,) = build_samples(Record([], text="one two three four five six " * 10), tokenizer, cfg, index=i)
            assert sample.num_tokens == 16
        assert len(build_sample(Record([], text="short"), tokenizer, cfg, index=3).input_ids) < 16
    warned = [r for r in caplog.records if "longer than a pack" in r.getMessage()]
    assert len(warned) == 1 and "record 0" in warned[0].getMessage() and "long_text=cut" in warned[0].getMessage()


def test_the_parts_of_long_documents_stream_once_each_and_resume_exactly_mid_document(tokenizer, tmp_path):
    from nativevl.data.pipeline import mean_tokens
    from nativevl.data.validate import validate

    rng = np.random.default_rng(1)
    lines = []
    for k in range(12):  # long documents (~6 parts of a 24-token pack) between short ones that fill open packs
        words = 60 if k % 3 == 0 else int(rng.integers(2, 8))
        lines.append({"text": " ".join(f"w{int(x)}" for x in rng.integers(0, 50, words)) + f" doc{k}"})
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "meta.json").write_text(json.dumps({"docs": {"root": "", "annotation": "docs.jsonl", "repeat_time": 1}}))
    specs = load_meta(tmp_path / "meta.json")
    cfg = data_config(max_tokens=24, max_records=12, read_once=True)
    lengths = [len(tokenizer(r["text"], add_special_tokens=False).input_ids) + 1 for r in lines]
    assert max(lengths) > 3 * 24

    def parts_of(batches):  # (record, tokens) of each document of each batch
        return [list(zip(b.indices, np.diff(b.cu_seqlens.numpy()).tolist(), strict=True)) for b in batches]

    ds = PackedDataset(specs, tokenizer, cfg)
    full = parts_of(make_loader(ds))
    from nativevl.data import pipeline  # where these lived before samples.py: still importable there

    assert pipeline.build_sample is build_sample and pipeline.build_samples is build_samples
    assert ds.sample(0).input_ids.tolist() == ds.samples(0)[0].input_ids.tolist()
    flat = [x for b in full for x in b]
    for i in range(12):  # every record's parts, all of them: its tokens plus one shared per extra part
        sizes = [d for j, d in flat if j == i]
        assert sum(sizes) - (len(sizes) - 1) == lengths[ds.mixture.locate(i)[1]]
    saved_parts = 0
    for stop in range(1, len(full)):
        tracker = StreamTracker(1.0)
        first = []
        for k, batch in enumerate(iterate_batches(make_loader(PackedDataset(specs, tokenizer, cfg)), tracker)):
            first.append(batch)
            if k + 1 == stop:
                break
        state = json.loads(json.dumps(tracker.state_dict()))
        saved_parts += sum(isinstance(e, list) for s in state["shards"].values() for buf in s["buffers"] + s.get("ready", [])
                           for e in buf)
        resumed = PackedDataset(specs, tokenizer, cfg)
        resumed.load_state_dict(state)
        assert parts_of(first) + parts_of(make_loader(resumed)) == full
    assert saved_parts  # some checkpoint held a later part waiting in a buffer ([index, part])
    # text_ratio in tokens measures whole documents (the tokens of all their parts); validation reads every part
    assert mean_tokens(resumed.sources[0], tokenizer, cfg, probes=12) == pytest.approx(sum(d for _, d in flat) / 12)
    assert validate(specs, tokenizer, cfg).counts == {}


def _text_of(tokenizer, n: int) -> str:
    """A text whose encoding (with the end token) is exactly n tokens."""
    words, out = "one two three four five six seven eight nine ten".split(), []
    size = lambda ws: len(tokenizer(" ".join(ws), add_special_tokens=False).input_ids) + 1
    while size(out) < n:
        out.append(next(w for w in words if size([*out, w]) <= n))
    assert size(out) == n
    return " ".join(out)


def test_a_resume_between_the_packs_one_document_completed_keeps_their_order(tokenizer, tmp_path, monkeypatch):
    """A 45-token document fills two 20-token packs at once; the state after the first kept the second among
    the open packs, so a resume there gave it after the pack the next document completed. A resume also
    rebuilt (tokenised) a waiting document once per waiting part, and counted it bad once per part."""
    texts = [_text_of(tokenizer, 13), _text_of(tokenizer, 45), _text_of(tokenizer, 5)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "meta.json").write_text(json.dumps({"docs": {"root": "", "annotation": "docs.jsonl"}}))
    specs = load_meta(tmp_path / "meta.json")
    cfg = data_config(max_tokens=20, read_once=True)
    sizes = lambda batches: [np.diff(b.cu_seqlens.numpy()).tolist() for b in batches]
    full = sizes(make_loader(PackedDataset(specs, tokenizer, cfg)))
    assert sorted(map(sum, full)) == [5, 20, 20, 20]  # three parts (20, 20, 7), the 7 and the 13 together
    for stop in range(1, len(full)):
        tracker = StreamTracker(1.0)
        first = list(itertools.islice(iterate_batches(make_loader(PackedDataset(specs, tokenizer, cfg)), tracker), stop))
        state = json.loads(json.dumps(tracker.state_dict()))
        for shard in state["shards"].values():  # a checkpoint from before "ready": made packs after the open ones
            older = {k: v for k, v in shard.items() if k != "ready"} | {"buffers": shard["buffers"] + shard["ready"]}
            resumed = PackedDataset(specs, tokenizer, cfg)
            resumed.load_state_dict({**state, "shards": {"0": older}})
            assert sizes(first) + sizes(make_loader(resumed)) == full, ("older", stop)
        resumed = PackedDataset(specs, tokenizer, cfg)
        resumed.load_state_dict(state)
        calls = []
        real = PackedDataset.samples
        monkeypatch.setattr(PackedDataset, "samples", lambda self, i: calls.append(i) or real(self, i))
        assert sizes(first) + sizes(make_loader(resumed)) == full, stop
        monkeypatch.setattr(PackedDataset, "samples", real)
        assert len(calls) == len(set(calls))  # each waiting document rebuilt once
    # a waiting document gone bad since the checkpoint is one bad record, however many of its parts wait
    tracker = StreamTracker(1.0)
    next(iterate_batches(make_loader(PackedDataset(specs, tokenizer, cfg)), tracker))
    state = json.loads(json.dumps(tracker.state_dict()))
    waiting = {e[0] for s in state["shards"].values() for pack in s["ready"] + s["buffers"] for e in pack
               if isinstance(e, list)}
    assert len(waiting) == 1
    resumed = PackedDataset(specs, tokenizer, cfg)
    resumed.load_state_dict(state)

    def gone_bad(self, i):
        if i in waiting:
            raise RecordError("malformed", "edited since")
        return real(self, i)

    monkeypatch.setattr(PackedDataset, "samples", gone_bad)
    assert [b.stats["rejected"] for b in make_loader(resumed)][-1] == {"malformed": 1}


def test_a_resume_at_another_world_size_deals_out_the_waiting_packs(tokenizer, tmp_path):
    """The waiting packs were dropped when the number of ranks or workers changed: a few records once, but
    a long document waits as many packs (a 2M-token one: ~120 of 16k tokens). They are now dealt out over
    the new shards, each pack to one, and trained there first."""
    from nativevl.train.checkpoint import reshard_data_state

    texts = [_text_of(tokenizer, 95), _text_of(tokenizer, 6), _text_of(tokenizer, 7)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "meta.json").write_text(json.dumps({"docs": {"root": "", "annotation": "docs.jsonl"}}))
    specs = load_meta(tmp_path / "meta.json")
    cfg = data_config(max_tokens=20, read_once=True)
    tracker = StreamTracker(1.0)
    for batch in iterate_batches(make_loader(PackedDataset(specs, tokenizer, cfg)), tracker):
        if any(part for part in np.diff(batch.cu_seqlens.numpy()) if part == 20):
            break  # the long document's first part: the others wait
    old = [tracker.state_dict()]
    waiting = sorted(json.dumps(p) for s in old[0]["shards"].values() for p in s["ready"] + s["buffers"])
    assert len(waiting) >= 3
    for world, workers in ((2, 1), (1, 2), (3, 2)):
        states = [reshard_data_state(old, rank, world, workers) for rank in range(world)]
        dealt = sorted(json.dumps(p) for st in states for s in st["shards"].values() for p in s["ready"] + s["buffers"])
        assert dealt == waiting  # every waiting pack, on one new shard each
        shards = [s for st in states for s in st["shards"].values()]
        holding = [s for s in shards if any(isinstance(e, list) for p in s["ready"] + s["buffers"] for e in p)]
        assert len(holding) == 1  # the long document's parts together: rebuilt (or counted bad) on one shard
    # a new rank trains what it was dealt
    ds = PackedDataset(specs, tokenizer, cfg, rank=0, world_size=2)
    ds.load_state_dict(reshard_data_state(old, 0, 2, 1))
    got = [[int(x) for x in np.diff(b.cu_seqlens.numpy())] for b in make_loader(ds)]
    assert got[0] == [20]
