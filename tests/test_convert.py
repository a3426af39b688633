"""`nativevl data convert`: ShareGPT / LLaVA, OpenAI / ms-swift and LLaMA-Factory data -> InternVL jsonl
that nativevl's loader (and InternVL's trainer) reads; refused records counted, kept, and limited."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from nativevl.cli import main
from nativevl.data.convert import ConversionAborted, Layout, convert


def png_bytes(colour: str, size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def write_jsonl(path, records) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def media(tmp_path):
    src = tmp_path / "src"
    (src / "imgs").mkdir(parents=True)
    Image.new("RGB", (40, 30), "red").save(src / "imgs" / "a.png")
    Image.new("RGB", (20, 50), "blue").save(src / "imgs" / "b.jpg")
    return src


def test_each_format_converts_to_the_internvl_record_it_means(tmp_path, media, tokenizer):
    """One record of each shape users bring, against the InternVL record it stands for; the output is
    then read by nativevl's loader and packed into training batches with no record refused."""
    green = png_bytes("green")
    data_url = "data:image/png;base64," + base64.b64encode(green).decode()
    records = [
        # ShareGPT / LLaVA / InternVL: one image without a placeholder gets "<image>\n" (InternVL's rule)
        {"id": "x1", "image": "imgs/a.png", "conversations": [{"from": "human", "value": "What colour?"},
                                                              {"from": "gpt", "value": "red"}]},
        # ms-swift / OpenAI messages, a system message, two images with their placeholders
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\n<image>\nSame?"},
                      {"role": "assistant", "content": "no"}], "images": ["imgs/a.png", "imgs/b.jpg"]},
        # OpenAI content parts with a data URL: the image is written beside the output, once
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                                   {"type": "text", "text": "And this?"}]},
                      {"role": "assistant", "content": "green"}]},
        # alpaca (LLaMA-Factory, ms-swift): instruction + "\n" + input, history before it, system
        {"instruction": "Add.", "input": "2+2", "output": "4", "history": [["hi", "hello"]], "system": "math"},
        # ms-swift query / response, with a history given as a Python literal and a bare base64 image
        {"query": "<image>Which?", "response": "the green one", "history": "[['start', 'ok']]",
         "images": [base64.b64encode(png_bytes("green", (9, 9))).decode()]},
        # ms-swift pair dicts, roles human/bot
        {"conversation": [{"human": "hey", "assistant": "yo"}, {"human": "bye", "assistant": "ciao"}]},
        {"conversations": [{"from": "user", "value": "q"}, {"from": "bot", "value": "a"}]},
        # ms-swift DPO: messages end with the chosen answer; a system message is kept with the pair
        {"messages": [{"role": "system", "content": "Pick."}, {"role": "user", "content": "<image>left or right?"},
                      {"role": "assistant", "content": "left"}], "rejected_response": "right", "images": ["imgs/a.png"]},
        # LLaMA-Factory alpaca ranking: chosen / rejected strings
        {"instruction": "Say yes.", "chosen": "yes", "rejected": "no"},
    ]
    write_jsonl(media / "train.jsonl", records)
    out = tmp_path / "out" / "train.jsonl"
    stats = convert([media / "train.jsonl"], out)
    assert (stats.records, stats.written, stats.pairs, stats.bad) == (9, 9, 2, 0)
    emb = sorted(p.name for p in (tmp_path / "out" / "train_images").iterdir())
    assert len(emb) == 2 and stats.images_written == 2
    green_file = next(n for n in emb if (tmp_path / "out" / "train_images" / n).read_bytes() == green)
    other = next(n for n in emb if n != green_file)
    human, gpt = lambda v: {"from": "human", "value": v}, lambda v: {"from": "gpt", "value": v}
    assert read_jsonl(out) == [
        {"id": "x1", "image": "../src/imgs/a.png", "conversations": [human("<image>\nWhat colour?"), gpt("red")]},
        {"image": ["../src/imgs/a.png", "../src/imgs/b.jpg"],
         "conversations": [{"from": "system", "value": "Be brief."}, human("<image>\n<image>\nSame?"), gpt("no")]},
        {"image": f"train_images/{green_file}", "conversations": [human("<image>\nAnd this?"), gpt("green")]},  # as -hf renders parts
        {"conversations": [{"from": "system", "value": "math"}, human("hi"), gpt("hello"), human("Add.\n2+2"), gpt("4")]},
        {"image": f"train_images/{other}", "conversations": [human("start"), gpt("ok"), human("<image>Which?"),
                                                             gpt("the green one")]},
        {"conversations": [human("hey"), gpt("yo"), human("bye"), gpt("ciao")]},
        {"conversations": [human("q"), gpt("a")]},
        {"image": "../src/imgs/a.png", "question": "<image>left or right?", "chosen": "left", "rejected": "right",
         "system": "Pick."},
        {"question": "Say yes.", "chosen": "yes", "rejected": "no"},
    ]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta == {"train": {"root": "", "annotation": "train.jsonl", "max_dynamic_patch": 12, "data_augment": False}}
    assert not (tmp_path / "out" / "train.rejects.jsonl").exists()

    from nativevl.data.pipeline import DataConfig
    from nativevl.data.records import Annotation, load_meta, parse_record
    from nativevl.data.samples import build_sample
    from nativevl.data.validate import validate

    cfg = DataConfig(max_tokens=4096, image_seq_length=2, image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
                     system_message=None, training=False)
    (spec,) = load_meta(tmp_path / "out" / "meta.json")
    assert validate([spec], tokenizer, cfg).bad == 0  # every image decodes, every record builds
    annotation = Annotation(spec)
    pair = build_sample(parse_record(annotation[7][1], spec, "t:8"), tokenizer, cfg)
    text = tokenizer.decode(pair.input_ids)
    assert text.startswith("<|im_start|>system\nPick.<|im_end|>") and text.endswith("left<|im_end|>\n")
    assert tokenizer.decode(pair.rejected[0]).endswith("right<|im_end|>\n")  # the pair keeps its system message too


