"""Scale-out training on the CPU: 2 processes (gloo, FSDP2) give the losses of 1 process with the same
global batch, and their checkpoint (DCP) resumes in 1 process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from nativevl import VisionLanguageModel
from nativevl.recipes import apply_overrides, build, launch, recipe
from nativevl.train import checkpoint as ckpt
from nativevl.train import loop

# one record per pack (max_buffers=0), so that 1 process and 2 ranks put the same records in each step
ARGS = ["--max_steps=3", "--global_batch=2", "--max_buffers=0", "--max_tokens=256", "--tensorboard=false",
        "--save_every=3", "--keep_checkpoints=1"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    # Adam turns rounding-level gradient differences on near-zero gradients into lr-sized steps, so
    # weights are compared by relative norm, not element by element (with an absolute floor for the
    # attention key biases, whose true gradient is zero: they hold rounding noise of about 1e-9)
    return ((a.float() - b.float()).norm() / (b.float().norm() + 1e-4)).item()


def losses(out, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in r}


def one_and_two_processes(args: list[str], one, two) -> tuple[list[dict], list[dict]]:
    """`train debug_tiny ARGS` under torchrun with 2 processes into `two` while the same run goes in this
    process into `one` (on the other core); the metrics of each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nativevl",
           "train", "debug_tiny", "--out", str(two), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    launch(apply_overrides(recipe("debug_tiny"), args), one)
    out, _ = proc.communicate(timeout=300)
    # what went wrong, without the progress bars that fill the output
    assert proc.returncode == 0, "\n".join(x for x in out.replace("\r", "\n").splitlines() if "/s]" not in x)[-6000:]
    read = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    return read(one), read(two)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from nativevl.data import synthetic

    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    # validated every 2 steps on 7 held-out records: the ranks hold 4 and 3 packs (one record each)
    meta = synthetic.write_dataset(tmp_path_factory.mktemp("held_out"), n_images=8, n_texts=4, seed=9, size=56)
    one_and_two_processes(ARGS + [f"--val_meta={meta}", "--val_every=2", "--val_records=7"], one, two)
    return one, two


def test_two_processes_give_the_losses_of_one(runs):
    one, two = runs
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        assert abs(a[s] - b[s]) / abs(a[s]) < 1e-5, (s, a[s], b[s])
    # the validation loss over the same held-out records, sharded unevenly over 2 ranks, is 1 process's
    va, vb = losses(one, "val_loss"), losses(two, "val_loss")
    assert sorted(va) == sorted(vb) == [2, 3]
    for s in va:
        assert abs(va[s] - vb[s]) / abs(va[s]) < 1e-5, (s, va[s], vb[s])
    assert losses(one, "val_tokens") == losses(two, "val_tokens")
    # the export gathered the shards into the same -hf checkpoint
    ours = VisionLanguageModel.from_pretrained(one / "final").state_dict()
    theirs = VisionLanguageModel.from_pretrained(two / "final").state_dict()
    assert ours.keys() == theirs.keys()
    assert max(rel(ours[k], theirs[k]) for k in ours) < 1e-3


