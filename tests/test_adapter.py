"""LoRA adapters in PEFT's format: adapters PEFT makes load into our model with PEFT's logits (the -hf
module tree, and the original one with its fused ViT qkv), and a LoRA training run's final_adapter
loads in PEFT on transformers' model of the base with the logits of the run's merged export."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import hf_model, image_batch, tiny_config

from nativevl import VisionLanguageModel
from nativevl.cli import main
from nativevl.io import keymap
from nativevl.io.hf import load_model

peft = pytest.importorskip("peft")

LLM = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_peft_model(base, seed: int = 0, **lora_kwargs):
    """PEFT's LoRA on transformers' model, every adapter weight random (B starts at zero otherwise)."""
    names = [n for n, _ in base.named_modules()]
    targets = [n for n in names if (n.startswith("model.language_model.") and n.endswith(LLM))
               or (n.startswith("model.vision_tower.") and n.endswith((".q_proj", ".k_proj", ".v_proj", ".fc1")))
               or n == "model.multi_modal_projector.linear_1"]
    config = peft.LoraConfig(target_modules=targets, **lora_kwargs)
    model = peft.get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def logits_of(model, cfg) -> torch.Tensor:
    """Ours or transformers' (PEFT-wrapped) model on the same two-row image batch."""
    ids, pixels = image_batch(cfg)
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits


@pytest.mark.parametrize("kwargs", [
    {"r": 4, "lora_alpha": 8, "modules_to_save": ["lm_head"]},
    # rsLoRA scaling, another rank and alpha for some modules (PEFT's rank_pattern / alpha_pattern)
    {"r": 4, "lora_alpha": 8, "use_rslora": True, "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"fc1": 3.0}},
])
def test_a_peft_adapter_merges_to_peft_logits(tmp_path, kwargs):
    cfg = tiny_config()
    base = hf_model(cfg)
    base.save_pretrained(tmp_path / "base")
    peft_model = random_peft_model(base, **kwargs)
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = logits_of(peft_model, cfg)
    ours = load_model(tmp_path / "base", dtype=torch.float32, adapter=tmp_path / "adapter")
    plain = load_model(tmp_path / "base", dtype=torch.float32)
    assert (logits_of(ours, cfg) - expected).abs().max().item() < 1e-4
    assert (logits_of(plain, cfg) - expected).abs().max().item() > 1e-2  # the adapter does change them
    # convert writes the merged weights, in either layout
    assert main(["convert", str(tmp_path / "base"), str(tmp_path / "merged"), "--to", "internvl",
                 "--adapter", str(tmp_path / "adapter")]) == 0
    merged = VisionLanguageModel.from_pretrained(tmp_path / "merged")
    assert (logits_of(merged, cfg) - expected).abs().max().item() < 1e-4


def test_an_adapter_for_the_original_module_tree_with_a_fused_qkv(tmp_path):
    """InternVL's own and ms-swift's LoRA on InternVLChatModel name its modules `vision_model....attn.qkv`,
    `mlp1.1`, `language_model.model....`: PEFT's adapter renamed to that tree, its ViT q/k/v LoRAs fused
    into one qkv LoRA (A stacked, B block-diagonal: the same update), merges to PEFT's logits."""
    cfg = tiny_config()
    base = hf_model(cfg)
    base.save_pretrained(tmp_path / "base")
    peft_model = random_peft_model(base, r=4, lora_alpha=8)
    peft_model.save_pretrained(tmp_path / "hf_adapter")
    expected = logits_of(peft_model, cfg)

    from safetensors.torch import load_file, save_file

    raw = load_file(str(tmp_path / "hf_adapter" / "adapter_model.safetensors"))
    prefix = "base_model.model."
    out, qkv = {}, {}
    for key, value in raw.items():
        module, which = key[len(prefix):].rsplit(".lora_", 1)
        ours = module.removeprefix("model.")
        if ".attention." in ours and ours.endswith(("q_proj", "k_proj", "v_proj")):
            layer = ours.split(".")[3]
            qkv.setdefault(layer, {})[(ours[-6], which[0])] = value
            continue
        name = next(iter(keymap.to_internvl({ours + ".weight": value})))  # the original tree's name
        out[f"{prefix}{name.removesuffix('.weight')}.lora_{which}"] = value
    for layer, parts in qkv.items():
        a = torch.cat([parts[(h, "A")] for h in "qkv"])  # (3r, in)
        b = torch.block_diag(*[parts[(h, "B")] for h in "qkv"])  # (3 out, 3r)
        out[f"{prefix}vision_model.encoder.layers.{layer}.attn.qkv.lora_A.weight"] = a
        out[f"{prefix}vision_model.encoder.layers.{layer}.attn.qkv.lora_B.weight"] = b
    (tmp_path / "orig_adapter").mkdir()
    save_file(out, str(tmp_path / "orig_adapter" / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "hf_adapter" / "adapter_config.json").read_text())
    config["alpha_pattern"] = {"qkv": 8 * 3}  # rank 3r there: the same alpha / r scale
    (tmp_path / "orig_adapter" / "adapter_config.json").write_text(json.dumps(config))
    load_model(tmp_path / "base").save_pretrained(tmp_path / "base_orig", layout="internvl")
    ours = load_model(tmp_path / "base_orig", dtype=torch.float32, adapter=tmp_path / "orig_adapter")
    assert (logits_of(ours, cfg) - expected).abs().max().item() < 1e-4


def test_bad_adapters_are_named_errors(tmp_path):
    cfg = tiny_config()
    base = hf_model(cfg)
    base.save_pretrained(tmp_path / "base")
    random_peft_model(base, r=2, lora_alpha=4).save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="DoRA"):
        load_model(tmp_path / "base", adapter=tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    wider = dataclasses.replace(cfg.text, intermediate_size=cfg.text.intermediate_size * 2)
    VisionLanguageModel(dataclasses.replace(cfg, text=wider)).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="adapter shape"):
        load_model(tmp_path / "other", adapter=tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_model(tmp_path / "base", adapter=tmp_path)


def test_a_lora_run_writes_an_adapter_peft_applies_to_its_base(tmp_path):
    """sft-style LoRA on the LLM with the MLP trained in full, from a saved base: final_adapter, read by
    PEFT onto transformers' model of the base, gives the logits of the run's merged final/."""
    from transformers import InternVLForConditionalGeneration

    from nativevl.recipes import apply_overrides, launch, recipe

    small = ["--global_batch=2", "--tensorboard=false", "--max_tokens=256"]
    launch(apply_overrides(recipe("debug_tiny"), ["--max_steps=2", *small]), tmp_path / "base")
    launch(apply_overrides(recipe("debug_tiny"), [
        "--max_steps=3", *small, f"--init_from={tmp_path / 'base' / 'final'}", "--stage.llm.mode=lora",
        "--stage.llm.lora_rank=4", "--stage.llm.lora_dropout=0", "--stage.mlp.mode=full", "--stage.vit.mode=frozen"]),
        tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "final_adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["multi_modal_projector"] and config["r"] == 4
    assert config["base_model_name_or_path"] == str(tmp_path / "base" / "final")
    cfg = VisionLanguageModel.from_pretrained(tmp_path / "lora" / "final").config
    ids = torch.tensor([[3] + [cfg.image_token_id] * 4 + [4, 20, 30, 40]])
    pixels = torch.randn(1, 3, 56, 56)
    run = lambda model: model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits
    base = InternVLForConditionalGeneration.from_pretrained(tmp_path / "base" / "final").eval()
    merged = InternVLForConditionalGeneration.from_pretrained(tmp_path / "lora" / "final").eval()
    with torch.no_grad():
        plain = run(base)  # before PEFT wraps the base in place
        adapted = run(peft.PeftModel.from_pretrained(base, tmp_path / "lora" / "final_adapter").eval())
        expected = run(merged)
    assert (adapted - expected).abs().max().item() < 1e-4
    assert (adapted - plain).abs().max().item() > 1e-4  # the run changed the model


@pytest.mark.parametrize("tied, kwargs", [
    (True, {"modules_to_save": ["lm_head"]}),  # PEFT's copy of a tied head is untied: so is the merged model
    (False, {"target_modules": ["lm_head", "q_proj"]}),  # LoRA on the head: PEFT also saves its base weight
])
def test_adapters_on_the_head_of_tied_and_untied_models(tmp_path, tied, kwargs):
    cfg = tiny_config(tied=tied)
    base = hf_model(cfg)
    base.save_pretrained(tmp_path / "base")
    if "target_modules" in kwargs:
        model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, **kwargs))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        peft_model = model.eval()
    else:
        peft_model = random_peft_model(base, r=4, lora_alpha=8, **kwargs)
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = logits_of(peft_model, cfg)
    ours = load_model(tmp_path / "base", dtype=torch.float32, adapter=tmp_path / "adapter")
    assert (logits_of(ours, cfg) - expected).abs().max().item() < 1e-4
    ours.save_pretrained(tmp_path / "merged")  # an untied result is saved untied
    assert (logits_of(VisionLanguageModel.from_pretrained(tmp_path / "merged"), cfg) - expected).abs().max() < 1e-4


def test_a_run_training_the_llm_in_full_exports_without_an_adapter(tmp_path):
    """LoRA on the ViT with the LLM trained in full: an adapter would hold the whole LLM (and the tied head
    broke its writing, losing final/ too): final/ is written, no final_adapter."""
    from nativevl.recipes import apply_overrides, launch, recipe

    small = ["--global_batch=2", "--tensorboard=false", "--max_tokens=256"]
    launch(apply_overrides(recipe("debug_tiny"), ["--max_steps=1", *small]), tmp_path / "base")
    launch(apply_overrides(recipe("debug_tiny"), [
        "--max_steps=2", *small, f"--init_from={tmp_path / 'base' / 'final'}", "--stage.vit.mode=lora",
        "--stage.llm.mode=full"]), tmp_path / "run")
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert not (tmp_path / "run" / "final_adapter").exists()