def test_llamafactory_dataset_info_columns_tags_and_media_dir(tmp_path, media, capsys):
    """A LLaMA-Factory dataset is read as its dataset_info.json entry declares: custom columns and tags,
    images under the dataset folder, sharegpt ranking with one message per side; a media column the entry
    does not declare is not read (as LLaMA-Factory), KTO and tool records are refused."""
    info = {
        "mllm": {"file_name": "mllm.json", "formatting": "sharegpt",
                 "columns": {"messages": "msgs", "images": "pics", "system": "sys"},
                 "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}},
        "rank": {"file_name": "rank.jsonl", "formatting": "sharegpt", "ranking": True,
                 "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "images": "images"}},
        "kto": {"file_name": "kto.jsonl", "formatting": "sharegpt", "columns": {"kto_tag": "label"}},
        "hub": {"hf_hub_url": "someone/data"},
        "oai": {"file_name": "x.json", "formatting": "openai"},
    }
    (media / "dataset_info.json").write_text(json.dumps(info))
    (media / "mllm.json").write_text(json.dumps([
        {"msgs": [{"role": "user", "content": "<image>Describe."}, {"role": "assistant", "content": "A red box."}],
         "pics": ["imgs/a.png"], "sys": "You look at images."},
        {"msgs": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "images": ["imgs/a.png"]},
        {"msgs": [{"role": "human", "content": "tagged differently"}, {"role": "assistant", "content": "x"}]},
    ]))
    write_jsonl(media / "rank.jsonl", [
        {"conversations": [{"from": "human", "value": "<image>Colour?"}], "images": ["imgs/b.jpg"],
         "chosen": {"from": "gpt", "value": "blue"}, "rejected": {"from": "gpt", "value": "red"}},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}],
         "chosen": {"from": "gpt", "value": "d"}, "rejected": {"from": "gpt", "value": "e"}},
    ])
    write_jsonl(media / "kto.jsonl", [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                                       "label": False}])
    out = tmp_path / "lf"
    args = ["data", "convert", "--dataset_info", str(media / "dataset_info.json"), "--max_reject_fraction", "0.5"]
    assert main([*args, "--dataset", "mllm", "--out", str(out / "mllm.jsonl")]) == 0
    assert read_jsonl(out / "mllm.jsonl") == [
        {"image": "../src/imgs/a.png", "conversations": [{"from": "system", "value": "You look at images."},
                                                         {"from": "human", "value": "<image>Describe."},
                                                         {"from": "gpt", "value": "A red box."}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},  # "images" undeclared
    ]
    (bad,) = read_jsonl(out / "mllm.rejects.jsonl")  # "human" is not this entry's user tag
    assert bad["kind"] == "malformed" and "unknown role 'human'" in bad["error"] and bad["where"] == "mllm.json:[2]"
    assert bad["record"]["msgs"][0]["content"] == "tagged differently"
    assert main([*args, "--dataset", "rank", "--out", str(out / "rank.jsonl")]) == 0
    assert read_jsonl(out / "rank.jsonl") == [
        {"image": "../src/imgs/b.jpg", "question": "<image>Colour?", "chosen": "blue", "rejected": "red"}]
    (bad,) = read_jsonl(out / "rank.rejects.jsonl")
    assert bad["kind"] == "unsupported" and "one question" in bad["error"]
    assert main([*args, "--dataset", "kto", "--out", str(out / "kto.jsonl")]) == 1  # all refused: stopped
    assert "KTO" in capsys.readouterr().err and not (out / "kto.jsonl").exists()
    assert json.loads((out / "meta.json").read_text()).keys() == {"mllm", "rank"}
    assert main([*args, "--dataset", "hub", "--out", str(out / "hub.jsonl")]) == 2
    assert "nothing is downloaded" in capsys.readouterr().err
    assert main([*args, "--dataset", "oai", "--out", str(out / "oai.jsonl")]) == 2
    assert main([*args, "--dataset", "nope", "--out", str(out / "nope.jsonl")]) == 2
    assert "no dataset 'nope'" in capsys.readouterr().err
    assert main(["data", "validate", str(out / "meta.json")]) == 0


def test_refused_records_are_counted_kept_whole_and_limited(tmp_path, media):
    """Each kind of record nativevl cannot train on is refused by record, written whole (a line that is
    not JSON as its text) with its kind to OUT.rejects.jsonl; past --max_reject_fraction nothing is
    written but the rejects, and an existing output is not replaced without overwrite."""
    ok = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    (media / "clip.mp4").write_bytes(b"\x00" * 16)
    bad = [
        '{"conversations": [oops',  # malformed: not JSON
        {"messages": [{"role": "user", "content": "call it"}, {"role": "assistant", "content": None,
                                                               "tool_calls": [{"name": "f"}]}]},  # unsupported
        {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}, {"role": "assistant", "content": "z"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": '[{"name": "f"}]'},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": True},  # KTO
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "image": "https://x/a.png"},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "image": "imgs/none.png"},
        {"conversations": [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "a"}], "image": "imgs/a.png"},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image> a"}], "image": "imgs/a.png"},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},  # nothing to learn
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
         "images": ["imgs/a.png"], "videos": ["clip.mp4"]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "rejected_response": "a"},
        {"image": "data:image/png;base64," + base64.b64encode(b"not an image").decode(), **ok},
        {"instruction": "q"},
    ]
    video = {"conversations": [{"from": "human", "value": "What happens?"}, {"from": "gpt", "value": "x"}], "video": "clip.mp4"}
    write_jsonl(media / "mixed.jsonl", [video] + [ok] * 20 + bad)
    out = tmp_path / "o" / "mixed.jsonl"
    stats = convert([media / "mixed.jsonl"], out, max_reject_fraction=0.5)
    assert (stats.records, stats.written) == (35, 21)
    assert stats.counts == {"malformed": 2, "unsupported": 6, "missing_file": 1, "placeholder_mismatch": 2,
                            "no_assistant_turn": 2, "unreadable_image": 1}
    assert read_jsonl(out)[0] == {"video": "../src/clip.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "x"}]}
    rejects = read_jsonl(out.with_name("mixed.rejects.jsonl"))
    assert [r["where"] for r in rejects] == [f"mixed.jsonl:{i}" for i in range(22, 36)]
    assert rejects[0]["record"] == '{"conversations": [oops' and rejects[0]["kind"] == "malformed"
    assert [r["record"] for r in rejects[1:]] == bad[1:]  # every refused record, whole

    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        convert([media / "mixed.jsonl"], out, max_reject_fraction=0.5)
    before, rejects_before = out.read_text(), out.with_name("mixed.rejects.jsonl").read_text()
    with pytest.raises(ConversionAborted, match=r"14 of 35 records rejected.*mixed.stopped.rejects.jsonl"):
        convert([media / "mixed.jsonl"], out, max_reject_fraction=0.1, overwrite=True)
    assert out.read_text() == before and not out.with_name("mixed.jsonl.tmp").exists()  # the old output stays
    assert out.with_name("mixed.rejects.jsonl").read_text() == rejects_before  # and its rejects
    assert len(read_jsonl(out.with_name("mixed.stopped.rejects.jsonl"))) == 14
    write_jsonl(media / "long.jsonl", [ok] * 190 + bad[1:2] * 30 + [ok] * 100)  # stops as soon as it is over
    with pytest.raises(ConversionAborted, match="11 of 201 records"):
        convert([media / "long.jsonl"], tmp_path / "o" / "long.jsonl")
    write_jsonl(media / "early.jsonl", [ok] * 10 + bad[1:2] * 30 + [ok] * 200)  # under 200 records when refused:
    with pytest.raises(ConversionAborted, match="30 of 240 records"):  # the whole file's fraction decides
        convert([media / "early.jsonl"], tmp_path / "o" / "early.jsonl")


def test_parquet_with_embedded_image_bytes(tmp_path):
    """Hugging Face datasets exported to parquet hold images as {"bytes", "path"}: written out once each."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    red, blue = png_bytes("red"), png_bytes("blue")
    rows = [{"images": [{"bytes": red, "path": None}], "messages": [
                {"role": "user", "content": "<image>colour?"}, {"role": "assistant", "content": "red"}]},
            {"images": [{"bytes": blue, "path": "b.png"}, {"bytes": red, "path": None}], "messages": [
                {"role": "user", "content": "<image><image>same?"}, {"role": "assistant", "content": "no"}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train-00000.parquet")
    stats = convert([tmp_path], tmp_path / "out" / "hf.jsonl", Layout())  # a folder of parquet shards
    assert (stats.written, stats.images_written) == (2, 2)
    recs = read_jsonl(tmp_path / "out" / "hf.jsonl")
    folder = tmp_path / "out"
    assert (folder / recs[0]["image"]).read_bytes() == red
    assert [(folder / p).read_bytes() for p in recs[1]["image"]] == [blue, red]
    assert recs[1]["image"][1] == recs[0]["image"]  # the same bytes: one file


def test_inputs_found_in_the_wild(tmp_path, media):
    """Shapes real exports have: parquet nulls in the columns a row does not use, JSON Lines or columns
    under a .json name, transformers / TRL image parts with the images in their own column, line-wrapped
    base64, a symlinked image (kept as its link, not the cache blob it points to), several input folders
    with their own images, and records that once stopped the whole run (a lone surrogate, a history that
    is not a list, image bytes of the wrong type) now refused one by one."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    red = png_bytes("red")
    sft = {"messages": [{"role": "user", "content": "<image>colour?"}, {"role": "assistant", "content": "red"}],
           "images": [{"bytes": red, "path": None}], "rejected_response": None}
    dpo = {"messages": [{"role": "user", "content": "pick"}, {"role": "assistant", "content": "a"}],
           "images": None, "rejected_response": "b"}
    folder = tmp_path / "parquet"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([sft, dpo]), folder / "mixed.parquet")  # each row has both columns
    stats = convert([folder], tmp_path / "o1" / "p.jsonl")
    assert (stats.written, stats.pairs, stats.bad) == (2, 1, 0)

    other = tmp_path / "other"
    (other / "imgs").mkdir(parents=True)
    Image.new("RGB", (30, 30), "white").save(other / "imgs" / "w.png")
    (other / "blobs").mkdir()
    Image.new("RGB", (30, 30), "black").save(other / "blobs" / "abc123", "PNG")
    (other / "imgs" / "link.png").symlink_to(other / "blobs" / "abc123")
    wrapped = base64.encodebytes(png_bytes("green", (40, 40))).decode()  # 76-column lines
    conv = lambda q: [{"role": "user", "content": q}, {"role": "assistant", "content": "x"}]
    (other / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in [
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]},
                      {"role": "assistant", "content": "white"}], "images": ["imgs/w.png"]},  # TRL's image parts
        {"messages": conv("<image>b64"), "images": [wrapped]},
        {"messages": conv("<image>link"), "images": ["imgs/link.png"]},
        {"messages": conv("q\ud83d"), "images": []},  # a lone surrogate (escaped in the file)
        {"query": "q", "response": "r", "history": "{[1]: 2}"},
        {"messages": conv("<image>q"), "images": [{"bytes": 5}]},
        {"messages": conv("q"), "audios": ["a.wav"]},
        {"system": "S", "messages": conv("q"), "rejected_messages": [conv("q")[0], {"role": "assistant", "content": "y"}]},
    ]))
    (media / "cols.json").write_text(json.dumps({"query": ["a?", "b?"], "response": ["a", "b"]}))  # columns
    write_jsonl(media / "own.jsonl", [{"image": "imgs/a.png", "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}])
    out = tmp_path / "o2" / "all.jsonl"
    stats = convert([other / "lines.json", media / "cols.json", media / "own.jsonl"], out, max_reject_fraction=0.5)
    assert stats.counts == {"malformed": 3, "unsupported": 1}, stats.format()
    records = read_jsonl(out)
    assert records[0] == {"image": "../other/imgs/w.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "white"}]}
    assert Image.open(out.parent / records[1]["image"]).size == (40, 40)
    assert records[2]["image"] == "../other/imgs/link.png"
    assert records[3] == {"question": "q", "chosen": "x", "rejected": "y", "system": "S"}
    assert [r["conversations"][0]["value"] for r in records[4:]] == ["a?", "b?", "<image>\nq"]
    assert records[6]["image"] == "../src/imgs/a.png"  # its own folder's image, not the first input's
    reasons = [r["error"] for r in read_jsonl(out.with_name("all.rejects.jsonl"))]
    assert "lone UTF-16 surrogate" in reasons[0] and "history" in reasons[1] and "bytes" in reasons[2]
    assert "audio" in reasons[3]


def test_a_stopped_run_leaves_no_images_and_a_damaged_meta_is_not_overwritten(tmp_path):
    ok = {"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}],
          "images": ["data:image/png;base64," + base64.b64encode(png_bytes("red")).decode()]}
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "a"}]}
    write_jsonl(tmp_path / "in.jsonl", [ok, bad, bad])
    with pytest.raises(ConversionAborted):
        convert([tmp_path / "in.jsonl"], tmp_path / "out" / "d.jsonl")
    assert not (tmp_path / "out" / "d_images").exists()  # the image of the accepted record is gone too, and its folder
    blue = "data:image/png;base64," + base64.b64encode(png_bytes("blue")).decode()
    half = {"messages": [{"role": "user", "content": "<image><image>q"}, {"role": "assistant", "content": "a"}],
            "images": [blue, "missing.png"]}  # its first image is written before the second is found missing
    write_jsonl(tmp_path / "half.jsonl", [ok, half])
    stats = convert([tmp_path / "half.jsonl"], tmp_path / "out2" / "h.jsonl", max_reject_fraction=0.5)
    assert (stats.written, stats.images_written) == (1, 1)
    assert len(list((tmp_path / "out2" / "h_images").iterdir())) == 1  # the refused record's image is gone
    (tmp_path / "out" / "meta.json").write_text('{"mine": {"annotation": "m.jsonl"},}')  # a trailing comma
    write_jsonl(tmp_path / "in.jsonl", [ok])
    with pytest.raises(ValueError, match="meta.json: not valid JSON"):
        convert([tmp_path / "in.jsonl"], tmp_path / "out" / "d.jsonl")
    assert '"mine"' in (tmp_path / "out" / "meta.json").read_text()


def test_a_held_out_share_for_validation(tmp_path):
    """--val_fraction holds out records (the same ones every run) into OUT_val.jsonl, listed in
    meta_val.json for `train --val_meta`; together with the training file they are every record once."""
    from nativevl.data.records import load_meta

    records = [{"id": i, "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]}
               for i in range(400)]
    write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "d" / "train.jsonl"
    stats = convert([tmp_path / "in.jsonl"], out, val_fraction=0.1, seed=3)
    train, val = read_jsonl(out), read_jsonl(tmp_path / "d" / "train_val.jsonl")
    assert stats.held_out == len(val) and 20 < len(val) < 65 and len(train) + len(val) == 400
    assert sorted(r["id"] for r in train + val) == list(range(400))
    (spec,) = load_meta(tmp_path / "d" / "meta_val.json")
    assert spec.name == "train_val" and [s.name for s in load_meta(tmp_path / "d" / "meta.json")] == ["train"]
    first = (out.read_text(), (tmp_path / "d" / "train_val.jsonl").read_text())
    convert([tmp_path / "in.jsonl"], out, val_fraction=0.1, seed=3, overwrite=True)
    assert (out.read_text(), (tmp_path / "d" / "train_val.jsonl").read_text()) == first  # the same split
    convert([tmp_path / "in.jsonl"], out, val_fraction=0.1, seed=4, overwrite=True)
    assert out.read_text() != first[0]  # another seed, another split
    convert([tmp_path / "in.jsonl"], out, overwrite=True)  # no held-out share now: the old one would overlap
    assert len(read_jsonl(out)) == 400 and not (tmp_path / "d" / "train_val.jsonl").exists()
    assert not (tmp_path / "d" / "meta_val.json").exists()
    write_jsonl(tmp_path / "few.jsonl", records[:3])
    stats = convert([tmp_path / "few.jsonl"], tmp_path / "d" / "few.jsonl", val_fraction=0.05)
    assert stats.held_out == 0 and not (tmp_path / "d" / "few_val.jsonl").exists()  # an empty set is not written
    # a held-out file of the user's own (listed with another root) is never touched by a fresh conversion
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "train_val.jsonl").write_text("mine\n")
    (tmp_path / "u" / "meta_val.json").write_text(json.dumps({"train_val": {"root": "/elsewhere/",
                                                                           "annotation": "train_val.jsonl"}}))
    convert([tmp_path / "in.jsonl"], tmp_path / "u" / "train.jsonl")
    assert (tmp_path / "u" / "train_val.jsonl").read_text() == "mine\n"


def test_a_held_out_split_keeps_a_pictures_questions_together(tmp_path):
    """The split was drawn by record: the questions about one picture fell on both sides, so the
    validation loss measured pictures the model had trained on."""
    pics = tmp_path / "pics"
    pics.mkdir()
    for i in range(40):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(pics / f"{i}.png")
    records = [{"image": f"pics/{i % 40}.png", "conversations": [{"from": "human", "value": f"q{j}"},
                                                                 {"from": "gpt", "value": "a"}]}
               for j, i in enumerate(range(200))]
    records += [{"conversations": [{"from": "human", "value": f"t{i}"}, {"from": "gpt", "value": "a"}]} for i in range(100)]
    write_jsonl(tmp_path / "in.jsonl", records)
    stats = convert([tmp_path / "in.jsonl"], tmp_path / "d" / "train.jsonl", val_fraction=0.25, seed=1)
    train, val = read_jsonl(tmp_path / "d" / "train.jsonl"), read_jsonl(tmp_path / "d" / "train_val.jsonl")
    assert len(train) + len(val) == 300 and stats.held_out == len(val)
    seen, held = {r["image"] for r in train if "image" in r}, {r["image"] for r in val if "image" in r}
    assert held and not seen & held and len(seen | held) == 40
    assert all(sum(r.get("image") == image for r in val) == 5 for image in held)  # each with all its questions
    assert 0 < sum("image" not in r for r in val) < 100  # text-only records are drawn one by one



def test_a_held_out_split_keeps_records_joined_by_a_later_picture_together(tmp_path):
    """Only a record's first picture chose its side: a record about pictures 1 and 2 could be held out
    while the questions about picture 2 alone were trained on. Records sharing any picture now form one
    group, whatever the order they come in."""
    pics = tmp_path / "pics"
    pics.mkdir()
    for i in range(120):
        Image.new("RGB", (8, 8), (i, 1, 0)).save(pics / f"{i}.png")
    groups = {}
    records = []
    for g in range(40):  # a, b, c: b alone first, then a with b, c alone, then c with a (joined last)
        a, b, c = (f"pics/{3 * g + k}.png" for k in range(3))
        for image in (b, [a, b], c, [c, a], a):
            records.append({"image": image, "conversations": [{"from": "human", "value": "<image>" * (
                len(image) if isinstance(image, list) else 1) + f" q{len(records)}"}, {"from": "gpt", "value": "x"}]})
            groups[f"q{len(records) - 1}"] = g
    write_jsonl(tmp_path / "in.jsonl", records)
    stats = convert([tmp_path / "in.jsonl"], tmp_path / "d" / "train.jsonl", val_fraction=0.3, seed=2)
    train, val = read_jsonl(tmp_path / "d" / "train.jsonl"), read_jsonl(tmp_path / "d" / "train_val.jsonl")
    assert len(train) + len(val) == 200 and stats.held_out == len(val)
    side = lambda rows: {groups[r["conversations"][0]["value"].split()[-1]] for r in rows}
    assert side(val) and side(train) and not side(val) & side(train)  # every group on one side, whole
    assert [r["conversations"][0]["value"] for r in train] == [r["conversations"][0]["value"] for r in records
                                                               if groups[r["conversations"][0]["value"].split()[-1]]
                                                               in side(train)]  # in the input's order

def test_ms_swift_grounding_becomes_internvls_ref_and_box(tmp_path, media):
    """ms-swift's <ref-object> / <bbox> tags with `objects` become InternVL's <ref>name</ref> and
    <box>[[x1, y1, x2, y2]]</box> on a 0-1000 grid of the box's image, from pixels or from 0-1, in order
    over every turn, as ms-swift's InternVL template writes them."""
    Image.new("RGB", (40, 30)).save(media / "imgs" / "c.png")
    ask = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    write_jsonl(media / "g.jsonl", [
        {"messages": ask("<image>Find <ref-object>", "<bbox>"), "images": ["imgs/c.png"],
         "objects": {"ref": ["cat"], "bbox": [[10, 10, 40, 30]]}},
        {"messages": ask("<image><image>What is at <bbox>?", "<ref-object>"), "images": ["imgs/a.png", "imgs/c.png"],
         "objects": {"ref": ["dog"], "bbox": [[0.1, 0.2, 0.5, 0.6]], "bbox_type": "norm1", "image_id": [1]}},
        {"messages": ask("<image>Find <ref-object> and <ref-object>", "<bbox>"), "images": ["imgs/c.png"],
         "objects": {"ref": ["cat"], "bbox": [[1, 2, 3, 4]]}},  # two names asked, one given
        {"messages": ask("<image>Find <ref-object>", "<bbox>"), "images": ["imgs/c.png"],
         "objects": {"ref": ["cat"], "bbox": [[1, 2, 3, 4]], "image_id": [3]}},
    ])
    out = tmp_path / "g" / "g.jsonl"
    stats = convert([media / "g.jsonl"], out, max_reject_fraction=0.9)
    assert stats.counts == {"placeholder_mismatch": 1, "malformed": 1}
    first, second = read_jsonl(out)
    assert [t["value"] for t in first["conversations"]] == ["<image>Find <ref>cat</ref>",
                                                            "<box>[[250, 333, 1000, 1000]]</box>"]
    assert [t["value"] for t in second["conversations"]] == ["<image><image>What is at <box>[[100, 200, 500, 600]]</box>?",
                                                             "<ref>dog</ref>"]


def test_bare_image_parts_take_the_column_images_where_they_stand(tmp_path, media):
    """A message mixing a bare {"type": "image"} part (its image in the images column) with an image_url
    part: each placeholder gets its own picture (the column's went after the inline ones: mispaired)."""
    blue = "data:image/png;base64," + base64.b64encode(png_bytes("blue")).decode()
    parts = [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image_url", "image_url": {"url": blue}}]
    write_jsonl(media / "mix.jsonl", [
        {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "red, blue"}],
         "images": ["imgs/a.png"]},
        {"messages": [{"role": "user", "content": parts[:1] * 2}, {"role": "assistant", "content": "x"}],
         "images": ["imgs/a.png"]},  # two bare parts, one image
        # an <image> typed in a text part is the column's image where it stands (the parts' went first)
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "<image>\nand"}, parts[2]]},
                      {"role": "assistant", "content": "red, blue"}], "images": ["imgs/a.png"]},
        {"messages": [{"role": "user", "content": [parts[2], {"type": "text", "text": "and <image>"}]},
                      {"role": "assistant", "content": "blue, red"}], "images": ["imgs/a.png"]},
    ])
    out = tmp_path / "o" / "mix.jsonl"
    stats = convert([media / "mix.jsonl"], out, max_reject_fraction=0.9)
    record, typed_first, typed_last = read_jsonl(out)
    assert record["image"][0] == "../src/imgs/a.png" and record["image"][1].startswith("mix_images/")
    assert record["conversations"][0]["value"] == "<image>\nand<image>\n"
    assert typed_first["image"] == record["image"] and typed_first["conversations"][0]["value"] == "<image>\nand<image>\n"
    assert typed_last["image"] == record["image"][::-1]
    assert typed_last["conversations"][0]["value"] == "<image>\nand <image>"
    assert stats.counts == {"placeholder_mismatch": 1}


