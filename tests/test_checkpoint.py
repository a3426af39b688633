"""Checkpoint interop: layouts, round trips, transformers loading our output, sharding, clear errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import hf_model, image_batch, tiny_config, write_vit_folder
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nativevl import VisionLanguageModel
from nativevl.cli import main as cli_main
from nativevl.config import PRESETS, preset
from nativevl.io import hf as hfio
from nativevl.io import hf_config
from nativevl.io.tokenizer import load_tokenizer


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in hfio.weight_files(folder):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.fixture(scope="module", params=[("layer_norm", False), ("rms_norm", True)], ids=["300m-untied", "6b-tied"])
def hf_folder(request, tmp_path_factory):
    cfg = tiny_config(*request.param)
    folder = tmp_path_factory.mktemp("hf")
    hf_model(cfg, seed=1).save_pretrained(folder)
    return folder


def test_round_trip_hf_internvl_is_bit_exact(hf_folder, tmp_path, tokenizer):
    ours = VisionLanguageModel.from_pretrained(hf_folder)
    ours.save_pretrained(tmp_path / "internvl", layout="internvl", tokenizer=tokenizer)
    orig_keys = set(load_file(str(tmp_path / "internvl" / "model.safetensors")))
    assert any(k.endswith("attn.qkv.weight") for k in orig_keys) and "mlp1.0.weight" in orig_keys
    # names of InternVLChatModel's state dict (modeling_intern_vit.py / modeling_internvl_chat.py)
    for name in ("vision_model.embeddings.class_embedding", "vision_model.embeddings.position_embedding",
                 "vision_model.embeddings.patch_embedding.weight", "vision_model.encoder.layers.1.attn.proj.bias",
                 "vision_model.encoder.layers.0.norm1.weight", "vision_model.encoder.layers.0.norm2.weight",
                 "vision_model.encoder.layers.1.ls1", "vision_model.encoder.layers.1.ls2",
                 "vision_model.encoder.layers.0.mlp.fc2.weight", "mlp1.1.weight", "mlp1.3.bias",
                 "language_model.model.embed_tokens.weight", "language_model.model.norm.weight"):
        assert name in orig_keys, name
    assert ("language_model.lm_head.weight" in orig_keys) != ours.config.tie_word_embeddings
    again = VisionLanguageModel.from_pretrained(tmp_path / "internvl")
    again.save_pretrained(tmp_path / "hf", layout="hf")
    before, after = read_all(hf_folder), read_all(tmp_path / "hf")
    assert set(before) == set(after)
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    # tokenizer and processor files travel through conversion
    assert load_tokenizer(tmp_path / "hf").convert_tokens_to_ids("<IMG_CONTEXT>") == again.config.image_token_id
    assert json.loads((tmp_path / "hf" / "processor_config.json").read_text())["image_seq_length"] == 4


def test_transformers_loads_our_hf_output(hf_folder, tmp_path):
    from transformers import InternVLForConditionalGeneration

    ours = VisionLanguageModel.from_pretrained(hf_folder)
    ours.save_pretrained(tmp_path / "out", layout="hf")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] == ours.config.tie_word_embeddings
    theirs, info = InternVLForConditionalGeneration.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    input_ids, pixel_values = image_batch(ours.config)
    with torch.no_grad():
        ref = theirs.eval()(input_ids=input_ids, pixel_values=pixel_values, attention_mask=torch.ones_like(input_ids))
        got = ours(input_ids=input_ids, pixel_values=pixel_values)
    assert (ref.logits - got.logits).abs().max().item() < 1e-4


def test_sharded_save_and_load(hf_folder, tmp_path):
    from transformers import InternVLForConditionalGeneration

    ours = VisionLanguageModel.from_pretrained(hf_folder)
    ours.save_pretrained(tmp_path / "sharded", layout="hf", max_shard_bytes=64 * 1024)
    index = json.loads((tmp_path / "sharded" / hfio.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (tmp_path / "sharded" / hfio.SINGLE_FILE).exists()
    again = VisionLanguageModel.from_pretrained(tmp_path / "sharded")
    for key, value in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    _, info = InternVLForConditionalGeneration.from_pretrained(tmp_path / "sharded", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_convert_command_and_dtype(hf_folder, tmp_path, capsys):
    assert cli_main(["convert", str(hf_folder), str(tmp_path / "o"), "--to", "internvl", "--dtype", "bf16"]) == 0
    assert "internvl layout" in capsys.readouterr().out
    model = VisionLanguageModel.from_pretrained(tmp_path / "o")
    assert model.dtype == torch.bfloat16
    assert json.loads((tmp_path / "o" / "config.json").read_text())["architectures"] == ["InternVLChatModel"]


def test_truncated_safetensors_names_the_file(hf_folder, tmp_path):
    ours = VisionLanguageModel.from_pretrained(hf_folder)
    ours.save_pretrained(tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*(damaged|truncated)"):
        VisionLanguageModel.from_pretrained(tmp_path / "ck")
    assert cli_main(["convert", str(tmp_path / "ck"), str(tmp_path / "x"), "--to", "hf"]) == 2
    assert not (tmp_path / "x").exists()


def test_missing_unexpected_and_misshaped_tensors(hf_folder, tmp_path):
    ours = VisionLanguageModel.from_pretrained(hf_folder)
    ours.save_pretrained(tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    sd = load_file(str(f))
    key = "multi_modal_projector.linear_1.weight"

    broken = dict(sd)
    del broken[key]
    save_file(broken, str(f))
    with pytest.raises(ValueError, match=rf"missing 1 tensor.*{key} \(64, 128\)"):
        VisionLanguageModel.from_pretrained(tmp_path / "ck")

    broken = dict(sd, **{key: torch.zeros(64, 127)})
    save_file(broken, str(f))
    with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{key}' has shape \(64, 127\), the config expects \(64, 128\)"):
        VisionLanguageModel.from_pretrained(tmp_path / "ck")

    broken = dict(sd, **{"vision_tower.extra.weight": torch.zeros(2)})
    save_file(broken, str(f))
    with pytest.raises(ValueError, match=r"1 unexpected tensor.*vision_tower\.extra\.weight \(2,\)"):
        VisionLanguageModel.from_pretrained(tmp_path / "ck")


def test_interrupted_save_leaves_the_old_checkpoint(hf_folder, tmp_path, monkeypatch):
    ours = VisionLanguageModel.from_pretrained(hf_folder)
    target = tmp_path / "ck"
    ours.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def crash(tensors, folder, max_shard_bytes):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(hfio, "write_tensors", crash)
    with pytest.raises(KeyboardInterrupt):
        ours.save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary folder left behind


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        VisionLanguageModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(ValueError, match="neither 'internvl'"):
        VisionLanguageModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_json_round_trip(name):
    cfg = preset(name)
    assert hf_config.config_from_hf(hf_config.config_to_hf(cfg)) == cfg
    back = hf_config.config_from_internvl(hf_config.config_to_internvl(cfg))
    assert back == cfg


def _without_defaults(config: dict) -> dict:
    """A config stripped harder than any transformers version writes one: each sub-config keeps only the
    values that differ from its own class's defaults, plus model_type; the top level drops
    tie_word_embeddings when it is the default True (transformers 4.52 drops only the generic keys among
    these, such as bos/eos/pad ids and tie_word_embeddings; see the next test)."""
    from transformers import AutoConfig, InternVLConfig, InternVLVisionConfig

    composite_default = InternVLConfig().to_dict()
    out = {k: v for k, v in config.items() if not (k == "tie_word_embeddings" and v is True)}
    for key, cls_default in (("text_config", AutoConfig.for_model(config["text_config"]["model_type"]).to_dict()),
                             ("vision_config", InternVLVisionConfig().to_dict())):
        sub = config[key]
        out[key] = {k: v for k, v in sub.items()
                    if k == "model_type" or k not in composite_default[key] or v != cls_default.get(k)}
    return out


@pytest.mark.parametrize("name", ["internvl3_1b", "internvl3_9b", "internvl3_78b"])
def test_config_without_default_values_reads_the_same(name, tmp_path):
    """A config.json that omits every sub-config value equal to its class default (InternViT-300M's whole
    shape; InternLM3-8B's hidden_size 4096 and 32 heads, llama's defaults) reads as transformers reads it."""
    from transformers import InternVLConfig

    cfg = preset(name)
    InternVLConfig(**hf_config.config_to_hf(cfg)).save_pretrained(tmp_path / "full")
    full = json.loads((tmp_path / "full" / "config.json").read_text())
    diff = _without_defaults(full)
    (tmp_path / "config.json").write_text(json.dumps(diff))
    dropped = {k for k in ("hidden_size", "num_attention_heads", "num_hidden_layers") if k not in diff["text_config"]}
    dropped |= {f"vision.{k}" for k in ("hidden_size", "num_hidden_layers") if k not in diff["vision_config"]}
    assert dropped == {"internvl3_1b": {"vision.hidden_size", "vision.num_hidden_layers"},
                       "internvl3_9b": {"hidden_size", "num_attention_heads", "vision.hidden_size",
                                        "vision.num_hidden_layers"},
                       "internvl3_78b": set()}[name]
    ours, layout = hf_config.read_config(tmp_path)
    assert layout == "hf" and ours == hf_config.read_config(tmp_path / "full")[0] == cfg
    # transformers reads the diff file to the same shapes (the oracle for the defaults filled in)
    theirs = InternVLConfig.from_pretrained(tmp_path).text_config
    assert (theirs.hidden_size, theirs.num_attention_heads, theirs.num_key_value_heads, theirs.vocab_size) == (
        ours.text.hidden_size, ours.text.num_attention_heads, ours.text.num_key_value_heads, ours.text.vocab_size)


def test_internvl3_9b_hf_as_transformers_4_wrote_it_stops_at_im_end_and_is_untied(tmp_path):
    """transformers 4.52 writes the -hf 9B's text_config without its default-valued generic keys (eos 2 and
    bos 1 of LlamaConfig, tie_word_embeddings False) and no top-level tie_word_embeddings; the converter puts
    the chat's stop token <|im_end|> (128131) in generation_config.json only. Ours reads eos 128131 and an
    untied head, as transformers' generate and 4.x's tying do."""
    d = hf_config.config_to_hf(preset("internvl3_9b"))
    del d["tie_word_embeddings"]
    for key in ("eos_token_id", "bos_token_id", "tie_word_embeddings", "pad_token_id"):
        d["text_config"].pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(d))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128131, 2], "bos_token_id": 1}))
    cfg, layout = hf_config.read_config(tmp_path)
    assert layout == "hf" and cfg.text.eos_token_id == 128131 and not cfg.tie_word_embeddings
    # without generation_config.json: the tokenizer's <|im_end|>
    (tmp_path / "generation_config.json").unlink()
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|im_end|>": 128131}))
    assert hf_config.read_config(tmp_path)[0].text.eos_token_id == 128131
    # a text_config that names its eos keeps it when there is no generation_config.json
    d["text_config"]["eos_token_id"] = 7
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert hf_config.read_config(tmp_path)[0].text.eos_token_id == 7
    # both rope keys: transformers 5.x takes the legacy rope_scaling
    t = dict(d["text_config"], rope_scaling={"rope_type": "dynamic", "factor": 3.0},
             rope_parameters={"rope_type": "default", "rope_theta": 5e7})
    assert hf_config.text_from_dict(t, source="x").rope_factor == 3.0


def test_original_config_without_llm_shape_names_the_file_once(tmp_path):
    d = hf_config.config_to_internvl(preset("internvl3_9b"))
    d["llm_config"]["model_type"] = "internlm3"  # remote code: no class defaults to fill in
    del d["llm_config"]["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="lacks num_attention_heads / hidden_size") as e:
        hf_config.read_config(tmp_path)
    assert str(e.value).count("config.json") == 1


def test_original_layout_reads_like_internvl(tmp_path):
    """Hub InternVL3 original configs say eos <|endoftext|> in llm_config, but chat() stops at <|im_end|>."""
    d = hf_config.config_to_internvl(preset("internvl3_1b"))
    d["llm_config"]["eos_token_id"] = 151643
    d["llm_config"]["tie_word_embeddings"] = True
    d["tie_word_embeddings"] = False  # the LLM is built from llm_config: that value decides
    del d["image_token_id"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg, layout = hf_config.read_config(tmp_path)
    assert layout == "internvl" and cfg.text.eos_token_id == 151645 and cfg.tie_word_embeddings
    assert cfg.image_token_id == 151667


def test_unsupported_feature_strategy_is_an_error():
    d = hf_config.config_to_hf(preset("tiny"))
    d["vision_feature_select_strategy"] = "full"
    with pytest.raises(ValueError, match="vision_feature_select_strategy 'full'"):
        hf_config.config_from_hf(d)


def test_resave_in_place_keeps_tokenizer_and_permissions(hf_folder, tmp_path, tokenizer):
    import os
    import stat

    VisionLanguageModel.from_pretrained(hf_folder).save_pretrained(tmp_path / "ck", tokenizer=tokenizer)
    VisionLanguageModel.from_pretrained(tmp_path / "ck").save_pretrained(tmp_path / "ck")
    assert (tmp_path / "ck" / "tokenizer.json").is_file()
    load_tokenizer(tmp_path / "ck")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "ck").stat().st_mode) == 0o777 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_conversion_keeps_what_the_source_folder_says(hf_folder, tmp_path, tokenizer):
    """A convert or re-save rebuilt every config from defaults and kept only tokenizer / processor files:
    in place it deleted the model card, licence and examples; generation_config's extra stop ids and
    sampling defaults, the original layout's auto_map / template and tiling (max_dynamic_patch) and a
    transformers 5 tokenizer's additional special tokens were lost; a tokenizer's remote code was left
    behind in an -hf folder."""
    import dataclasses

    tok = copy.deepcopy(tokenizer)
    try:  # transformers 5 / 4 name the keep-the-others flag differently
        tok.add_special_tokens({"additional_special_tokens": ["<tool_call>"]}, replace_extra_special_tokens=False)
    except TypeError:
        tok.add_special_tokens({"additional_special_tokens": ["<tool_call>"]}, replace_additional_special_tokens=False)
    VisionLanguageModel.from_pretrained(hf_folder).save_pretrained(tmp_path / "orig", layout="internvl", tokenizer=tok)
    orig = tmp_path / "orig"
    config = json.loads((orig / "config.json").read_text())
    config.update(auto_map={"AutoConfig": "configuration_internvl_chat.InternVLChatConfig"}, max_dynamic_patch=6)
    (orig / "config.json").write_text(json.dumps(config))
    (orig / "configuration_internvl_chat.py").write_text("# remote code\n")
    gen = json.loads((orig / "generation_config.json").read_text())
    eos = gen["eos_token_id"]
    gen.update(eos_token_id=[eos, 0], do_sample=True, temperature=0.7, top_p=0.8)
    (orig / "generation_config.json").write_text(json.dumps(gen))
    (orig / "README.md").write_text("model card\n")
    (orig / "examples").mkdir()
    (orig / "examples" / "image1.jpg").write_bytes(b"x")
    assert cli_main(["convert", str(orig), str(orig), "--to", "internvl", "--dtype", "bf16"]) == 0  # in place
    assert (orig / "README.md").read_text() == "model card\n" and (orig / "examples" / "image1.jpg").is_file()
    config = json.loads((orig / "config.json").read_text())
    assert config["auto_map"]["AutoConfig"].startswith("configuration_internvl_chat") and config["max_dynamic_patch"] == 6
    assert (orig / "configuration_internvl_chat.py").is_file()
    gen = json.loads((orig / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [eos, 0] and (gen["do_sample"], gen["temperature"], gen["top_p"]) == (True, 0.7, 0.8)
    assert cli_main(["convert", str(orig), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf = tmp_path / "hf"
    assert json.loads((hf / "preprocessor_config.json").read_text())["max_patches"] == 6
    assert json.loads((hf / "generation_config.json").read_text())["temperature"] == 0.7
    assert not (hf / "configuration_internvl_chat.py").exists() and (hf / "README.md").is_file()
    assert "<tool_call>" in load_tokenizer(hf).all_special_tokens
    # q/k/v biases without an o_proj bias have no llama config: refused by name, not exported wrong
    cfg = tiny_config()
    llama = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, model_type="llama", attention_bias=True))
    with pytest.raises(ValueError, match="have no llama config"):
        VisionLanguageModel(llama).save_pretrained(tmp_path / "llama")


def test_original_tokenizer_gains_internvl_fields_when_converted_to_hf(hf_folder, tmp_path, tokenizer):
    VisionLanguageModel.from_pretrained(hf_folder).save_pretrained(tmp_path / "orig", layout="internvl", tokenizer=tokenizer)
    tc = tmp_path / "orig" / "tokenizer_config.json"
    d = json.loads(tc.read_text())
    d.pop("extra_special_tokens", None)
    tc.write_text(json.dumps(d))
    assert cli_main(["convert", str(tmp_path / "orig"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    converted = load_tokenizer(tmp_path / "hf")
    assert converted.context_image_token == "<IMG_CONTEXT>" and converted.start_image_token == "<img>"


def test_original_processor_file_is_not_carried_into_hf(hf_folder, tmp_path):
    """Original InternVL repos ship a CLIP-style preprocessor_config.json (448 center crop, no tiling):
    converted to -hf, the folder must hold the GotOcr2 tiling processor that InternVLProcessor expects."""
    from transformers import AutoImageProcessor

    VisionLanguageModel.from_pretrained(hf_folder).save_pretrained(tmp_path / "orig", layout="internvl")
    clip = {"crop_size": 56, "do_center_crop": True, "do_normalize": True, "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.485, 0.456, 0.406],
            "image_std": [0.229, 0.224, 0.225], "resample": 3, "size": 56}
    (tmp_path / "orig" / "preprocessor_config.json").write_text(json.dumps(clip))
    VisionLanguageModel.from_pretrained(tmp_path / "orig").save_pretrained(tmp_path / "hf", layout="hf")
    assert type(AutoImageProcessor.from_pretrained(tmp_path / "hf")).__name__.startswith("GotOcr2ImageProcessor")
    # an -hf source keeps its own processor files
    custom = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text()) | {"max_patches": 6}
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(custom))
    VisionLanguageModel.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "hf2", layout="hf")
    assert json.loads((tmp_path / "hf2" / "preprocessor_config.json").read_text())["max_patches"] == 6


def test_init_from_parts_mean_initialises_new_tokens_inside_a_padded_vocab(tmp_path):
    """Qwen2.5's embedding is padded past its tokenizer (151936 rows, 151665 tokens), so InternVL's nine
    tokens get ids inside it: their rows must still start at the mean of the real tokens' rows."""
    from conftest import CORPUS
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from nativevl.io.parts import init_from_parts
    from nativevl.io.tokenizer import INTERNVL_TOKENS

    # the LLM folder: weights with padded rows, and its own tokenizer without InternVL's tokens
    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    base.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=base, eos_token="<|im_end|>").save_pretrained(tmp_path / "llm")
    n_base = base.get_vocab_size()
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=n_base + 40, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    llm.save_pretrained(tmp_path / "llm")
    # InternVL's tokenizer: the LLM's plus its nine tokens, appended
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "llm")
    tokenizer.add_tokens(list(INTERNVL_TOKENS), special_tokens=True)
    new_ids = tokenizer.convert_tokens_to_ids(list(INTERNVL_TOKENS))
    assert new_ids == list(range(n_base, n_base + 9))
    write_vit_folder(tmp_path / "vit")

    model = init_from_parts(tmp_path / "vit", tmp_path / "llm", tokenizer)
    sd = model.state_dict()
    for ours, theirs in (("language_model.embed_tokens.weight", llm.model.embed_tokens.weight),
                         ("lm_head.weight", llm.lm_head.weight)):
        theirs = theirs.detach()
        assert torch.equal(sd[ours][:n_base], theirs[:n_base]), ours
        assert torch.allclose(sd[ours][new_ids], theirs[:n_base].mean(0).expand(9, -1)), ours
        assert torch.equal(sd[ours][n_base + 9 :], theirs[n_base + 9 :]), ours


