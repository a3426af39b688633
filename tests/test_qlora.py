"""QLoRA: the LLM's linear layers stored in NF4 with double quantization, as bitsandbytes stores them, with
LoRA over them. The storage is bitsandbytes' (oracle: bitsandbytes itself); a layer's forward and backward
are nn.Linear's on the dequantized weight without keeping it for backward; a QLoRA run exports the model
it trained, which transformers + bitsandbytes + PEFT compute from the run's final_adapter, and resumes
exactly; `nativevl plan` counts the 4-bit base."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_train import launch_stopped_at, losses

from nativevl import VisionLanguageModel
from nativevl.cli import main
from nativevl.config import preset
from nativevl.io.hf import load_model
from nativevl.recipes import apply_overrides, build, launch, recipe
from nativevl.train import loop
from nativevl.train.lora import LoRALinear
from nativevl.train.plan import GiB, param_counts, plan, stage_counts
from nativevl.train.qlora import NF4Linear, dequantize_nf4, nf4_bytes_per_weight, quantize_nf4

SMALL = ["--global_batch=2", "--tensorboard=false", "--max_tokens=256"]
QLORA = ["--stage.llm.mode=qlora", "--stage.llm.lora_rank=4", "--stage.llm.lora_dropout=0", "--stage.mlp.mode=full",
         "--stage.vit.mode=frozen"]


@pytest.mark.parametrize("shape, block", [((64, 128), 64), ((96, 200), 64), ((33, 17), 64), ((40, 96), 128),
                                          ((1024, 1024), 64)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_storage_is_bitsandbytes(shape, block, double_quant):
    """The same 4-bit codes, packed the same way, and the same weights decoded (by bitsandbytes' torch
    decoder: its CPU C kernel misplaces blocks when a row is not a whole number of blocks, 40 x 96 in blocks
    of 64 or 128). The 8-bit absmax codes of double quantization are the nearest level (as bitsandbytes'
    torch backend takes them); its CPU kernel takes a farther one for a few (0.2% of a 1024 x 1024 weight's),
    near a midpoint or near 0: ours are never farther from their value than its from its."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    reference = pytest.importorskip("bitsandbytes.backends.default.ops")._dequantize_4bit_compute
    g = torch.Generator().manual_seed(shape[0])
    w = torch.randn(*shape, generator=g) * 0.02
    w[0, :5] = 0.0  # a run of zeros, and an outlier that owns its block's scale
    w[-1, -1] = 0.5
    q, state = bnb.quantize_4bit(w, blocksize=block, quant_type="nf4", compress_statistics=double_quant)
    ours = quantize_nf4(w, block, double_quant)
    assert torch.equal(ours["codes"], q.view(-1))
    assert ours["codes"].numel() == (w.numel() + 1) // 2
    if double_quant:
        # our offset is the float64 mean rounded once (the same on every device and thread count),
        # bitsandbytes' a float32 sum's: they may differ in the last bit, and the scales with them
        assert ours["scale_offset"][0].item() == pytest.approx(state.offset.item(), rel=1e-6)
        assert torch.allclose(ours["scale_absmax"], state.state2.absmax, rtol=1e-6, atol=0)
        levels = bnb.create_dynamic_map(signed=True)
        flat = torch.nn.functional.pad(w.reshape(-1), (0, -w.numel() % block)).view(-1, block).abs().amax(1)
        off = lambda codes, offset, scales: (levels[codes.long()] - (flat - offset) / scales.repeat_interleave(256)[:len(flat)]).abs()
        ours_off = off(ours["scale_codes"], ours["scale_offset"][0], ours["scale_absmax"])
        theirs_off = off(state.absmax, state.offset, state.state2.absmax)
        assert (ours_off <= theirs_off + 1e-6).all()  # the offsets differ by about 1e-7 of a value
        assert (ours["scale_codes"] != state.absmax).float().mean() <= 0.01
        # decoding bitsandbytes' whole state (its codes, scales and offset) gives its weights
        ours = dict(ours, scale_codes=state.absmax, scale_absmax=state.state2.absmax, scale_offset=state.offset.reshape(1))
        absmax = bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset
    else:
        assert torch.equal(ours["absmax"], state.absmax)
        absmax = state.absmax
    expected = reference(q.view(-1), absmax, state.code, block, shape, torch.float32)
    decoded = dequantize_nf4(ours, shape, block)
    assert torch.equal(decoded, expected)
    assert decoded[-1, -1] == 0.5 and (decoded - w).abs().max() <= 0.5 * 0.17  # NF4's widest half-gap x absmax


def test_an_nf4_layer_computes_its_dequantized_linear_and_keeps_no_weight_for_backward():
    torch.manual_seed(0)
    linear = torch.nn.Linear(192, 128)
    layer = NF4Linear(linear)
    plain = layer.to_linear()
    assert not torch.equal(plain.weight, linear.weight)  # 4 bits are not fp32
    x = torch.randn(5, 192, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    out.square().sum().backward()
    plain(x2).square().sum().backward()
    assert (out - plain(x2)).abs().max() < 1e-5 and (x.grad - x2.grad).abs().max() < 1e-5
    assert not any(t.numel() >= 128 * 192 for t in saved)  # no dequantized weight kept between the passes
    stored = [b for n, b in layer.named_buffers() if n not in ("pairs", "scale_levels")]  # + 3 KB of level tables
    assert sum(b.numel() * b.element_size() for b in stored) == pytest.approx(
        128 * 192 * nf4_bytes_per_weight(), abs=8)  # + the offset and a partial last block of absmaxes
    assert list(layer.state_dict()) == ["bias"]  # the codes are rebuilt from the base, never checkpointed
    # under bf16 autocast it computes in bf16, as nn.Linear does
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x.detach())
    assert low.dtype == torch.bfloat16 and (low.float() - plain(x).detach()).abs().max() < 0.05
    lora = LoRALinear(layer, rank=4, alpha=8)
    assert [n for n, p in lora.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    # training compiles each block on CUDA: the layer traces whole (no graph break), and the compiled
    # forward keeps no decoded weight for backward either (the decode is an opaque operator)
    with torch.no_grad():
        lora.lora_B.normal_()
    compiled = torch.compile(lora, backend="aot_eager", fullgraph=True)
    x3, x4 = (x.detach().clone().requires_grad_(True) for _ in range(2))
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y3 = compiled(x3)
    y = lora(x4)
    y.square().sum().backward()
    y3.square().sum().backward()
    assert (y - y3).abs().max() < 1e-5 and (x4.grad - x3.grad).abs().max() < 1e-4
    assert saved and not any(t.is_floating_point() and t.numel() >= 128 * 192 for t in saved)
    # casting the module leaves the 4-bit weight as it is (its float scales are stored as bit patterns)
    assert torch.equal(NF4Linear(linear).to(torch.bfloat16).dequantized(torch.float32), layer.dequantized(torch.float32))


def test_the_4_bit_base_is_the_same_on_any_number_of_threads():
    """A resume on another machine quantizes its base again: the codes must not depend on how a sum was
    split over threads (a float32 mean of 262,144 absmaxes does)."""
    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)) * 0.02
    threads = torch.get_num_threads()
    try:
        digests = []
        for n in (1, 2):
            torch.set_num_threads(n)
            linear = torch.nn.Linear(4096, 4096, bias=False)
            linear.weight.data = w
            digests.append(NF4Linear(linear).fingerprint())
    finally:
        torch.set_num_threads(threads)
    assert digests[0] == digests[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    launch(apply_overrides(recipe("debug_tiny"), ["--max_steps=2", *SMALL]), out)
    return out / "final"


def test_a_qlora_run_exports_the_model_it_trained(base, tmp_path):
    """The LLM's LoRA targets are NF4 in training and only the adapters train; final/ is the trained
    model (LoRA merged into the dequantized base); its final_adapter in PEFT on transformers' model of the
    base loaded in 4 bits by bitsandbytes (NF4, double quantization) computes final/'s logits, up to
    bitsandbytes' CPU matmul (bf16 absmaxes): within 10% of what the 4 bits themselves change."""
    run = apply_overrides(recipe("debug_tiny"), ["--max_steps=3", *SMALL, f"--init_from={base}", *QLORA, "--export=false"])
    model, tokenizer, dataset, run = build(run, tmp_path)
    loop.train(model, tokenizer, dataset, run.stage, run.train, tmp_path)
    nf4 = [n for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    assert len(nf4) == 7 * model.config.text.num_hidden_layers and all(n.startswith("language_model.") for n in nf4)
    trains = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or n.startswith("multi_modal_projector.") for n in trains)
    assert not any(k.endswith("proj.base.weight") and k.startswith("language_model.") for k in model.state_dict())
    assert all(m.lora_B.abs().max() > 0 for m in model.modules() if isinstance(m, LoRALinear))  # each one trained
    model.eval()
    batch = next(iter(dataset))
    with torch.no_grad():
        trained = model(**batch.model_inputs()).logits
        loop.export_final(model, tokenizer, tmp_path / "final", True, run.stage)
        exported = VisionLanguageModel.from_pretrained(tmp_path / "final")(**batch.model_inputs()).logits
    assert (trained - exported).abs().max() < 1e-5
    # nativevl's --adapter merges a QLoRA adapter into the decoded 4-bit base too (the note beside it)
    assert json.loads((tmp_path / "final_adapter" / "nativevl_qlora.json").read_text())["modules"] == {
        "llm": {"nf4_block": 64, "double_quant": True}}
    with torch.no_grad():
        adapted = load_model(base, dtype=torch.float32, adapter=tmp_path / "final_adapter")(**batch.model_inputs()).logits
    assert (adapted - exported).abs().max() < 1e-5

    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from transformers import BitsAndBytesConfig, InternVLForConditionalGeneration

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32,
                             llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"])
    ids = torch.tensor([[3] + [model.config.image_token_id] * 4 + [4, 20, 30, 40]])
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    logits = lambda m: m(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits
    with torch.no_grad():
        four_bit = InternVLForConditionalGeneration.from_pretrained(base, quantization_config=bnb, dtype=torch.float32)
        in_4_bits = logits(peft.PeftModel.from_pretrained(four_bit.eval(), tmp_path / "final_adapter").eval())
        full = InternVLForConditionalGeneration.from_pretrained(base).eval()
        in_full = logits(peft.PeftModel.from_pretrained(full, tmp_path / "final_adapter").eval())
        ours = logits(InternVLForConditionalGeneration.from_pretrained(tmp_path / "final").eval())
    effect = (in_full - ours).abs().max().item()
    assert effect > 1e-3  # the 4-bit base is not the full one
    assert (in_4_bits - ours).abs().max().item() < 0.1 * effect


def test_a_bf16_base_gives_the_model_its_qlora_run_trained(base, tmp_path):
    """Released checkpoints are bf16: training quantizes their weights read into float32, and so does
    `--adapter` (the decoded weights are not rounded to bf16 on the way)."""
    load_model(base, dtype=torch.float32).save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    launch(apply_overrides(recipe("debug_tiny"), ["--max_steps=2", *SMALL, f"--init_from={tmp_path / 'bf16'}",
                                                  *QLORA]), tmp_path / "run")
    cfg = VisionLanguageModel.from_pretrained(tmp_path / "run" / "final").config
    ids = torch.tensor([[3] + [cfg.image_token_id] * 4 + [4, 20, 30, 40]])
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exported = load_model(tmp_path / "run" / "final", dtype=torch.float32)(input_ids=ids, pixel_values=pixels).logits
        adapted = load_model(tmp_path / "bf16", dtype=torch.float32, adapter=tmp_path / "run" / "final_adapter")(
            input_ids=ids, pixel_values=pixels).logits
    assert (adapted - exported).abs().max() < 1e-5


def test_a_qlora_run_resumes_exactly_and_only_on_its_own_base(base, tmp_path, monkeypatch):
    """Checkpoints hold no 4-bit codes: a resume quantizes the base again, and refuses a base (the same
    folder, re-written) that quantizes otherwise."""
    shutil.copytree(base, tmp_path / "base")
    args = ["--max_steps=5", "--save_every=1", *SMALL, f"--init_from={tmp_path / 'base'}", *QLORA, "--export=false"]
    run = apply_overrides(recipe("debug_tiny"), args)
    launch(run, tmp_path / "whole")
    launch_stopped_at(run, tmp_path / "resumed", monkeypatch)
    launch(run, tmp_path / "resumed")  # re-quantizes the base, reads the adapters and optimizer state
    assert losses(tmp_path / "resumed") == losses(tmp_path / "whole")
    model = load_model(tmp_path / "base", dtype=torch.float32)
    with torch.no_grad():
        model.language_model.layers[0].mlp.up_proj.weight.mul_(1.1)
    model.save_pretrained(tmp_path / "base")
    more = apply_overrides(recipe("debug_tiny"), [*args, "--max_steps=6"])
    with pytest.raises(ValueError, match="4-bit base quantized otherwise"):
        launch(more, tmp_path / "resumed")


def test_plan_counts_the_4_bit_base(capsys):
    cfg = preset("internvl3_8b")
    t = cfg.text
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    llm_linear = t.num_hidden_layers * (2 * t.hidden_size * q + 2 * t.hidden_size * kv + 3 * t.hidden_size * t.intermediate_size)
    trainable, quantized, nf4_bytes, _ = stage_counts(cfg, recipe("sft_qlora").stage)
    assert quantized == llm_linear and nf4_bytes == nf4_bytes_per_weight()
    assert trainable["vit"] == 0 and trainable["mlp"] == param_counts(cfg)["mlp"]
    assert trainable == stage_counts(cfg, recipe("sft_lora").stage)[0]  # the same adapters, over 4 bits
    kw = {"gpus": 1, "tokens": 4096, "tiles": 12, "activation_checkpointing": True}
    plain, four = plan(cfg, trainable, **kw), plan(cfg, trainable, quantized=quantized, nf4_bytes=nf4_bytes, **kw)
    # fp32 master (4 B) and bf16 copy (2 B) replaced by 0.516 B per quantized weight
    assert plain.parameters - four.parameters == pytest.approx(llm_linear * (6 - nf4_bytes_per_weight()), rel=1e-6)
    assert main(["plan", "sft_qlora", "--preset", "internvl3_8b", "--gpus", "1", "--gpu_memory", "24",
                 "--max_tokens=4096", "--max_tiles=12", "--activation_checkpointing=true"]) == 0
    out = capsys.readouterr().out
    assert "fits in 24 GiB" in out
    assert main(["plan", "sft_lora", "--preset", "internvl3_8b", "--gpus", "1", "--gpu_memory", "24",
                 "--max_tokens=4096", "--max_tiles=12", "--activation_checkpointing=true"]) == 1
    assert four.parameters < 12 * GiB < plain.parameters


def test_mpo_over_a_4_bit_base_starts_from_it(base, tmp_path):
    """MPO's frozen reference is the quantized base the policy starts from, so step 1's log-ratios are 0
    (DPO's loss ln 2), as with a full-precision base."""
    from test_alignment import MPO_ARGS, preference_meta

    meta = preference_meta(tmp_path)
    launch(apply_overrides(recipe("debug_tiny"), [*MPO_ARGS, f"--meta={meta}", "--max_steps=2", f"--init_from={base}",
                                                  *QLORA]), tmp_path / "mpo")
    first = json.loads((tmp_path / "mpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["dpo"] == pytest.approx(0.6931472, abs=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_4_bit_base_takes_what_plan_counts_and_compiles():
    """InternVL3-1B's shape quantized layer by layer onto the GPU holds what `plan` counts (fp32 for the
    rest, NF4 for the LLM's linear layers); a LoRA layer over NF4 compiled by inductor under bf16 autocast
    computes what it computes eagerly, forward and backward."""
    from nativevl.train.stages import apply_policy, quantize_base

    cfg = preset("internvl3_1b")
    stage = recipe("sft_qlora").stage
    model = VisionLanguageModel(cfg)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    quantize_base(model, stage, "cuda")
    model.to("cuda")
    used = torch.cuda.memory_allocated() - before
    _, quantized, nf4_bytes, _ = stage_counts(cfg, stage)
    assert used == pytest.approx((sum(param_counts(cfg).values()) - quantized) * 4 + quantized * nf4_bytes, rel=0.02)
    apply_policy(model, stage)
    layer = model.language_model.layers[0].mlp.down_proj
    assert isinstance(layer, LoRALinear) and isinstance(layer.base, NF4Linear)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.02)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(4, 256, layer.base.in_features, device="cuda")
    outs, grads = [], []
    for module in (layer, compiled):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = module(xi)
        out.float().square().mean().backward()
        outs.append(out.float())
        grads.append(xi.grad)
    assert (outs[0] - outs[1]).abs().max() < 2e-2 * outs[0].abs().max()
    assert (grads[0] - grads[1]).abs().max() < 2e-2 * grads[0].abs().max()