def test_records_review_found_lost_or_refused(tmp_path):
    """Each of these was refused, or converted into something else: an --out through a symlinked folder
    (its images named relative to the unresolved path), a .json file of one record (read as columns),
    instruction + response (Dolly), an empty alias beside the question, a grounding box on an
    EXIF-rotated photo (scaled by the stored size, past 1000)."""
    import os
    import re

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (20, 10), "red").save(tmp_path / "imgs" / "a.png")
    (tmp_path / "elsewhere" / "out").mkdir(parents=True)
    os.symlink(tmp_path / "elsewhere" / "out", tmp_path / "out")
    record = {"messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "red"}],
              "images": ["imgs/a.png"]}
    (tmp_path / "one.json").write_text(json.dumps(record))
    write_jsonl(tmp_path / "qa.jsonl", [{"instruction": "Say hi.", "response": "hi"},
                                        {"query": "", "question": "What is 2+2?", "response": "4"}])
    stats = convert([tmp_path / "one.json", tmp_path / "qa.jsonl"], tmp_path / "out" / "train.jsonl")
    assert stats.bad == 0, stats.format()
    records = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert (tmp_path / "out" / records[0]["image"]).is_file()
    assert [r["conversations"][0]["value"] for r in records[1:]] == ["Say hi.", "What is 2+2?"]
    assert [r["conversations"][1]["value"] for r in records[1:]] == ["hi", "4"]
    im = Image.new("RGB", (400, 100), "red")  # stored 400 x 100, shown 100 x 400
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    write_jsonl(tmp_path / "ground.jsonl", [{
        "messages": [{"role": "user", "content": "<image>find <ref-object>"}, {"role": "assistant", "content": "<bbox>"}],
        "images": ["rot.jpg"], "objects": {"ref": ["bar"], "bbox": [[0, 0, 100, 400]]}}])
    convert([tmp_path / "ground.jsonl"], tmp_path / "g" / "train.jsonl")
    answer = read_jsonl(tmp_path / "g" / "train.jsonl")[0]["conversations"][-1]["value"]
    assert [int(x) for x in re.findall(r"\d+", answer)] == [0, 0, 1000, 1000]


