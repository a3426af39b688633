"""Images, processor, chat template and positions against transformers and the reference formulas."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import transformers
from oracle import internvl_image_processor, internvl_processor
from PIL import Image

from nativevl.data import images as img
from nativevl.data.positions import document_positions, v2pe_positions
from nativevl.data.processor import Processor
from nativevl.data.template import IGNORE_INDEX, encode_conversation, render_chat


def random_sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    sizes = [(int(w), int(h)) for w, h in rng.integers(16, 1400, size=(n - 8, 2))]
    # extreme aspect ratios, exact ties, tiny and exact-tile images
    return sizes + [(2000, 40), (40, 2000), (1300, 20), (448, 448), (896, 448), (10, 10), (1344, 448), (600, 1800)]


def test_tiles_match_transformers_on_200_sizes():
    processor = internvl_image_processor()
    for w, h in random_sizes(200):
        image = Image.fromarray(np.random.default_rng(w * h).integers(0, 255, (h, w, 3), dtype=np.uint8))
        ref = processor(images=image, return_tensors="pt")
        got = img.image_to_tiles(image)
        assert got.shape == ref["pixel_values"].shape, (w, h)
        assert got.shape[0] == int(ref["num_patches"][0])
        assert (got - ref["pixel_values"]).abs().max().item() < 1e-4, (w, h)


@pytest.mark.parametrize("case", ["single", "multi", "text"])
def test_processor_matches_transformers_internvl_processor(case, tokenizer):
    rng = np.random.default_rng(1)
    pics = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in [(800, 600), (120, 300), (60, 60)]]
    if case == "single":
        text, images = ["<IMG_CONTEXT>\nwhat is this?"], [[pics[0]]]
    elif case == "multi":
        text = ["one <IMG_CONTEXT> two <IMG_CONTEXT>", "<IMG_CONTEXT> and the cat"]
        images = [[pics[1], pics[2]], [pics[0]]]
    else:
        text, images = ["the quick brown fox", "one two"], None
    oracle = internvl_processor(tokenizer, image_seq_length=4)
    ref = oracle(text=text, images=images, return_tensors="pt", padding=True)
    ours = Processor(tokenizer, image_seq_length=4)
    got = ours(text=text, images=images)
    assert torch.equal(got["input_ids"], ref["input_ids"])
    assert torch.equal(got["attention_mask"], ref["attention_mask"])
    if images is None:
        assert "pixel_values" not in got
    else:
        assert (got["pixel_values"] - ref["pixel_values"]).abs().max().item() < 1e-4
    # InternVL's own <image> placeholder works the same way
    alt = ours(text=[t.replace("<IMG_CONTEXT>", "<image>") for t in text], images=images)
    assert torch.equal(alt["input_ids"], got["input_ids"])


def test_processor_from_pretrained_reads_checkpoint_files(tmp_path, tokenizer):
    from test_model import make_model

    make_model().save_pretrained(tmp_path, tokenizer=tokenizer)
    proc = Processor.from_pretrained(tmp_path)
    assert proc.image_size == 56 and proc.image_seq_length == 4 and proc.max_patches == 12
    out = proc(text="<image>\nhi", images=Image.new("RGB", (100, 50)))
    assert out["pixel_values"].shape == (3, 3, 56, 56)
    with pytest.raises(ValueError, match="1 image placeholder.*0 image"):
        proc(text="<image>\nhi")


def test_template_equals_the_tokenizer_chat_template(tokenizer):
    conversation = [
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "what is one two?"},
        {"from": "gpt", "value": "three four"},
        {"from": "human", "value": "and the fox?"},
        {"from": "gpt", "value": "quick brown"},
    ]
    messages = [{"role": {"system": "system", "human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]}
                for t in conversation]
    ref_text = tokenizer.apply_chat_template(messages, tokenize=False)
    ids, labels = encode_conversation(tokenizer, conversation, system_message="ignored: the record's system wins")
    assert tokenizer.decode(ids) == ref_text
    assert ids == tokenizer(ref_text, add_special_tokens=False).input_ids
    assert render_chat(messages[:2], system_message=None) == tokenizer.apply_chat_template(
        messages[:2], tokenize=False, add_generation_prompt=True
    )
    # labels: exactly the assistant contents and their <|im_end|>
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    assert spans == ["three four<|im_end|>", "quick brown<|im_end|>"]


def test_template_images_and_default_placeholder(tokenizer):
    ids, labels = encode_conversation(
        tokenizer, [{"from": "human", "value": "describe"}, {"from": "gpt", "value": "a fox"}],
        tiles_per_image=[2], image_seq_length=3, system_message=None,
    )
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 6 + "</img>\ndescribe<|im_end|>")
    with pytest.raises(ValueError, match="2 <image> placeholder"):
        encode_conversation(tokenizer, [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}],
                            tiles_per_image=[1], image_seq_length=3)


def test_v2pe_positions_follow_the_reference():
    image = 9
    ids = np.array([1, 2, 8] + [image] * 8 + [3, 4, 8] + [image] * 4 + [3, 5])
    # delta = 1 is exactly the integer encoding
    assert np.array_equal(v2pe_positions(ids, image, [1.0, 1.0]), np.arange(len(ids), dtype=np.float32))
    got = v2pe_positions(ids, image, [1 / 4, 1 / 256])
    expect = [0, 1, 2]  # text, then <img> at 2
    expect += [2 + k / 4 for k in range(1, 9)]  # 8 visual tokens: 2.25 ... 4.0
    last = np.ceil(expect[-1])  # 4
    expect += [last + 1, last + 2, last + 3]  # </img>, text, <img>: 5, 6, 7
    expect += [7 + k / 256 for k in range(1, 5)]  # 7.0039 ... 7.0156
    last = np.ceil(expect[-1])  # 8
    expect += [last + 1, last + 2]
    assert np.array_equal(got, np.asarray(expect, dtype=np.float32))
    assert got.dtype == np.float32
    rnd = document_positions(ids, image, v2pe="random", rng=np.random.default_rng(0))
    steps = np.diff(rnd[3:11])
    assert np.allclose(steps, steps[0]) and steps[0] * 256 in (1, 2, 4, 8, 16, 32, 64, 128, 256)


def test_image_loading_errors_and_exif(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif)
    assert img.load_image(buf.getvalue()).size == (20, 40)
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="cannot read image .*bad.jpg"):
        img.load_image(tmp_path / "bad.jpg")
    with pytest.raises(FileNotFoundError, match="missing.png does not exist"):
        img.load_image(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match="is a directory, not an image file"):
        img.load_image(tmp_path)
    Image.new("L", (300, 300)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match="decompression bomb"):
        img.load_image(tmp_path / "big.png", max_pixels=10_000)
    assert img.load_image(Image.new("L", (5, 5))).mode == "RGB"


def test_multi_image_cap_and_jpeg_augmentation():
    assert img.tiles_per_image(12, 5) == 2 and img.tiles_per_image(6, 10) == 1
    tiles = img.tile_image(Image.new("RGB", (900, 300), (10, 200, 30)), image_size=56, max_num=2)
    assert len(tiles) == 3  # 2x1 grid + thumbnail
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 56, 3), dtype=np.uint8))
    a = img.jpeg_reencode([noisy], np.random.default_rng(5))[0]
    b = img.jpeg_reencode([noisy], np.random.default_rng(5))[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))  # seeded
    assert not np.array_equal(np.asarray(a), np.asarray(noisy))  # really re-encoded


@torch.no_grad()
def test_raw_uint8_tiles_give_the_same_logits():
    from conftest import image_batch
    from test_model import make_model

    model = make_model()
    input_ids, _ = image_batch(model.config)
    pic = Image.fromarray(np.random.default_rng(2).integers(0, 255, (70, 150, 3), dtype=np.uint8))
    raw = img.image_to_tiles(pic, image_size=56, max_num=3, normalized=False)
    assert raw.dtype == torch.uint8 and raw.shape == (3, 3, 56, 56)  # 2x1 grid + thumbnail
    ids = input_ids[1:]  # the row with 3 tiles' worth of image tokens
    a = model(input_ids=ids, pixel_values=raw).logits
    b = model(input_ids=ids, pixel_values=img.normalize(raw.numpy())).logits
    assert (a - b).abs().max().item() < 1e-5


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5,
                    reason="transformers 4 converts RGBA and EXIF-rotated images otherwise; nativevl follows 5")
def test_processor_treats_alpha_and_exif_like_transformers(tokenizer, tmp_path):
    rgba = np.random.default_rng(3).integers(0, 255, (90, 160, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(np.arange(160) < 80, 0, 255)[None, :]  # left half transparent
    buf = io.BytesIO()
    rotated = Image.fromarray(np.random.default_rng(4).integers(0, 255, (40, 70, 3), dtype=np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(buf, format="JPEG", exif=exif)
    pics = [Image.fromarray(rgba, "RGBA"), Image.open(io.BytesIO(buf.getvalue()))]
    text = ["<IMG_CONTEXT> and <IMG_CONTEXT>"]
    ref = internvl_processor(tokenizer, image_seq_length=4)(text=text, images=[pics], return_tensors="pt")
    got = Processor(tokenizer, image_seq_length=4)(text=text, images=[pics])
    assert torch.equal(got["input_ids"], ref["input_ids"])
    assert (got["pixel_values"] - ref["pixel_values"]).abs().max().item() < 1e-4
    # given as a file, transformers loads the photo upright (EXIF applied): a portrait shot from a phone
    path = tmp_path / "portrait.jpg"
    path.write_bytes(buf.getvalue())
    ref = internvl_processor(tokenizer, image_seq_length=4)(text=text[0][:15], images=[[str(path)]], return_tensors="pt")
    got = Processor(tokenizer, image_seq_length=4)(text=text[0][:15], images=[[str(path)]])
    assert got["pixel_values"].shape == ref["pixel_values"].shape
    assert (got["pixel_values"] - ref["pixel_values"]).abs().max().item() < 1e-4
    assert (got["pixel_values"] - Processor(tokenizer, image_seq_length=4)(text=text[0][:15], images=[[pics[1]]])[
        "pixel_values"]).abs().max().item() > 0.1  # the same file opened by the caller stays as stored


def test_processor_refuses_an_empty_or_non_string_text_by_name(tokenizer):
    proc = Processor(tokenizer, image_seq_length=4)
    for bad in ([], ["hi", 3], 5):
        with pytest.raises(ValueError, match="text must be a string or a non-empty list of strings"):
            proc(text=bad)


def test_validate_checks_preference_records_as_training_does(tmp_path, tokenizer):
    """With a tokenizer, `data validate` builds every record as the loader will: an over-long preference
    pair is reported, not passed (training would then reject it)."""
    import json

    from nativevl.data.pipeline import DataConfig
    from nativevl.data.records import DatasetSpec
    from nativevl.data.validate import validate

    lines = [{"question": "what is one two?", "chosen": "three", "rejected": "four"},
             {"question": "what is one two?", "chosen": "three " * 200, "rejected": "four"}]
    (tmp_path / "pref.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = DataConfig(max_tokens=64, image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
                     system_message=None, training=False)
    report = validate([DatasetSpec("pref", tmp_path / "pref.jsonl", tmp_path)], tokenizer, cfg)
    assert report.records == 2 and report.counts == {"over_length": 1}


def test_validate_without_a_tokenizer_decodes_videos_too(tmp_path):
    """Without a tokenizer `data validate` decoded images only: a corrupt video passed as good, and
    training then rejected it."""
    import json

    from nativevl.data.records import load_meta
    from nativevl.data.validate import validate

    (tmp_path / "broken.mp4").write_bytes(b"this is not a video" * 100)
    turns = [{"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "a cat"}]
    lines = [{"video": "broken.mp4", "conversations": turns},
             {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]
    (tmp_path / "ann.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "meta.json").write_text(json.dumps({"v": {"root": "", "annotation": "ann.jsonl"}}))
    report = validate(load_meta(tmp_path / "meta.json"))
    assert report.records == 2 and report.counts == {"unreadable_image": 1}
    assert "broken.mp4" in report.examples["unreadable_image"][0]


def test_meta_and_json_annotation_with_a_utf8_bom(tmp_path):
    """Editors on Windows save JSON with a UTF-8 byte-order mark; the jsonl reader accepted it, the meta
    file and .json (LLaVA) annotations failed with 'Unexpected UTF-8 BOM'."""
    import json

    from nativevl.data.records import Annotation, load_meta, parse_record

    rec = {"conversations": [{"from": "human", "value": "qu'est-ce que c'est ? 😀"}, {"from": "gpt", "value": "un chat"}]}
    (tmp_path / "llava.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([rec], ensure_ascii=False).encode())
    (tmp_path / "meta.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"d": {"annotation": "llava.json"}}).encode())
    (spec,) = load_meta(tmp_path / "meta.json")
    annotation = Annotation(spec)
    assert len(annotation) == 1
    assert parse_record(annotation[0][1], spec, "d:1").conversations[0]["value"] == "qu'est-ce que c'est ? 😀"
    (tmp_path / "llava.json").write_bytes('[{"conversations": "café"}]'.encode("latin-1"))  # not UTF-8: named
    with pytest.raises(ValueError, match="llava.json: not valid JSON"):
        Annotation(spec)


def test_record_image_key_null_or_empty_beside_images(tmp_path):
    """Converted datasets often carry "image": null (or []) next to "images": [...]; the images must not
    be dropped silently (the record then trained as text only), and both keys filled is an error."""
    from nativevl.data.records import DatasetSpec, RecordError, parse_record

    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    spec = DatasetSpec("d", tmp_path / "d.jsonl", tmp_path)
    conv = [{"from": "human", "value": "what is this?"}, {"from": "gpt", "value": "a square"}]
    for empty in (None, []):
        rec = parse_record({"image": empty, "images": ["a.png"], "conversations": conv}, spec, "d:1")
        assert rec.images == [tmp_path / "a.png"]
    with pytest.raises(RecordError, match="both 'image' and 'images'") as e:
        parse_record({"image": "a.png", "images": ["a.png"], "conversations": conv}, spec, "d:1")
    assert e.value.kind == "malformed"


def test_jsonl_whitespace_only_lines_of_any_length_are_skipped(tmp_path):
    """A whitespace-only line is not a record, however long (only lines of <= 8 bytes were checked, so
    a line of indentation counted as a malformed record and failed `data validate`)."""
    import json

    from nativevl.data.records import Annotation, DatasetSpec

    rec = json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]})
    text = rec + "\r\n" + " " * 40 + "\r\n\t\t\t\t\t\t\t\t\t\t\n   \n" + "  " + rec + "\n" + " \t " * 5
    (tmp_path / "d.jsonl").write_text(text, encoding="utf-8")
    annotation = Annotation(DatasetSpec("d", tmp_path / "d.jsonl", tmp_path))
    assert len(annotation) == 2
    assert [annotation[i][0] for i in range(2)] == [1, 5]
    assert all(isinstance(annotation[i][1], dict) for i in range(2))


@pytest.mark.parametrize("bad", [{"repeat_time": "twice"}, {"max_dynamic_patch": "twelve"},
                                 {"root": None}, {"root": 3}])
def test_meta_bad_settings_are_named(tmp_path, bad):
    import json

    from nativevl.data.records import load_meta

    (tmp_path / "d.jsonl").write_text("{}\n")
    (tmp_path / "meta.json").write_text(json.dumps({"mine": {"annotation": "d.jsonl", **bad}}))
    key = next(iter(bad))
    with pytest.raises(ValueError, match=f"meta.json: dataset 'mine' {key}"):
        load_meta(tmp_path / "meta.json")


def test_processor_from_an_original_layout_folder_reads_config_json(tmp_path, tokenizer):
    """An original (InternVLChatModel) folder has no processor_config.json and at most CLIP's
    preprocessor_config.json: tile size, tokens per tile and tile bounds are in config.json
    (force_image_size, downsample_ratio, min/max_dynamic_patch, use_thumbnail). The processor used
    the -hf defaults (448 px, 256 tokens), so a non-448 model got the wrong number of image tokens."""
    import json

    from test_model import make_model

    make_model().save_pretrained(tmp_path, layout="internvl", tokenizer=tokenizer)
    clip = {"crop_size": 448, "size": 448, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(clip))  # as the hub's original repos ship
    proc = Processor.from_pretrained(tmp_path)
    assert (proc.image_size, proc.image_seq_length, proc.max_patches, proc.use_thumbnail) == (56, 4, 12, True)
    d = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**d, "max_dynamic_patch": 6, "use_thumbnail": False}))
    proc = Processor.from_pretrained(tmp_path)
    assert (proc.max_patches, proc.use_thumbnail) == (6, False)
    assert proc(text="<image>", images=Image.new("RGB", (100, 50)))["pixel_values"].shape == (2, 3, 56, 56)
    (tmp_path / "config.json").write_text(json.dumps({**d, "dynamic_image_size": False}))
    assert Processor.from_pretrained(tmp_path).max_patches == 1


def test_processor_from_an_hf_folder_without_processor_files_reads_config_json(tmp_path, tokenizer):
    """transformers' model.save_pretrained writes no processor files: tile size and tokens per tile
    must then come from config.json, not the 448 px / 256-token defaults."""
    from test_model import make_model

    make_model().save_pretrained(tmp_path, tokenizer=tokenizer)
    for name in ("processor_config.json", "preprocessor_config.json"):
        (tmp_path / name).unlink()
    proc = Processor.from_pretrained(tmp_path)
    assert (proc.image_size, proc.image_seq_length) == (56, 4)


def test_an_empty_system_turn_is_still_a_turn_and_v2pe_delta_is_checked(tokenizer, tmp_path):
    """As the tokenizer's chat template and InternVL's preprocess: an explicit empty system message
    renders its (empty) turn; the configured default None / "" renders none."""
    from nativevl.data.pipeline import DataConfig
    from nativevl.data.records import DatasetSpec, parse_record

    m = [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]
    want = tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
    assert render_chat(m, system_message=None) == want and want.startswith("<|im_start|>system\n<|im_end|>")
    assert not render_chat(m[1:], system_message="").startswith("<|im_start|>system")
    conv = [{"from": "system", "value": ""}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    ids, _ = encode_conversation(tokenizer, conv, system_message=None)
    assert tokenizer.decode(ids).startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user")
    for bad in (0.0, 4.0, float("nan")):
        with pytest.raises(ValueError, match="v2pe_delta"):
            DataConfig(v2pe="fixed", v2pe_delta=bad)
    # a preference dataset's data_augment reaches its records
    spec = DatasetSpec("p", tmp_path / "p.jsonl", tmp_path, data_augment=True)
    rec = parse_record({"question": "q", "chosen": "a", "rejected": "b"}, spec, "p:1")
    assert rec.data_augment


def test_processor_takes_a_chw_uint8_tensor_as_transformers_does(tokenizer):
    arr = np.random.default_rng(3).integers(0, 255, (90, 200, 3), dtype=np.uint8)
    tensor = torch.from_numpy(arr).permute(2, 0, 1)
    proc = Processor(tokenizer, image_size=56, image_seq_length=4)
    assert torch.equal(proc.tile(tensor), proc.tile(arr))
    with pytest.raises(ValueError, match="image tensor must be"):
        proc.tile(tensor.float())