def test_tokenizer_from_a_folder_without_tokenizer_files_says_so(hf_folder, tmp_path):
    """A checkpoint saved without tokenizer= has no tokenizer files: the error must say that, not that the
    folder's tokenizer lacks InternVL's tokens."""
    VisionLanguageModel.from_pretrained(hf_folder).save_pretrained(tmp_path / "ck")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer files"):
        load_tokenizer(tmp_path / "ck")


def test_original_string_only_chat_template_is_replaced_when_converted_to_hf(hf_folder, tmp_path, tokenizer):
    """Original InternVL tokenizers carry a ChatML template that concatenates message['content'] as a string
    (with InternVL's system prompt); an -hf folder's template must render image parts, as the converter's does."""
    VisionLanguageModel.from_pretrained(hf_folder).save_pretrained(tmp_path / "orig", layout="internvl", tokenizer=tokenizer)
    tc = tmp_path / "orig" / "tokenizer_config.json"
    d = json.loads(tc.read_text())
    for key in ("extra_special_tokens", "start_image_token", "end_image_token", "context_image_token", "video_token"):
        d.pop(key, None)
    d["chat_template"] = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
                          " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    tc.write_text(json.dumps(d))
    (tmp_path / "orig" / "chat_template.jinja").unlink(missing_ok=True)
    assert cli_main(["convert", str(tmp_path / "orig"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    converted = load_tokenizer(tmp_path / "hf")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}]
    text = converted.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\n<IMG_CONTEXT>\nwhat is it?<|im_end|>\n<|im_start|>assistant\n"


def test_llm_part_with_saved_rotary_inv_freq_buffers(tmp_path):
    """Llama-2-era HF folders (meta-llama/Llama-2-7b-hf and its fine-tunes) store each layer's
    `self_attn.rotary_emb.inv_freq` buffer; it is recomputed from the config, not a weight, and must
    not make load_llm / init_from_parts fail with 'unexpected tensor'."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from nativevl.io.parts import load_llm

    llm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2))
    llm.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    for i in range(2):
        sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _, tied, ours = load_llm(tmp_path)
    assert not tied and not any("inv_freq" in k for k in ours)
    assert "language_model.layers.1.self_attn.q_proj.weight" in ours and "lm_head.weight" in ours


def test_llm_part_untied_without_lm_head_is_named(tmp_path):
    """A folder whose config does not tie the embeddings but that holds no lm_head.weight failed
    init_from_parts with a bare KeyError('lm_head.weight')."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from nativevl.io.parts import load_llm

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["lm_head.weight"]
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lm_head.weight.*tie_word_embeddings"):
        load_llm(tmp_path)


def test_a_save_removes_what_a_killed_save_left_and_keeps_the_old_folder_if_the_swap_fails(tmp_path, monkeypatch):
    """Folders a process killed mid-save left beside the target (`.name.tmp-*`, `.name.old-*`) go at
    the next save; if moving the new folder into place fails, the previous one is put back."""
    import os

    from nativevl.io import hf

    target = tmp_path / "ckpt"
    (tmp_path / ".ckpt.tmp-deadbeef").mkdir()
    (tmp_path / ".ckpt.old-cafe").mkdir()
    with hf.staged_folder(target) as tmp:
        (tmp / "config.json").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    real = os.replace

    def failing(src, dst):
        if str(src).endswith(tuple("0123456789abcdef")) and ".tmp-" in str(src):
            raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr(hf.os, "replace", failing)
    with pytest.raises(OSError, match="disk gone"), hf.staged_folder(target) as tmp:
        (tmp / "config.json").write_text("2")
    assert (target / "config.json").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