def test_reconverting_keeps_the_meta_entry_and_never_reads_its_own_output(tmp_path, media, capsys):
    """A reconversion (--overwrite) rebuilt its meta entry, losing the user's repeat_time and tile cap,
    and added a second entry when the user had renamed it (trained twice); a dataset of another file
    under the output's name was replaced without --overwrite; a folder holding --out, converted again,
    read the earlier output, its held-out and rejects files (and its meta.json) as input records."""
    ok = lambda i: {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "in.jsonl", [ok(i) for i in range(20)] + [{"messages": [{"role": "user", "content": "x"}]}])
    out = data / "conv.jsonl"
    args = ["data", "convert", str(data), "--out", str(out), "--val_fraction", "0.2", "--max_reject_fraction", "0.1"]
    assert main(args) == 0
    meta = json.loads((data / "meta.json").read_text())
    meta["my_sft"] = {**meta.pop("conv"), "repeat_time": 3, "max_dynamic_patch": 6, "length": 16}
    (data / "meta.json").write_text(json.dumps(meta))
    first = (out.read_text(), (data / "conv_val.jsonl").read_text())
    for _ in range(2):  # the folder now holds conv.jsonl, conv_val.jsonl, conv.rejects.jsonl and two meta files
        assert main([*args, "--overwrite"]) == 0
        assert "(dataset 'my_sft')" in capsys.readouterr().out
        assert (out.read_text(), (data / "conv_val.jsonl").read_text()) == first  # the same 20 records, split alike
    assert json.loads((data / "meta.json").read_text()) == {"my_sft": {
        "root": "", "annotation": "conv.jsonl", "max_dynamic_patch": 6, "data_augment": False, "repeat_time": 3}}
    assert main([*args, "--overwrite", "--max_dynamic_patch", "4"]) == 0  # a setting given is a setting changed
    assert json.loads((data / "meta.json").read_text())["my_sft"]["max_dynamic_patch"] == 4
    capsys.readouterr()
    with pytest.raises(ValueError, match="is one of this conversion's outputs"):
        convert([out], out, overwrite=True)

    other = tmp_path / "other"
    other.mkdir()
    write_jsonl(other / "train.jsonl", [ok(0)])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "meta.json").write_text(json.dumps({"train": {"annotation": "../other/train.jsonl"}}))
    with pytest.raises(ValueError, match="already lists a dataset 'train' reading '../other/train.jsonl'"):
        convert([data / "in.jsonl"], tmp_path / "mine" / "train.jsonl", max_reject_fraction=0.1)
    assert not (tmp_path / "mine" / "train.jsonl").exists()
    convert([data / "in.jsonl"], tmp_path / "mine" / "train.jsonl", max_reject_fraction=0.1, overwrite=True)
    assert json.loads((tmp_path / "mine" / "meta.json").read_text())["train"]["annotation"] == "train.jsonl"


