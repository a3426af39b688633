"""`nativevl quantize`: W4A16 / W8A16 checkpoints in the compressed-tensors format, checked against the
format's own library and against transformers loading them; our loader dequantizes them the same way."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import hf_model, image_batch, tiny_config

from nativevl.cli import main
from nativevl.io.hf import load_model, read_tensors
from nativevl.io.quantize import pack_int32, quantize_weight, unpack_int32


@pytest.mark.parametrize("bits, width", [(4, 64), (4, 40), (8, 64), (8, 30)])
def test_packing_is_the_formats_own(bits, width):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    g = torch.Generator().manual_seed(bits + width)
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (6, width), generator=g, dtype=torch.int8)
    packed = pack_int32(q, bits)
    assert torch.equal(packed, pack_to_int32(q, bits))
    assert torch.equal(unpack_int32(packed, bits, (6, width)), q)
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size((6, width))), q)


def test_rounding_to_nearest_with_a_min_max_scale():
    w = torch.tensor([[0.75, -0.3, 0.1, 0.0, 1.5, -1.5, 0.2, 0.7]])
    q, scale = quantize_weight(w, 4, group_size=4)
    # the min-max scale on bf16's grid (what is stored): the integers are picked with it
    assert torch.equal(scale, torch.tensor([[0.75 / 7.5, 1.5 / 7.5]]).to(torch.bfloat16).float())
    # bf16 rounds 0.2 up to 0.2002: -1.5 / 0.2002 = -7.49 -> -7 (with 0.2 exactly: -7.5 -> -8)
    assert q.tolist() == [[7, -3, 1, 0, 7, -7, 1, 3]]


@pytest.mark.parametrize("scheme, group, max_rel", [("w4a16", 16, 0.4), ("w8a16", None, 0.05)])
def test_quantized_checkpoint_loads_in_transformers_with_our_logits(tmp_path, scheme, group, max_rel):
    pytest.importorskip("compressed_tensors")  # transformers reads the format through it
    from transformers import InternVLForConditionalGeneration

    from nativevl.io.quantize import HF_LLM_LINEAR

    cfg = tiny_config()
    original = hf_model(cfg)
    original.save_pretrained(tmp_path / "base")
    args = ["quantize", str(tmp_path / "base"), str(tmp_path / "q"), "--scheme", scheme]
    assert main(args + ["--group_size", str(group or 0)]) == 0
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"]) == ({"w4a16": 4, "w8a16": 8}[scheme], group)
    tensors, _ = read_tensors(tmp_path / "q")
    packed = [k for k in tensors if k.endswith(".weight_packed")]
    assert len(packed) == 7 * cfg.text.num_hidden_layers and all(k.startswith("language_model.") for k in packed)
    base, _ = read_tensors(tmp_path / "base")  # the ViT, projector, embeddings, norms and head: bf16 copies
    kept = [k for k in base if not HF_LLM_LINEAR.match(k)]
    assert any("multi_modal_projector" in k for k in kept) and any("vision_tower" in k for k in kept)
    assert all(torch.equal(tensors[k], base[k].to(torch.bfloat16)) for k in kept)

    ids, pixels = image_batch(cfg)
    run = lambda m: m(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits
    with torch.no_grad():
        theirs = run(InternVLForConditionalGeneration.from_pretrained(tmp_path / "q", dtype=torch.float32).eval())
        ours = run(load_model(tmp_path / "q", dtype=torch.float32))
        reference = run(load_model(tmp_path / "base", dtype=torch.bfloat16).float())
    assert (ours - theirs).abs().max().item() < 1e-4  # the same dequantized model
    rel = ((ours - reference).norm() / reference.norm()).item()
    assert 0 < rel < max_rel, rel


def test_quantize_refuses_what_it_cannot_write_or_read(tmp_path, capsys):
    hf_model(tiny_config()).save_pretrained(tmp_path / "base")
    assert main(["quantize", str(tmp_path / "base"), str(tmp_path / "q"), "--group_size", "48"]) == 2
    assert "group_size 48 does not divide" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "base"), str(tmp_path / "q"), "--group_size", "32"]) == 0
    # a traceback (-5 passed the divisibility check); a second rounding of rounded weights; the source
    # replaced by its quantized copy; a file as destination found only after the calibration's hours
    for args, said in ((["--group_size", "-5"], "group_size must be > 0, or 0 / -1"),
                       (["--scheme", "w8a16", "--group_size", "64"], "w8a16 is written with one scale per output"),
                       (["--calib", str(tmp_path / "meta.json"), "--calib_records", "0"], "calib_records and"),
                       ):
        assert main(["quantize", str(tmp_path / "base"), str(tmp_path / "x"), *args]) == 2
        assert said in capsys.readouterr().err, args
    assert main(["quantize", str(tmp_path / "q"), str(tmp_path / "qq")]) == 2
    assert "is already quantized (compressed-tensors)" in capsys.readouterr().err and not (tmp_path / "qq").exists()
    assert main(["quantize", str(tmp_path / "base"), str(tmp_path / "base")]) == 2
    assert "is the source folder" in capsys.readouterr().err
    (tmp_path / "afile").write_text("mine")
    assert main(["quantize", str(tmp_path / "base"), str(tmp_path / "afile"), "--calib", str(tmp_path / "nometa.json"),
                 "--group_size", "-1"]) == 2
    assert "afile is a file" in capsys.readouterr().err  # not the missing calibration data, read later
    assert main(["quantize", str(tmp_path / "base"), str(tmp_path / "pc"), "--group_size", "-1"]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "pc" / "config.json").read_text())["quantization_config"]["config_groups"][
        "group_0"]["weights"]["strategy"] == "channel"
    path = tmp_path / "q" / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = False
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="asymmetric"):
        load_model(tmp_path / "q")
    config["quantization_config"]["format"] = "float-quantized"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format 'float-quantized' is not read"):
        load_model(tmp_path / "q")


def test_llm_compressor_variants_read_the_same(tmp_path):
    """llm-compressor's GPTQ writes actorder "static" (another name for "weight"), or "group" with each
    column's group in weight_g_idx: both read as the weights they stand for; run-time rotations do not."""
    from safetensors.torch import load_file, save_file

    hf_model(tiny_config()).save_pretrained(tmp_path / "base")
    assert main(["quantize", str(tmp_path / "base"), str(tmp_path / "q"), "--group_size", "16"]) == 0
    plain = load_model(tmp_path / "q", dtype=torch.float32).state_dict()
    path = tmp_path / "q" / "config.json"
    config = json.loads(path.read_text())
    weights = config["quantization_config"]["config_groups"]["group_0"]["weights"]
    for order in ("static", "group"):
        weights["actorder"] = order
        path.write_text(json.dumps(config))
        if order == "group":  # every column in its own group's order: the same weights
            file = tmp_path / "q" / "model.safetensors"
            tensors = load_file(str(file))
            for key in [k for k in tensors if k.endswith(".weight_packed")]:
                cols = int(tensors[key.replace("_packed", "_shape")][1])
                tensors[key.replace("_packed", "_g_idx")] = torch.arange(cols, dtype=torch.int32) // 16
            save_file(tensors, str(file), metadata={"format": "pt"})
        loaded = load_model(tmp_path / "q", dtype=torch.float32).state_dict()
        assert all(torch.equal(loaded[k], plain[k]) for k in plain), order
    config["quantization_config"]["transform_config"] = {"config_groups": {"u": {"type": "hadamard"}}}
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="transform_config"):
        load_model(tmp_path / "q")