def test_a_two_process_checkpoint_resumes_in_one(runs, tmp_path):
    one, two = runs
    saved = ckpt.latest(two / "checkpoints")
    assert saved.name == "step-00000003" and sorted(p.name for p in saved.glob("rank-*.pt")) == [
        "rank-00000.pt", "rank-00001.pt"]
    # the 2-rank shards load into one process's plain model and optimiser: the same state as 1 process reached
    run = apply_overrides(recipe("debug_tiny"), ARGS)
    states = []
    for folder in (one, two):
        model, _, _, run = build(run, tmp_path / "scratch")
        from nativevl.train.optim import build_optimizer
        from nativevl.train.parallel import trainable_by_module
        params = {m: ps for m, ps in trainable_by_module(model).items() if ps}
        opt = build_optimizer(model, params, {m: 1.0 for m in params}, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
        meta, rank_state = loop.load_train_state(ckpt.latest(folder / "checkpoints"), model, opt, 0, 1, 1)
        states.append((meta, rank_state, model.state_dict(), opt.state_dict()))
    (m1, _, w1, o1), (m2, r2, w2, o2) = states
    assert m1["step"] == m2["step"] == 3 and m2["world"] == 2
    assert max(rel(w1[k], w2[k]) for k in w1) < 1e-3
    assert o1["state"].keys() == o2["state"].keys()
    for i in o1["state"]:
        assert rel(o1["state"][i]["exp_avg_sq"], o2["state"][i]["exp_avg_sq"]) < 1e-3
    # the data stream continues after the furthest record either rank had reached
    assert r2["rng"] is not None and r2["data"]["shards"][0]["next"] >= 6

    shutil.copytree(two, tmp_path / "resumed", ignore=shutil.ignore_patterns("final"))
    summary = launch(apply_overrides(recipe("debug_tiny"), [*ARGS[1:], "--max_steps=5", "--export=false"]),
                     tmp_path / "resumed")
    got = losses(tmp_path / "resumed")
    assert summary["step"] == 5 and sorted(got) == [1, 2, 3, 4, 5]
    assert all(torch.isfinite(torch.tensor(v)) for v in got.values())


def test_mpo_with_two_processes(tmp_path):
    """The MPO reference is sharded like the policy: 2 ranks give the DPO and NLL terms of 1 process
    (the BCO term differs slightly by design: its reward shift is updated once per micro-batch, and one
    process takes the two micro-batches of a step one after the other)."""
    from tests.test_alignment import MPO_ARGS, preference_meta

    meta = preference_meta(tmp_path)
    args = [a for a in MPO_ARGS if not a.startswith("--save_every")] + [f"--meta={meta}", "--max_steps=3",
                                                                          "--max_buffers=0"]
    a, b = one_and_two_processes(args, tmp_path / "one", tmp_path / "two")
    assert len(a) == len(b) == 3
    assert b[0]["dpo"] == pytest.approx(0.6931472, abs=1e-5)  # the sharded reference equals the policy at step 1
    for x, y in zip(a, b, strict=True):
        assert y["dpo"] == pytest.approx(x["dpo"], rel=1e-4)
        assert y["nll"] == pytest.approx(x["nll"], rel=1e-4)


def test_prm_objective_with_two_processes(tmp_path):
    """The two-way PRM objective's normalisers (label weights, label slots) are summed over ranks: 2
    processes give the loss and label loss of 1 process with the same global batch."""
    from tests.test_alignment import PRM_ARGS, prm_meta

    args = [*PRM_ARGS, f"--meta={prm_meta(tmp_path)}", "--prm_placeholder=+", "--max_steps=3", "--max_buffers=0"]
    a, b = one_and_two_processes(args, tmp_path / "one", tmp_path / "two")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["label_loss"] == pytest.approx(x["label_loss"], rel=1e-5)
        assert y["label_accuracy"] == x["label_accuracy"]


def test_a_sharded_lora_run_writes_the_adapter_peft_applies(tmp_path):
    """2 processes (FSDP2) training LoRA on the LLM and the MLP in full from a saved base: the gathered
    final_adapter, read by PEFT onto transformers' model of the base, gives the merged final/'s logits."""
    peft = pytest.importorskip("peft")
    from transformers import InternVLForConditionalGeneration

    launch(apply_overrides(recipe("debug_tiny"), ["--max_steps=1", *ARGS[1:]]), tmp_path / "base")
    base_dir = tmp_path / "base" / "final"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nativevl",
           "train", "debug_tiny", "--out", str(tmp_path / "two"), *ARGS, f"--init_from={base_dir}",
           "--stage.llm.mode=lora", "--stage.llm.lora_rank=4", "--stage.llm.lora_dropout=0", "--stage.mlp.mode=full",
           "--stage.vit.mode=frozen"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ids = torch.tensor([[3] + [VisionLanguageModel.from_pretrained(base_dir).config.image_token_id] * 4 + [4, 20, 30]])
    pixels = torch.randn(1, 3, 56, 56)
    run = lambda m: m(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits
    with torch.no_grad():
        merged = run(InternVLForConditionalGeneration.from_pretrained(tmp_path / "two" / "final").eval())
        base = InternVLForConditionalGeneration.from_pretrained(base_dir).eval()
        adapted = run(peft.PeftModel.from_pretrained(base, tmp_path / "two" / "final_adapter").eval())
    assert (adapted - merged).abs().max().item() < 1e-4


def test_a_sharded_qlora_run_exports_the_model_it_trained(tmp_path):
    """2 processes (FSDP2) training LoRA over the LLM stored in NF4 (whose codes are replicated buffers, not
    sharded parameters): final/ is the 4-bit base, decoded, with the gathered adapter merged."""
    from nativevl.io.hf import load_model
    from nativevl.train.qlora import NF4Linear
    from nativevl.train.stages import quantize_base

    launch(apply_overrides(recipe("debug_tiny"), ["--max_steps=1", *ARGS[1:]]), tmp_path / "base")
    base_dir = tmp_path / "base" / "final"
    qlora = ["--stage.llm.mode=qlora", "--stage.llm.lora_rank=4", "--stage.llm.lora_dropout=0",
             "--stage.mlp.mode=full", "--stage.vit.mode=frozen"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nativevl",
           "train", "debug_tiny", "--out", str(tmp_path / "two"), *ARGS, f"--init_from={base_dir}", *qlora]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    # the base as the run held it: its LLM layers quantized, then decoded
    decoded = load_model(base_dir, dtype=torch.float32)
    quantize_base(decoded, apply_overrides(recipe("debug_tiny"), qlora).stage)
    for module in list(decoded.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, NF4Linear):
                setattr(module, name, child.to_linear())
    decoded.save_pretrained(tmp_path / "decoded")
    ids = torch.tensor([[3] + [decoded.config.image_token_id] * 4 + [4, 20, 30]])
    pixels = torch.randn(1, 3, 56, 56)
    run = lambda m: m(input_ids=ids, pixel_values=pixels).logits
    # the adapter as PEFT reads it: without nativevl's note that the base is to be decoded from 4 bits
    shutil.copytree(tmp_path / "two" / "final_adapter", tmp_path / "peft_adapter")
    (tmp_path / "peft_adapter" / "nativevl_qlora.json").unlink()
    with torch.no_grad():
        exported = run(load_model(tmp_path / "two" / "final", dtype=torch.float32))
        expected = run(load_model(tmp_path / "decoded", dtype=torch.float32, adapter=tmp_path / "peft_adapter"))
        as_noted = run(load_model(base_dir, dtype=torch.float32, adapter=tmp_path / "two" / "final_adapter"))
        plain = run(load_model(base_dir, dtype=torch.float32, adapter=tmp_path / "peft_adapter"))
    assert (exported - expected).abs().max().item() < 1e-5
    assert (exported - as_noted).abs().max().item() < 1e-5  # --adapter decodes the base as the note says
    assert (exported - plain).abs().max().item() > 1e-3  # the 4-bit base is not the full one


def test_a_sharded_bf16_run_keeps_its_frozen_layers_in_bf16_and_trains_as_with_fp32_ones(tmp_path):
    """FSDP2 over 2 processes with bf16 compute (its gathers in bf16): the frozen ViT and LoRA base kept in
    bf16 (trainable shards stay fp32, as FSDP2 needs one dtype among them) give the float32-kept run's losses
    and gradient norms exactly."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    lora = ["--dtype=bfloat16", "--stage.llm.mode=lora", "--stage.llm.lora_rank=4", "--stage.llm.lora_dropout=0",
            "--stage.vit.mode=frozen", "--export=false"]
    seen = {}
    for frozen in ("float32", "bfloat16"):  # (this random initialisation is rounded: auto would keep it float32)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nativevl",
               "train", "debug_tiny", "--out", str(tmp_path / frozen), *ARGS, *lora, f"--frozen_dtype={frozen}"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        assert ("frozen linear layers kept in torch.bfloat16" in proc.stdout + proc.stderr) == (frozen == "bfloat16")
        lines = [json.loads(x) for x in (tmp_path / frozen / "metrics.jsonl").read_text().splitlines()]
        seen[frozen] = [(m["loss"], m["grad_norm"]) for m in lines if "loss" in m]
    assert seen["bfloat16"] == seen["float32"] and len(seen["bfloat16"]) == 3


def test_ranks_skip_a_step_marked_out_of_memory_together(tmp_path):
    """A resumed run skips the step whose batches ran out of memory on every rank, though only rank 1's
    batch is marked (its rank ran out; rank 0 skips by agreement, or its collectives would wait forever);
    2 processes then give the losses of 1 process that skips the same records."""
    one, two = tmp_path / "one", tmp_path / "two"
    for out, rank, indices in [(one, 0, [[2], [3]]), (two, 1, [[3]])]:  # step 2 reads stream items 2 and 3
        out.mkdir()
        (out / f"oom-step2-rank{rank}.json").write_text(json.dumps({"step": 2, "rank": rank, "indices": indices}))
    a, b = one_and_two_processes(ARGS + ["--max_skipped_steps=1", "--export=false"], one, two)
    assert [r["loss"] is None for r in a] == [r["loss"] is None for r in b] == [False, True, False]
    assert b[1]["skipped_steps"] == 1
    for x, y in zip(a, b, strict=True):
        if x["loss"] is not None:
            assert abs(x["loss"] - y["loss"]) / abs(x["loss"]) < 1e-5
