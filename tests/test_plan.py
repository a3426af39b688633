"""`nativevl plan`: parameter counts equal the model's (built on the meta device), and the advice."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nativevl import VisionLanguageModel
from nativevl.cli import main
from nativevl.config import preset
from nativevl.train.plan import GiB, advice, param_counts, plan


@pytest.mark.parametrize("name", ["tiny", "internvl3_1b", "internvl3_2b", "internvl3_38b"])
def test_parameter_counts_match_the_model(name):
    cfg = preset(name)
    with torch.device("meta"):
        model = VisionLanguageModel(cfg)
    counts = param_counts(cfg)
    assert counts["vit"] == sum(p.numel() for p in model.vision_tower.parameters())
    assert counts["mlp"] == sum(p.numel() for p in model.multi_modal_projector.parameters())
    assert counts["llm"] == sum(p.numel() for p in {id(p): p for p in [*model.language_model.parameters(),
                                                                       model.lm_head.weight]}.values())
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())  # tied weights counted once


def test_sharding_divides_the_states_and_checkpointing_the_activations():
    cfg = preset("internvl3_2b")
    full = dict(param_counts(cfg))
    one = plan(cfg, full, gpus=1, tokens=16384, tiles=48, activation_checkpointing=False)
    eight = plan(cfg, full, gpus=8, tokens=16384, tiles=48, activation_checkpointing=False)
    assert abs(one.optimizer - 8 * sum(full.values())) < 8 and eight.optimizer * 8 - one.optimizer < 64
    assert eight.activations == one.activations
    ac = plan(cfg, full, gpus=1, tokens=16384, tiles=48, activation_checkpointing=True)
    assert ac.activations < one.activations / 5
    # 16 B per parameter before activations (B3: about 30 GB for 1.9B)
    assert 25 * GiB < one.parameters + one.gradients + one.optimizer < 32 * GiB
    hints = advice(cfg, full, gpus=1, tokens=16384, tiles=48, activation_checkpointing=False, loss_chunk=4096,
                   gpu_bytes=80 * GiB)
    assert hints and "activation_checkpointing=true" in hints[0]


def test_plan_command(capsys):
    assert main(["plan", "debug_tiny", "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "fits in 80 GiB" in out and "optimizer" in out
    assert main(["plan", "sft", "--preset", "internvl3_2b", "--gpu_memory", "24"]) == 1
    assert "to fit:" in capsys.readouterr().out


def _full(cfg):
    return dict(param_counts(cfg))


def test_no_gpu_memory_is_an_error_not_a_division_by_zero():
    cfg = preset("tiny")
    with pytest.raises(ValueError, match="gpu_bytes"):
        plan(cfg, _full(cfg), gpus=1, tokens=512, tiles=2, activation_checkpointing=False, gpu_bytes=0)


def test_one_gpu_counts_the_bf16_autocast_copies():
    # one process trains the plain fp32 module under bf16 autocast: autocast caches a bf16 copy of every
    # trainable weight for the forward, and backward keeps them; 4 B/param alone undercounts by a third
    cfg = preset("internvl3_2b")
    full = _full(cfg)
    p = plan(cfg, full, gpus=1, tokens=16384, tiles=48, activation_checkpointing=False)
    assert p.parameters >= 6 * sum(full.values())


def test_gradients_count_the_fp32_reduce_scatter_and_the_gathered_root_grads():
    # FSDP2 with reduce_dtype=float32: a block's bf16 gradients are copied into an fp32 reduce-scatter
    # buffer of the whole block (2 + 4 B per parameter); the root (embeddings, lm_head) stays gathered
    # through backward, so its bf16 gradients live until the end of backward
    from nativevl.train.plan import llm_params

    cfg = preset("internvl3_2b")
    full = _full(cfg)
    p = plan(cfg, full, gpus=8, tokens=16384, tiles=48, activation_checkpointing=True)
    llm = llm_params(cfg)
    assert p.gradients >= 4 * sum(full.values()) // 8 + 6 * llm["block"] + 2 * llm["root"]


def test_frozen_vit_keeps_no_activations_with_checkpointing():
    cfg = preset("internvl3_2b")
    frozen_vit = {**_full(cfg), "vit": 0}
    for ac in (False, True):
        with_tiles = plan(cfg, frozen_vit, gpus=8, tokens=16384, tiles=48, activation_checkpointing=ac)
        no_tiles = plan(cfg, frozen_vit, gpus=8, tokens=16384, tiles=0, activation_checkpointing=ac)
        assert with_tiles.activations == no_tiles.activations


def test_smaller_pack_advice_fits_with_the_mpo_reference():
    # MPO holds a frozen copy of the model: the suggested --max_tokens must fit with it too
    import re

    cfg = preset("internvl3_2b")
    full = _full(cfg)
    kw = {"gpus": 1, "activation_checkpointing": True, "loss_chunk": 4096, "gpu_bytes": 48 * GiB, "reference": True}
    hints = advice(cfg, full, tokens=16384, tiles=48, **kw)
    found = [re.search(r"--max_tokens=(\d+) --max_tiles=(\d+)", h) for h in hints]
    found = [m for m in found if m]
    assert found
    for m in found:
        assert plan(cfg, full, tokens=int(m[1]), tiles=int(m[2]), **kw).fits


def test_a_loss_chunk_below_one_is_an_error_not_a_free_loss():
    # training cannot run with loss_chunk 0 (range step 0); the plan counted the logits as 0 bytes
    cfg = preset("tiny")
    with pytest.raises(ValueError, match="loss_chunk"):
        plan(cfg, _full(cfg), gpus=1, tokens=512, tiles=2, activation_checkpointing=False, loss_chunk=0)


def test_256_token_packs_are_suggested_when_they_are_what_fits():
    """The halving stopped at 256 without trying it: a plan that fits only at 256-token packs was told to
    freeze modules or use LoRA."""
    cfg = preset("tiny")
    full = _full(cfg)
    base = {"gpus": 1, "tiles": 0, "activation_checkpointing": True, "loss_chunk": 4096, "reference": False}
    fits_at_256 = plan(cfg, full, tokens=256, **base, gpu_bytes=10**15).total + 1
    assert not plan(cfg, full, tokens=512, **base, gpu_bytes=fits_at_256).fits
    hints = advice(cfg, full, tokens=1024, **base, gpu_bytes=fits_at_256)
    assert any(h.startswith("--max_tokens=256 ") for h in hints), hints


def test_a_training_run_that_would_not_fit_its_gpu_stops_before_it_starts(tmp_path, monkeypatch, caplog):
    """On a GPU, train checks the plan first: a run whose lower bound is over the GPU's memory stops with
    the plan and what would fit (no checkpoint, nothing trained); with --memory_check=warn it is warned
    about and trains; a GPU with the room trains without a word. The CPU is never checked (here the
    device's memory is pretended)."""
    import logging

    from nativevl.recipes import apply_overrides, launch, recipe
    from nativevl.train import loop

    args = ["--max_steps=1", "--global_batch=2", "--tensorboard=false", "--max_tokens=256", "--export=false"]
    monkeypatch.setattr(loop, "device_memory", lambda device: 2 * GiB)  # under the plan's 3 GiB of overhead alone
    with pytest.raises(ValueError, match=r"(?s)not to fit the 2.0 GiB.*total.*does NOT fit.*to fit: .*memory_check=warn"):
        launch(apply_overrides(recipe("debug_tiny"), args), tmp_path / "stopped")
    assert not (tmp_path / "stopped" / "metrics.jsonl").exists()
    for name, budget, extra, said in [("warned", 2 * GiB, ["--memory_check=warn"], "not to fit"),
                                      ("fits", 80 * GiB, [], None)]:
        caplog.clear()
        monkeypatch.setattr(loop, "device_memory", lambda device, budget=budget: budget)
        with caplog.at_level(logging.WARNING, logger="nativevl.train.loop"):
            launch(apply_overrides(recipe("debug_tiny"), [*args, *extra]), tmp_path / name)
        assert (tmp_path / name / "metrics.jsonl").is_file()
        assert (said in caplog.text) if said else ("GiB of each GPU" not in caplog.text), name


@pytest.mark.parametrize("gib, outcome", [(24, "stops"), (29, "warns"), (32, "quiet")])
def test_the_memory_check_stops_only_what_cannot_fit(gib, outcome, monkeypatch, caplog):
    """The plan's activations are an estimate (within about 25%), its other terms exact: InternVL3-8B with
    LoRA at 4,096 tokens (its frozen base in bf16, its adapters in fp32) is estimated at 30.1 GiB and at least
    28.4 GiB (the activations 25% under): a 24 GiB GPU stops the run, a 29 GiB one is warned about, a 32 GiB one runs."""
    import logging
    from types import SimpleNamespace

    from nativevl.data.pipeline import DataConfig
    from nativevl.recipes import recipe
    from nativevl.train import loop

    run = recipe("sft_lora")
    cfg = dataclasses.replace(run.train, activation_checkpointing=True)
    with torch.device("meta"):  # shapes only: a released (bf16) checkpoint of this shape
        model = VisionLanguageModel(preset("internvl3_8b"))
    dataset = SimpleNamespace(cfg=DataConfig(max_tokens=4096, max_tiles=12))
    monkeypatch.setattr(loop, "device_memory", lambda device: gib * GiB)
    check = lambda: loop.check_memory(model, run.stage, cfg, dataset, 1, torch.device("cpu"), True)
    with caplog.at_level(logging.WARNING, logger="nativevl.train.loop"):
        if outcome == "stops":
            with pytest.raises(ValueError, match=r"not to fit the 24.0 GiB .* at least 28.4 GiB, about 30.1 GiB"):
                check()
        else:
            check()
    assert ("at the limit of the 29.0 GiB" in caplog.text) == (outcome == "warns")
    assert ("GiB of each GPU" in caplog.text) == (outcome == "warns")


def test_a_resume_may_change_the_memory_check(tmp_path, monkeypatch):
    """A run refused on resume (a smaller GPU, say) can be resumed with --memory_check=warn or off."""
    from nativevl.recipes import apply_overrides, launch, recipe
    from nativevl.train import loop

    args = ["--max_steps=1", "--global_batch=2", "--tensorboard=false", "--max_tokens=256", "--export=false",
            "--save_every=1"]
    launch(apply_overrides(recipe("debug_tiny"), args), tmp_path)
    monkeypatch.setattr(loop, "device_memory", lambda device: 2 * GiB)
    with pytest.raises(ValueError, match="not to fit"):
        launch(apply_overrides(recipe("debug_tiny"), [*args, "--max_steps=2"]), tmp_path)
    launch(apply_overrides(recipe("debug_tiny"), [*args, "--max_steps=2", "--memory_check=off"]), tmp_path)
    assert '"step": 2' in (tmp_path / "metrics.jsonl").read_text()


def _bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_frozen_linear_layers_in_bf16_take_what_the_model_holds():
    """--frozen_dtype=auto: the plan's shards are the bytes a (meta-device) model holds after
    `store_frozen`: a LoRA run's base and frozen ViT at 2 B per weight, MPO's reference likewise."""
    from nativevl.recipes import recipe
    from nativevl.train.plan import run_inputs
    from nativevl.train.stages import apply_policy, quantize_base, store_frozen

    cfg = preset("internvl3_2b")
    stage = recipe("sft_lora").stage
    with torch.device("meta"):
        fp32 = VisionLanguageModel(cfg)
        apply_policy(fp32, stage)
        half = VisionLanguageModel(cfg)
        apply_policy(half, stage)
        store_frozen(half, torch.bfloat16, exact_only=False)
        reference = VisionLanguageModel(cfg).requires_grad_(False)
        quantize_base(reference, stage)
        store_frozen(reference, torch.bfloat16, exact_only=False)
    assert _bytes(half) < 0.6 * _bytes(fp32)
    kw = {"tokens": 8192, "tiles": 12, "loss_chunk": 4096, "gpu_bytes": 80 * GiB}
    trainable, on = run_inputs(cfg, stage, reference=False, frozen_bf16=True, **kw)
    _, off = run_inputs(cfg, stage, reference=False, frozen_bf16=False, **kw)
    n = 8
    plans = {name: plan(cfg, trainable, gpus=n, activation_checkpointing=True, **k) for name, k in (("on", on), ("off", off))}
    # the gathered bf16 copies do not depend on how the shards are kept: the difference is the shards'
    assert plans["off"].parameters - plans["on"].parameters == -(-_bytes(fp32) // n) - -(-_bytes(half) // n)
    _, mpo = run_inputs(cfg, stage, reference=True, frozen_bf16=True, **kw)
    with_ref = plan(cfg, trainable, gpus=n, activation_checkpointing=True, **mpo)
    assert with_ref.parameters - plans["on"].parameters == -(-_bytes(reference) // n)
    # one GPU: no autocast copy of a weight kept in bf16 either; an 8B LoRA run's weights drop from 44 to 17 GiB
    big = preset("internvl3_8b")
    trainable, on = run_inputs(big, stage, reference=False, frozen_bf16=True, **kw)
    _, off = run_inputs(big, stage, reference=False, frozen_bf16=False, **kw)
    one = {name: plan(big, trainable, gpus=1, activation_checkpointing=True, **k).parameters for name, k in (("on", on), ("off", off))}
    assert one["on"] < 18 * GiB and one["off"] > 40 * GiB


def test_frozen_layers_count_as_bf16_over_a_bf16_base_only(tmp_path):
    """--frozen_dtype=auto keeps frozen layers in bf16 only where bf16 holds them exactly: `plan --init_from`
    reads the checkpoint's stored dtypes, the memory check the loaded weights."""
    from nativevl.io.hf import load_model
    from nativevl.recipes import apply_overrides, recipe
    from nativevl.train.plan import frozen_in_bf16
    from nativevl.train.stages import bf16_base

    model = VisionLanguageModel(preset("tiny"))
    model.init_weights()
    model.save_pretrained(tmp_path / "f32")
    model.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert not bf16_base(load_model(tmp_path / "f32", dtype=torch.float32))
    assert bf16_base(load_model(tmp_path / "bf16", dtype=torch.float32))
    run = lambda *a: apply_overrides(recipe("sft_lora"), list(a))
    assert frozen_in_bf16(run(f"--init_from={tmp_path / 'bf16'}"))
    assert not frozen_in_bf16(run(f"--init_from={tmp_path / 'f32'}"))
    assert frozen_in_bf16(run(f"--init_from={tmp_path / 'f32'}", "--frozen_dtype=bfloat16"))
    assert not frozen_in_bf16(run(f"--init_from={tmp_path / 'bf16'}", "--frozen_dtype=float32"))
    assert frozen_in_bf16(run()) and not frozen_in_bf16(run("--dtype=float32"))


def test_lora_adapters_are_counted_where_they_live(monkeypatch):
    """The adapters were missing from the weights (r=16 and r=256 planned alike), and with several GPUs
    they were counted as gathered-root gradients (LoRA leaves the root frozen)."""
    from nativevl.recipes import recipe
    from nativevl.train.plan import run_inputs

    cfg = preset("internvl3_8b")
    kw = {"tokens": 4096, "tiles": 12, "loss_chunk": 4096, "gpu_bytes": 80 * GiB, "reference": False}
    stage = recipe("sft_lora").stage
    big = dataclasses.replace(stage, llm=dataclasses.replace(stage.llm, lora_rank=256))
    plans = {}
    for name, st in (("r16", stage), ("r256", big)):
        trainable, inputs = run_inputs(cfg, st, **kw)
        assert inputs["trainable_roots"]["llm"] == 0 and inputs["adapters"] == trainable["llm"] + trainable["vit"]
        plans[name] = {g: plan(cfg, trainable, gpus=g, activation_checkpointing=True, **inputs) for g in (1, 8)}
        extra, n_train, roots = inputs["adapters"], sum(trainable.values()), inputs["trainable_roots"]
        llm_block = trainable["llm"] / cfg.text.num_hidden_layers  # one LLM block's adapters, reduce-scattered in fp32
        # the root's trainable weights: the projector (trained in full), none of the LLM's or the ViT's
        assert plans[name][8].gradients == pytest.approx(4 * n_train / 8 + 2 * sum(roots.values()) + 6 * llm_block, rel=0.01)
    grown = plans["r256"][1].parameters - plans["r16"][1].parameters
    _, small = run_inputs(cfg, stage, **kw)
    assert grown == pytest.approx(6 * (extra - small["adapters"]), rel=0.01)  # fp32 + autocast's bf16 copy


def test_peak_flops_by_card_name(monkeypatch):
    from nativevl.train import metrics

    cuda = torch.device("cuda")
    for name, tflops in (("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
                         ("NVIDIA H200", 989.4), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A10G", 125)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert metrics.peak_flops(cuda) == pytest.approx(tflops * 1e12), name


def test_lora_dropout_keeps_its_inputs_for_backward():
    """LoRA dropout keeps each adapted layer's dropped input (bf16) and mask (1 B) per token for backward
    (half again of the LLM's activations for sft_lora without checkpointing); the plan left them out."""
    from nativevl.recipes import apply_overrides, recipe
    from nativevl.train.plan import stage_counts

    cfg, t = preset("internvl3_1b"), preset("internvl3_1b").text
    q = t.num_attention_heads * t.head_dim  # the inputs of q/k/v (d each), o (q), gate/up (d each), down
    counts = {}
    for p in ("0.05", "0"):
        stage = apply_overrides(recipe("sft_lora"), [f"--stage.llm.lora_dropout={p}"]).stage
        trainable, _, _, layout = stage_counts(cfg, stage)
        counts[p] = (trainable, layout)
    (trainable, with_dropout), (_, without) = counts["0.05"], counts["0"]
    assert with_dropout["dropout"] == {"vit": 0, "mlp": 0, "llm": 3 * (3 * t.hidden_size + q + 2 * t.hidden_size
                                                                       + t.intermediate_size)}
    assert without["dropout"] == {"vit": 0, "mlp": 0, "llm": 0}
    kw = {"gpus": 1, "tokens": 4096, "tiles": 4}
    for checkpointing, layers in ((False, t.num_hidden_layers), (True, 1)):  # a checkpointed block: one at a time
        a = plan(cfg, trainable, activation_checkpointing=checkpointing, **kw, **with_dropout)
        b = plan(cfg, trainable, activation_checkpointing=checkpointing, **kw, **without)
        assert a.activations - b.activations == with_dropout["dropout"]["llm"] * 4096 * layers