def test_training_marks_and_two_image_keys_are_refused_not_dropped(tmp_path, media):
    """A message marked not to be trained on (ms-swift's loss, axolotl's weight / train / training /
    train_detail) was kept and trained on unless it was `"loss": false` exactly; a record with both
    `images` and `image` kept one and dropped the other without a word."""
    q, a = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
    marked = [{**a, "loss": 0}, {**a, "loss": "false"}, {**a, "weight": 0}, {**a, "train": False},
              {**a, "training": "no"}, {**a, "train_detail": [{"begin_offset": 0, "end_offset": 1, "train": True}]}]
    kept = [{**a, "loss": True}, {**a, "weight": 1}, {**a, "weight": None}]
    records = ([{"messages": [q, m]} for m in marked] + [{"messages": [{**q, "loss": True}, a]},
                                                         {"messages": [q, {**a, "weight": 0.5}]}]
               + [{"messages": [q, m]} for m in kept] + [{"messages": [{**q, "weight": 0}, a]}]
               + [{"images": ["imgs/a.png"], "image": "imgs/b.jpg", "messages": [q, a]},
                  {"images": ["imgs/a.png"], "image": "imgs/a.png", "messages": [q, a]}])
    write_jsonl(media / "marks.jsonl", records)
    out = tmp_path / "o" / "marks.jsonl"
    stats = convert([media / "marks.jsonl"], out, max_reject_fraction=1)
    assert stats.written == 5 and stats.counts == {"unsupported": 7, "malformed": 2}
    rejects = read_jsonl(out.with_name("marks.rejects.jsonl"))
    assert [r["where"] for r in rejects] == [f"marks.jsonl:{i}" for i in (1, 2, 3, 4, 5, 6, 7, 8, 13)]
    errors = {r["where"].split(":")[1]: r["error"] for r in rejects}
    assert "not to be trained on" in errors["1"] and "train_detail" in errors["6"]
    assert "user turn marked to be trained on" in errors["7"] and "cannot read the training mark" in errors["8"]
    assert "both 'images' and 'image' are given, and differ" in errors["13"]
    assert read_jsonl(out)[-1]["image"] == "../src/imgs/a.png"  # the same image under both keys is one image
