"""The training loop: exact resume (also after SIGKILL mid-save), module policies, LoRA, non-finite
losses, the chunked loss, export, learning, initialisation from parts, overrides, FLOPs."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_vit_folder

from nativevl import VisionLanguageModel
from nativevl.config import preset
from nativevl.recipes import apply_overrides, build, launch, recipe
from nativevl.train import loop
from nativevl.train.export import export_snapshot
from nativevl.train.losses import labelled_lm_loss, weighted_cross_entropy
from nativevl.train.metrics import batch_flops, module_sizes, pass_factors

SMALL = ["--max_steps=6", "--save_every=1", "--global_batch=2", "--tensorboard=false", "--max_tokens=256"]


def losses(out) -> dict[int, float]:
    by_step = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:  # validation lines hold val_* only
            by_step[rec["step"]] = rec["loss"]
    return by_step


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    launch(apply_overrides(recipe("debug_tiny"), SMALL + ["--export=false"]), out)
    return out, losses(out)


def launch_stopped_at(run, out, monkeypatch, stop: int = 3) -> None:
    """Launch `run` into `out` and stop it (KeyboardInterrupt) right after its checkpoint at step `stop`,
    as a run killed there: the next launch of the same command resumes from that checkpoint."""
    original = loop.save_train_state

    def stop_after(out_dir, model, optimizer, step, *args):
        original(out_dir, model, optimizer, step, *args)
        if step == stop:
            raise KeyboardInterrupt("stopped")

    monkeypatch.setattr(loop, "save_train_state", stop_after)
    with pytest.raises(KeyboardInterrupt):
        launch(run, out)
    monkeypatch.setattr(loop, "save_train_state", original)


def test_resume_after_a_stop_is_bit_exact(uninterrupted, tmp_path, monkeypatch):
    _, ref = uninterrupted
    run = apply_overrides(recipe("debug_tiny"), SMALL + ["--export=false"])
    launch_stopped_at(run, tmp_path, monkeypatch)
    launch(run, tmp_path)  # the same command again: resumes at step 3
    got = losses(tmp_path)
    assert sorted(got) == list(range(1, 7))
    assert all(got[s] == ref[s] for s in range(1, 7)), (got, ref)


def test_a_stopping_signal_saves_after_its_step_and_a_fresh_start_logs_afresh(uninterrupted, tmp_path, monkeypatch):
    """SIGTERM (a preempted job), SIGUSR1 or ^C killed the run where it stood: every step since the last
    checkpoint was lost, and with the default save_every (then 0) every step. Now the step in progress
    ends, its checkpoint is written and the run stops with a message; the same command resumes it
    exactly. A run started again from step 0 (killed before any checkpoint) appended its metrics to the
    old run's (steps 1..8, 1, 2, 3)."""
    import os
    import signal

    from nativevl.cli import main
    from nativevl.train.metrics import MetricsLogger
    from nativevl.train.watch import Interrupted

    _, ref = uninterrupted
    run = apply_overrides(recipe("debug_tiny"), [*SMALL, "--export=false", "--save_every=0"])
    log = MetricsLogger.log

    def log_then_signal(self, record):
        log(self, record)
        if record.get("step") == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during step 2's logging: step 3 is the next to end

    monkeypatch.setattr(MetricsLogger, "log", log_then_signal)
    with pytest.raises(Interrupted, match="asked to stop \\(SIGTERM\\) at step 3 of 6: its checkpoint is saved"):
        launch(run, tmp_path)
    monkeypatch.setattr(MetricsLogger, "log", log)
    assert [c.name for c in (tmp_path / "checkpoints").iterdir()] == ["step-00000003"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are the process's again
    launch(run, tmp_path)
    got = losses(tmp_path)
    assert sorted(got) == list(range(1, 7)) and all(got[s] == ref[s] for s in range(1, 7))

    # a run stopped before its first checkpoint, started again: its log starts again too
    fresh = tmp_path / "fresh"
    assert main(["train", "debug_tiny", "--out", str(fresh), *SMALL[1:], "--max_steps=3", "--export=false"]) == 0
    (fresh / "rejects").mkdir(exist_ok=True)
    (fresh / "rejects" / "rejects-rank0-worker0.jsonl").write_text('{"old": 1}\n')
    for c in (fresh / "checkpoints").iterdir():
        shutil.rmtree(c)
    assert main(["train", "debug_tiny", "--out", str(fresh), *SMALL[1:], "--max_steps=2", "--export=false"]) == 0
    steps = [json.loads(x)["step"] for x in (fresh / "metrics.jsonl").read_text().splitlines()]
    kept = fresh / "rejects" / "rejects-rank0-worker0.jsonl"
    assert steps == [1, 2] and (not kept.exists() or '"old"' not in kept.read_text())


def test_resume_after_sigkill_during_a_save(uninterrupted, tmp_path):
    _, ref = uninterrupted
    killer = f"""
import os, signal
from pathlib import Path
import torch
from nativevl.train import checkpoint
from nativevl.recipes import apply_overrides, launch, recipe
original = checkpoint.save_checkpoint
def save(folder, step, state, keep=2):
    if step == 4:  # half-written temporary folder, then the process dies
        tmp = Path(folder) / ".step-00000004.tmp-x"
        tmp.mkdir(parents=True)
        (tmp / "state.pt").write_bytes(b"partial")
        os.kill(os.getpid(), signal.SIGKILL)
    return original(folder, step, state, keep)
checkpoint.save_checkpoint = save
launch(apply_overrides(recipe("debug_tiny"), {SMALL + ["--export=false"]!r}), {str(tmp_path)!r})
"""
    proc = subprocess.run([sys.executable, "-c", killer], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (tmp_path / "checkpoints" / "step-00000003").is_dir()
    assert not (tmp_path / "checkpoints" / "step-00000004").exists()
    launch(apply_overrides(recipe("debug_tiny"), SMALL + ["--export=false"]), tmp_path)
    got = losses(tmp_path)
    assert all(got[s] == ref[s] for s in range(1, 7)), (got, ref)
    assert not list((tmp_path / "checkpoints").glob(".step-*"))  # the stale temporary folder is cleaned up


def test_a_full_disk_while_saving_stops_the_run_saying_so_and_keeps_the_last_checkpoint(tmp_path, monkeypatch,
                                                                                        capsys, caplog):
    """A full disk ended the run with a bare OSError traceback; a rank whose file failed alone left the others
    waiting in the barrier. Now every rank stops with what happened, how much room there is, and which
    checkpoint the same command resumes from; nothing half-written stays."""
    import errno

    from nativevl.cli import main as cli_main
    from nativevl.train import checkpoint

    original = checkpoint._save_file

    def full_at_step_2(obj, path):
        if ".step-00000002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        original(obj, path)

    monkeypatch.setattr(checkpoint, "_save_file", full_at_step_2)
    args = ["train", "debug_tiny", "--out", str(tmp_path), "--max_steps=3", "--global_batch=2", "--save_every=1",
            "--tensorboard=false", "--export=false"]
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert "stopped: the checkpoint of step 2 could not be written" in err and "No space left on device" in err
    assert "The checkpoint of step 1 is intact: make room, then the same command resumes" in err and "GiB free" in err
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]
    monkeypatch.setattr(checkpoint, "_save_file", original)
    # room made: the same command resumes from step 1; a disk that would not hold another checkpoint is said
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: __import__("shutil")._ntuple_diskusage(1, 1, 1))
    with caplog.at_level("WARNING", logger="nativevl.train.checkpoint"):
        assert cli_main(args) == 0
    assert "GiB free under" in caplog.text and "the next one (step 3 + --save_every) may not fit" in caplog.text
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]


def test_a_save_failing_inside_dcp_is_told_in_one_line_and_a_second_ctrl_c_there_interrupts(tmp_path, monkeypatch):
    """DCP wraps each rank's error, traceback included, in a CheckpointException: the message printed
    15 lines of traceback, and a second ^C during the save (the first asked for it) read as a failed write."""
    import errno

    import torch.distributed.checkpoint.filesystem as dcp_files

    from nativevl.train import checkpoint

    def state(step):
        return {"app": {"model": {"w": torch.zeros(8)}}, "meta": {"step": step}, "rank_state": {}, "rank": 0}

    folder = tmp_path / "checkpoints"
    for step in (1, 2):
        checkpoint.save_checkpoint(folder, step, state(step))
    for error in (OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt(), RuntimeError("odd")):
        def fail(self, *args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(dcp_files.FileSystemWriter, "write_data", fail)
        with pytest.raises(type(error) if isinstance(error, KeyboardInterrupt) else checkpoint.CheckpointNotSaved) as got:
            checkpoint.save_checkpoint(folder, 3, state(3))
        said = str(got.value)
        if isinstance(error, RuntimeError):  # any other failure is told (to every rank) too, with no disk advice
            assert "(RuntimeError: odd)" in said and "once that is fixed, the same command resumes" in said
        elif not isinstance(error, KeyboardInterrupt):
            assert "\n" not in said and "Traceback" not in said and "(OSError: [Errno 28] No space left" in said
            assert f"make room (deleting {folder / 'step-00000001'}, the oldest kept, frees" in said
            assert "The checkpoint of step 2 is intact" in said
        assert sorted(p.name for p in folder.iterdir()) == ["step-00000001", "step-00000002"]  # nothing half-written
    monkeypatch.undo()

    def unpicklable(obj, path):  # a rank's own file failing otherwise than on disk: every rank must hear of it too
        raise TypeError("cannot pickle")

    monkeypatch.setattr(checkpoint, "_save_file", unpicklable)
    with pytest.raises(checkpoint.CheckpointNotSaved, match=r"\(TypeError: cannot pickle\)"):
        checkpoint.save_checkpoint(folder, 3, state(3))


def _save_with_rank_1_full(rank: int, folder: str) -> None:
    import errno

    import torch.distributed as dist

    from nativevl.train import checkpoint

    state = lambda: {"app": {"model": {"w": torch.ones(4)}}, "meta": {"step": 1}, "rank_state": {"r": rank},
                     "rank": rank}
    checkpoint.save_checkpoint(Path(folder), 1, state())
    original = checkpoint._save_file

    def full_on_rank_1(obj, path):
        if rank == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        original(obj, path)

    checkpoint._save_file = full_on_rank_1
    try:
        checkpoint.save_checkpoint(Path(folder), 2, state())
        said = "saved"
    except checkpoint.CheckpointNotSaved as e:
        said = str(e)
    Path(folder, f"said-{rank}.txt").write_text(said)
    dist.barrier()  # both ranks got here: no one waits in the save's collectives


def test_a_checkpoint_that_fails_on_one_rank_stops_every_rank(tmp_path):
    from conftest import run_two_ranks

    run_two_ranks(_save_with_rank_1_full, str(tmp_path))
    for rank in (0, 1):
        said = (tmp_path / f"said-{rank}.txt").read_text()
        assert said.startswith("the checkpoint of step 2 could not be written") and "rank 1: OSError" in said
        assert "The checkpoint of step 1 is intact" in said
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step-00000001"]


def test_frozen_module_and_per_module_learning_rates(tmp_path):
    run = apply_overrides(recipe("debug_tiny"), ["--max_steps=3", "--global_batch=2", "--tensorboard=false",
                                                 "--stage.vit.mode=frozen", "--stage.mlp.lr=0", "--export=false"])
    model, tokenizer, dataset, run = build(run, tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loop.train(model, tokenizer, dataset, run.stage, run.train, tmp_path)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("vision_tower."))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("multi_modal_projector."))  # lr 0
    assert not torch.equal(before["language_model.layers.0.mlp.up_proj.weight"], after["language_model.layers.0.mlp.up_proj.weight"])


def test_lora_trains_only_adapters_and_merges_exactly(tmp_path):
    run = apply_overrides(recipe("debug_tiny"), ["--max_steps=3", "--global_batch=2", "--tensorboard=false",
                                                 "--stage.llm.mode=lora", "--stage.llm.lora_rank=4", "--stage.llm.lora_dropout=0",
                                                 "--export=false"])
    model, tokenizer, dataset, run = build(run, tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loop.train(model, tokenizer, dataset, run.stage, run.train, tmp_path)
    after = model.state_dict()
    lora = [k for k in after if "lora_" in k]
    assert lora and all(k.replace(".base", "") in before for k in after if ".base." in k)
    for k, v in after.items():
        if "lora_A" in k or "lora_B" in k:
            continue
        original = k.replace(".base.", ".")
        if original.startswith(("language_model.", "lm_head")):
            assert torch.equal(v, before[original]), k  # LLM base weights untouched
    assert any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in lora if "lora_B" in k)
    model.eval()
    batch = next(iter(dataset))
    with torch.no_grad():
        adapted = model(**batch.model_inputs()).logits
        loop.export_final(model, tokenizer, tmp_path / "final", True)
        merged = VisionLanguageModel.from_pretrained(tmp_path / "final")(**batch.model_inputs()).logits
    assert (adapted - merged).abs().max().item() < 1e-5


def test_non_finite_loss_names_the_step_and_dumps_the_batch(tmp_path):
    run = apply_overrides(recipe("debug_tiny"), ["--max_steps=3", "--global_batch=2", "--tensorboard=false"])
    model, tokenizer, dataset, run = build(run, tmp_path)
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    with pytest.raises(loop.NonFiniteLoss, match=r"non-finite loss nan at step 1 .*batch dumped to .*nonfinite-step1-rank0\.pt"):
        loop.train(model, tokenizer, dataset, run.stage, run.train, tmp_path)
    dumped = torch.load(tmp_path / "nonfinite-step1-rank0.pt", weights_only=False)
    assert dumped.num_tokens > 0 and dumped.sources


def test_chunked_labelled_loss_equals_full_cross_entropy():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 32, generator=g, requires_grad=True)
    head = torch.randn(1000, 32, generator=g, requires_grad=True)
    labels = torch.randint(0, 1000, (300,), generator=g)
    labels[::3] = -100
    weights = torch.rand(300, generator=g) * (labels != -100)
    full = weighted_cross_entropy(hidden @ head.t(), labels, weights)
    chunked = labelled_lm_loss(hidden, head, labels, weights, chunk_size=37)
    assert abs(chunked.item() - full.item()) / full.item() < 1e-6
    g_full = torch.autograd.grad(full, [hidden, head])
    g_chunk = torch.autograd.grad(chunked, [hidden, head])
    for a, b in zip(g_full, g_chunk):
        assert (a - b).abs().max().item() < 1e-6


def test_training_learns_and_the_export_loads_in_transformers(tmp_path):
    from transformers import InternVLForConditionalGeneration

    run = apply_overrides(recipe("debug_tiny"), ["--max_steps=40", "--tensorboard=true"])
    summary = launch(run, tmp_path)
    curve = [losses(tmp_path)[s] for s in range(1, 41)]
    windows = [sum(curve[i : i + 8]) / 8 for i in range(0, 40, 8)]
    assert all(b < a for a, b in zip(windows, windows[1:])), windows  # steadily lower
    assert windows[-1] < 0.3 * windows[0], windows
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "lr", "tokens", "tokens_per_s", "mfu"} <= set(record) and record["tokens_per_s"] > 0
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert summary["step"] == 40

    ours = VisionLanguageModel.from_pretrained(tmp_path / "final")
    theirs, info = InternVLForConditionalGeneration.from_pretrained(tmp_path / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.tensor([[3] + [ours.config.image_token_id] * 4 + [4, 20, 30, 40]])
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        a = ours(input_ids=ids, pixel_values=pixels).logits
        b = theirs.eval()(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits
    assert (a - b).abs().max().item() < 1e-4


def test_init_from_parts(tmp_path, tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from nativevl.io.parts import init_from_parts

    # an LLM folder as transformers writes it, with a vocabulary that lacks InternVL's tokens
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    llm.save_pretrained(tmp_path / "llm")
    # a standalone InternViT folder (InternVisionModel names, no prefix)
    vit_model = write_vit_folder(tmp_path / "vit")

    model = init_from_parts(tmp_path / "vit", tmp_path / "llm", tokenizer)
    assert model.config.text.vocab_size == max(len(tokenizer), 300)
    sd = model.state_dict()
    for k, v in vit_model.state_dict().items():
        if k.startswith("vision_tower."):
            assert torch.equal(sd[k], v), k
    emb = llm.model.embed_tokens.weight.detach()
    assert torch.equal(sd["language_model.embed_tokens.weight"][:300], emb)
    assert torch.allclose(sd["language_model.embed_tokens.weight"][300:], emb.mean(0).expand(len(tokenizer) - 300, -1))
    assert torch.allclose(sd["lm_head.weight"][300:], llm.lm_head.weight.detach().mean(0).expand(len(tokenizer) - 300, -1))
    assert model.config.text.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.pad_token_id is not None and model.config.text.pad_token_id == tokenizer.pad_token_id


def test_overrides_are_checked():
    run = apply_overrides(recipe("debug_tiny"), ["--lr=0.5", "--stage.vit.mode", "frozen", "--tensorboard=false", "--v2pe=random"])
    assert run.train.lr == 0.5 and run.stage.vit.mode == "frozen" and run.train.tensorboard is False
    assert run.data.v2pe == "random"
    with pytest.raises(ValueError, match="unknown key 'max_stepz'"):
        apply_overrides(run, ["--max_stepz=3"])
    with pytest.raises(ValueError, match="ambiguous"):
        apply_overrides(run, ["--mode=full"])
    with pytest.raises(ValueError, match="takes true or false"):
        apply_overrides(run, ["--tensorboard=maybe"])
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe("nope")


def test_flops_match_the_reference_worked_example():
    """users_and_performance.md B3: InternVL3-8B full SFT, 16,384-token pack of 8 documents, 32 tiles: about 8.05e14."""
    cfg = preset("internvl3_8b")
    with torch.device("meta"):
        sizes = module_sizes(VisionLanguageModel(cfg))
    flops = batch_flops(cfg, sizes, pass_factors({"vit": "full", "mlp": "full", "llm": "full"}), [2048] * 8, 32)
    assert abs(flops - 8.05e14) / 8.05e14 < 0.01
    frozen_vit = pass_factors({"vit": "frozen", "mlp": "full", "llm": "full"})
    assert frozen_vit == {"vit": 2, "mlp": 6, "llm": 6}


def test_resume_with_another_worker_count_repeats_no_record(tmp_path, monkeypatch):
    """Stream item i belongs to shard i % (ranks x workers): a resume with another --num_workers starts
    every new shard after the furthest old position, so no record is trained on twice."""
    consumed: list[list[int]] = []
    original_iter = loop.iterate_batches

    def recording(loader, tracker):
        for batch in original_iter(loader, tracker):
            consumed.append(list(batch.indices))
            yield batch

    monkeypatch.setattr(loop, "iterate_batches", recording)
    launch_stopped_at(apply_overrides(recipe("debug_tiny"), SMALL + ["--export=false", "--num_workers=0"]), tmp_path,
                      monkeypatch)
    before = {i for b in consumed for i in b}
    consumed.clear()
    launch(apply_overrides(recipe("debug_tiny"), SMALL + ["--export=false", "--num_workers=2"]), tmp_path)
    after = [i for b in consumed for i in b]
    assert sorted(losses(tmp_path)) == list(range(1, 7)) and after
    assert not before & set(after), sorted(before & set(after))


def test_a_run_whose_data_runs_out_keeps_its_steps(tmp_path):
    """--max_records ends the stream before --max_steps: the steps trained are checkpointed and exported
    (they were lost with save_every=0: no checkpoint, no final model), and the same command again resumes
    there and trains nothing more."""
    from nativevl.data import synthetic
    from nativevl.train import checkpoint as ckpt

    meta = synthetic.write_dataset(tmp_path / "held_out", n_images=6, n_texts=2, seed=3, size=56)
    run = apply_overrides(recipe("debug_tiny"), ["--max_records=24", "--max_steps=1000", "--tensorboard=false",
                                                 "--max_tokens=256", f"--val_meta={meta}", "--val_records=4"])
    out = tmp_path / "run"
    summary = launch(run, out)
    assert 0 < summary["step"] < 1000
    assert ckpt.latest(out / "checkpoints").name == f"step-{summary['step']:08d}"
    assert VisionLanguageModel.from_pretrained(out / "final").config.image_seq_length == 4
    again = launch(run, out)
    assert again["step"] == summary["step"] and sorted(losses(out)) == list(range(1, summary["step"] + 1))
    assert again["loss"] is None and json.loads(json.dumps(again, allow_nan=False))  # no NaN in its JSON line
    # validated once where the data ended: the second launch, which trains nothing, validates nothing
    val = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
    assert [v["step"] for v in val] == [summary["step"]] and "val_loss" not in again


@pytest.mark.parametrize("vocab_size, image_token_id, message", [
    (300, 5, r"tokenizer has 377 tokens but the model's vocabulary holds 300"),
    (512, 7, r"<IMG_CONTEXT> is token 5 in the tokenizer but 7 in the model"),
])
def test_init_from_a_model_that_does_not_match_its_tokenizer(tmp_path, tokenizer, vocab_size, image_token_id, message):
    """A checkpoint and a tokenizer that disagree are named before training; before, the first forward
    failed with 'IndexError: index out of range in self', or every record was rejected as a
    'placeholder_mismatch' (blaming the data)."""
    import dataclasses

    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=vocab_size), image_token_id=image_token_id)
    VisionLanguageModel(cfg).save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    run = apply_overrides(recipe("debug_tiny"), ["--max_steps=1", "--tensorboard=false", f"--init_from={tmp_path / 'm'}"])
    with pytest.raises(ValueError, match=message):
        launch(run, tmp_path / "run")


def test_non_finite_gradient_stops_before_the_update(tmp_path):
    """A finite loss with an inf gradient (e.g. an overflow in backward): the step is refused before
    AdamW touches the weights. Before, the update turned weights into NaN, the step-1 checkpoint saved
    them, and the error came one step later blaming a healthy batch ('non-finite loss nan at step 2')."""
    run = apply_overrides(recipe("debug_tiny"), ["--max_steps=3", "--global_batch=2", "--tensorboard=false",
                                                 "--save_every=1", "--export=false"])
    model, tokenizer, dataset, run = build(run, tmp_path)
    weight = model.language_model.layers[0].mlp.up_proj.weight
    before = weight.detach().clone()
    weight.register_hook(lambda g: g * float("inf"))
    with pytest.raises(loop.NonFiniteLoss, match=r"non-finite gradient norm \S+ at step 1 .*nonfinite-step1-rank0\.pt"):
        loop.train(model, tokenizer, dataset, run.stage, run.train, tmp_path)
    assert torch.equal(weight.detach(), before)
    assert not (tmp_path / "checkpoints").exists()
    dumped = torch.load(tmp_path / "nonfinite-step1-rank0.pt", weights_only=False)
    assert len(dumped) == 2 and all(b.num_tokens > 0 for b in dumped)


def test_max_skipped_steps_lets_a_long_run_pass_a_few_bad_steps(tmp_path):
    """A batch whose loss or gradient is not finite stopped the run, and every resume met it again.
    With --max_skipped_steps=N the step is skipped (no update, its batch dumped, logged) up to N times."""
    run = apply_overrides(recipe("debug_tiny"), ["--max_steps=4", "--global_batch=2", "--tensorboard=false",
                                                 "--save_every=0", "--export=false", "--max_skipped_steps=2"])
    model, tokenizer, dataset, run = build(run, tmp_path)
    weight = model.language_model.layers[0].mlp.up_proj.weight
    before = weight.detach().clone()
    calls = []

    def blow_up_step_one(g):  # two micro-batches a step: the first step's gradients overflow
        calls.append(1)
        return g * float("inf") if len(calls) <= 2 else g

    weight.register_hook(blow_up_step_one)
    summary = loop.train(model, tokenizer, dataset, run.stage, run.train, tmp_path)
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert summary["step"] == 4 and [m["skipped_steps"] for m in logged] == [1, 1, 1, 1]
    assert logged[0]["loss"] is None and all(m["loss"] > 0 for m in logged[1:])
    assert not torch.equal(weight.detach(), before)  # steps 2-4 trained

    calls.clear()  # three bad steps with two allowed: the third stops the run, as one did before
    run = apply_overrides(recipe("debug_tiny"), ["--max_steps=4", "--global_batch=2", "--tensorboard=false",
                                                 "--save_every=0", "--export=false", "--max_skipped_steps=2"])
    model, tokenizer, dataset, run = build(run, tmp_path / "b")
    model.language_model.layers[0].mlp.up_proj.weight.register_hook(lambda g: g * float("inf"))
    with pytest.raises(loop.NonFiniteLoss, match="non-finite gradient norm .* at step 3"):
        loop.train(model, tokenizer, dataset, run.stage, run.train, tmp_path / "b")


def metric_lines(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def oom_runner(args: list[str]):
    """runner(out, *more_args, oom_at=k): (model, start) for debug_tiny with `args`, the policy's k-th forward
    raising torch.OutOfMemoryError (two batches a step: k = 4 is step 2's second)."""

    def runner(out, *extra, oom_at=None):
        run = apply_overrides(recipe("debug_tiny"), [*args, *extra])
        model, tokenizer, dataset, run = build(run, out)
        calls = []

        def out_of_memory(module, inputs):
            if module is model:  # not MPO's reference, a copy that carries the hook too
                calls.append(1)
                if len(calls) == oom_at:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

        model.register_forward_pre_hook(out_of_memory)
        return model, lambda: loop.train(model, tokenizer, dataset, run.stage, run.train, out,
                                         run_config=dataclasses.asdict(run))

    return runner



def test_an_optimiser_update_out_of_memory_is_told_as_such(tmp_path, monkeypatch, capsys):
    """AdamW makes its state at the first update: running out of memory there is no batch's fault (skipping
    it would meet it again at the next step); it printed a bare traceback."""
    from nativevl.cli import main as cli_main

    real = loop.build_optimizer

    def short_of_memory(*args, **kwargs):
        optimizer = real(*args, **kwargs)

        def step(*a, **k):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

        optimizer.step = step
        return optimizer

    monkeypatch.setattr(loop, "build_optimizer", short_of_memory)
    assert cli_main(["train", "debug_tiny", "--out", str(tmp_path), "--max_steps=2", "--global_batch=1",
                     "--tensorboard=false", "--export=false", "--max_skipped_steps=3"]) == 1
    err = capsys.readouterr().err
    assert "stopped: the optimiser's update at step 1 ran out of device memory" in err and "nativevl plan" in err
    assert not list(tmp_path.glob("oom-step*"))  # no batch marked

def test_an_mpo_step_skipped_in_place_for_memory_equals_one_skipped_on_the_resume(tmp_path):
    """MPO updates its reward shift in each batch's forward: a step whose second batch ran out of memory
    kept the first one's update when skipped in place, not when skipped on the resume (and the random
    draws of the batches that ran were spent). Both now give the same run."""
    from test_alignment import MPO_ARGS, preference_meta

    from nativevl.train.watch import OutOfMemory

    runner = oom_runner([*MPO_ARGS, f"--meta={preference_meta(tmp_path)}", "--max_steps=3"])
    model_a, train_a = runner(tmp_path / "a", "--max_skipped_steps=1", oom_at=4)
    train_a()
    with pytest.raises(OutOfMemory):
        runner(tmp_path / "b", oom_at=4)[1]()
    model_b, train_b = runner(tmp_path / "b", "--max_skipped_steps=1")
    train_b()
    a, b = metric_lines(tmp_path / "a"), metric_lines(tmp_path / "b")
    assert [m["loss"] is None for m in a] == [False, True, False]
    assert [(m["loss"], m.get("reward_shift")) for m in a] == [(m["loss"], m.get("reward_shift")) for m in b]
    for (name, x), y in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_a_batch_that_runs_out_of_memory_is_marked_and_skipped_in_place_or_on_the_resume(tmp_path, caplog):
    """A batch that ran out of memory was met again on every resume (the stream is deterministic), so a
    long run could not pass it. Now its step is marked (oom-step*.json, naming its records) and, with
    --max_skipped_steps, skipped: in place in one process, on the resume otherwise, with the same result."""
    from nativevl.train.watch import OutOfMemory

    runner = oom_runner(["--max_steps=4", "--global_batch=2", "--tensorboard=false", "--save_every=1",
                         "--export=false"])

    model_a, train_a = runner(tmp_path / "a", "--max_skipped_steps=1", oom_at=4)
    assert train_a()["step"] == 4
    marks = list((tmp_path / "a").glob("oom-step*-rank*.json"))
    assert [m.name for m in marks] == ["oom-step2-rank0.json"]
    mark = json.loads(marks[0].read_text())
    assert mark["step"] == 2 and len(mark["indices"]) == 2 and "Tried to allocate" in mark["error"]
    assert [m["loss"] is None for m in metric_lines(tmp_path / "a")] == [False, True, False, False]
    assert metric_lines(tmp_path / "a")[1]["skipped_steps"] == 1 and metric_lines(tmp_path / "a")[1]["grad_norm"] is None

    _, train_b = runner(tmp_path / "b", oom_at=4)  # no step may be skipped: the run stops, naming the way on
    with pytest.raises(OutOfMemory, match=r"step 2 ran out of device memory .* --max_skipped_steps=1 .* resumes"):
        train_b()
    assert (tmp_path / "b" / "oom-step2-rank0.json").is_file()
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    model_b, train_b = runner(tmp_path / "b", "--max_skipped_steps=1")  # the resume skips the marked step
    train_b()
    assert [m["loss"] is None for m in metric_lines(tmp_path / "b")] == [False, True, False, False]
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # the same weights as the run that skipped it in place

    mark_c = tmp_path / "c" / "oom-step2-rank0.json"  # allowed no skip, the resume tries the batches again
    with caplog.at_level("WARNING", logger="nativevl.train.loop"):
        runner(tmp_path / "c")[1]()
    assert "step 2's batches ran out of memory before" in caplog.text
    assert [m["loss"] is None for m in metric_lines(tmp_path / "c")] == [False, False, False, False]
    shutil.rmtree(tmp_path / "c" / "checkpoints")  # from step 0 again, with a mark of other records
    for f in tmp_path.glob("c/metrics.jsonl"):
        f.unlink()
    (mark_c).write_text(json.dumps({**json.loads(mark_c.read_text()), "indices": [[99999], [99998]]}))
    runner(tmp_path / "c", "--max_skipped_steps=1")[1]()
    assert [m["loss"] is None for m in metric_lines(tmp_path / "c")] == [False, False, False, False]


def test_resume_takes_the_learning_rate_of_the_command(tmp_path):
    """Resuming with another --lr (e.g. lower after a spike): the optimiser state comes from the
    checkpoint but the learning rate from the command; before, the checkpoint's base learning rate
    won silently while config.json recorded the new one."""
    base = ["--global_batch=2", "--tensorboard=false", "--max_tokens=256", "--export=false", "--save_every=1",
            "--warmup_steps=0"]
    launch(apply_overrides(recipe("debug_tiny"), base + ["--max_steps=2", "--lr=1e-3"]), tmp_path)
    launch(apply_overrides(recipe("debug_tiny"), base + ["--max_steps=3", "--lr=1e-5"]), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[2]["lr"] == pytest.approx(1e-5 * loop.lr_factor(2, warmup_steps=0, total_steps=3))
    assert json.loads((tmp_path / "config.json").read_text())["train"]["lr"] == 1e-5


def test_logged_lr_is_the_runs_not_the_first_modules(tmp_path, caplog):
    """pretrain gives the ViT its own learning rate (1e-5 against the run's 1e-4); the logged 'lr' was
    the first parameter group's, i.e. the ViT's, so the run's --lr looked ignored. A warmup longer than
    the run (debug_tiny's 5 steps, 1 step here) is said in the log: the lr never reaches its peak."""
    run = apply_overrides(recipe("debug_tiny"), ["--max_steps=1", "--global_batch=1", "--tensorboard=false",
                                                 "--max_tokens=256", "--export=false", "--stage.vit.lr=1e-5"])
    with caplog.at_level("WARNING", logger="nativevl.train.loop"):
        launch(run, tmp_path)
    assert "warmup_steps (5) >= max_steps (1): the learning rate never reaches --lr" in caplog.text
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    factor = loop.lr_factor(0, warmup_steps=run.train.warmup_steps, total_steps=1)
    assert record["lr"] == pytest.approx(run.train.lr * factor)
    assert record["lr_vit"] == pytest.approx(1e-5 * factor)


def test_grown_llm_computes_what_the_original_does_and_trains_its_new_blocks(tmp_path):
    """--grow_layers adds identity-initialised LLM blocks (a PRM from a small policy): the grown model's
    logits equal the original's, its new blocks train, and it needs --init_from."""
    from conftest import image_batch
    from test_model import make_model

    from nativevl.io.parts import grow_llm_depth

    model = make_model()
    grown = grow_llm_depth(model, 2, seed=1).eval()
    n = model.config.text.num_hidden_layers
    assert grown.config.text.num_hidden_layers == n + 2
    input_ids, pixel_values = image_batch(model.config)
    with torch.no_grad():
        want = model(input_ids=input_ids, pixel_values=pixel_values).logits
        got = grown(input_ids=input_ids, pixel_values=pixel_values).logits
    assert torch.allclose(got, want, atol=1e-5)
    grown.train()
    loss = grown(input_ids=input_ids, pixel_values=pixel_values).logits.square().mean()
    loss.backward()
    assert grown.language_model.layers[n].mlp.down_proj.weight.grad.abs().sum() > 0
    assert torch.equal(grow_llm_depth(model, 2, seed=1).state_dict()[f"language_model.layers.{n}.mlp.up_proj.weight"],
                       grown.state_dict()[f"language_model.layers.{n}.mlp.up_proj.weight"])  # seeded
    with pytest.raises(ValueError, match="needs --init_from"):
        build(apply_overrides(recipe("debug_tiny"), ["--grow_layers=1"]), tmp_path)


def test_resume_is_exact_with_drop_path_and_logs_each_step_once(tmp_path, monkeypatch):
    """The data loader drew its seed from the global RNG after a resume restored it, which shifted every
    drop-path / dropout mask after the resume; and the steps logged after the last checkpoint were logged
    twice (metrics.jsonl, tensorboard)."""
    args = ["--max_steps=4", "--save_every=2", "--global_batch=2", "--tensorboard=false", "--max_tokens=256",
            "--export=false", "--drop_path_rate=0.3"]
    launch(apply_overrides(recipe("debug_tiny"), args), tmp_path / "full")
    ref = losses(tmp_path / "full")
    original = loop.MetricsLogger.log

    def stop_after_three(self, record):
        original(self, record)
        if record["step"] == 3:  # logged, but its checkpoint (every 2 steps) not written
            raise KeyboardInterrupt("stopped")

    monkeypatch.setattr(loop.MetricsLogger, "log", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        launch(apply_overrides(recipe("debug_tiny"), args), tmp_path / "cut")
    monkeypatch.setattr(loop.MetricsLogger, "log", original)
    launch(apply_overrides(recipe("debug_tiny"), args), tmp_path / "cut")
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert losses(tmp_path / "cut") == ref


def test_resume_refuses_settings_that_change_the_checkpoints_meaning(tmp_path):
    base = ["--global_batch=2", "--tensorboard=false", "--max_tokens=256", "--export=false", "--save_every=1"]
    launch(apply_overrides(recipe("debug_tiny"), base + ["--max_steps=2"]), tmp_path)
    # a change of the parameters' names (LoRA) is named too, not a missing key of the checkpoint's shards
    for change, key in ((["--global_batch=4"], "train.global_batch"), (["--data.seed=3"], "data.seed"),
                        (["--stage.llm.mode=frozen"], "stage.llm.mode"), (["--stage.llm.mode=lora"], "stage.llm.mode")):
        run = apply_overrides(recipe("debug_tiny"), [a for a in base if not a.startswith(change[0].split("=")[0])]
                              + change + ["--max_steps=3"])
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            launch(run, tmp_path)
    launch(apply_overrides(recipe("debug_tiny"), base + ["--max_steps=3", "--lr=1e-4"]), tmp_path)  # allowed
    assert json.loads((tmp_path / "config-step2.json").read_text())["train"]["max_steps"] == 2
    # a config.json written before a setting existed: the new setting is no change
    old = json.loads((tmp_path / "config.json").read_text())
    del old["data"]["text_ratio_unit"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    launch(apply_overrides(recipe("debug_tiny"), base + ["--max_steps=4", "--lr=1e-4"]), tmp_path)
    # ... unless its default is not what runs did before it: long text documents were cut, now split
    old = json.loads((tmp_path / "config.json").read_text())
    del old["data"]["long_text"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"data.long_text: 'cut' -> 'split' \(not in its config.json: .* "
                                         r"--long_text=cut resumes it\)"):
        launch(apply_overrides(recipe("debug_tiny"), base + ["--max_steps=5", "--lr=1e-4"]), tmp_path)
    launch(apply_overrides(recipe("debug_tiny"), base + ["--max_steps=5", "--lr=1e-4", "--long_text=cut"]), tmp_path)


def test_a_damaged_checkpoint_is_a_named_error_and_the_eta_counts_days(tmp_path):
    from nativevl.train.metrics import format_eta

    assert format_eta(27.8 * 3600) == "27:48:00" and format_eta(59) == "0:00:59" and format_eta(float("inf")) == "?"
    base = ["--global_batch=2", "--tensorboard=false", "--max_tokens=256", "--export=false", "--max_steps=1"]
    launch(apply_overrides(recipe("debug_tiny"), base), tmp_path)
    (shard,) = list((tmp_path / "checkpoints").glob("step-*/*.distcp"))[:1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot load the model / optimiser shards"):
        launch(apply_overrides(recipe("debug_tiny"), base[:-1] + ["--max_steps=2"]), tmp_path)


def test_attention_counts_its_backward_in_frozen_and_lora_modules():
    cfg = preset("tiny")
    sizes = {"vit": 0, "mlp": 0, "llm": 0}  # attention only
    full = batch_flops(cfg, sizes, pass_factors({"vit": "full", "mlp": "full", "llm": "full"}), [100, 50], 2)
    lora = batch_flops(cfg, sizes, pass_factors({"vit": "lora", "mlp": "lora", "llm": "lora"}), [100, 50], 2)
    frozen = batch_flops(cfg, sizes, pass_factors({"vit": "frozen", "mlp": "frozen", "llm": "frozen"}), [100, 50], 2)
    assert full == lora == 3 * frozen > 0


def test_pretraining_from_parts_without_an_internvl_tokenizer_says_to_pass_one(tmp_path):
    """With --vit_from/--llm_from and no --tokenizer the LLM folder's own tokenizer is tried, which lacks
    InternVL's tokens: the error now says which tokenizer to pass."""
    from conftest import CORPUS
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    base.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                         show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=base, eos_token="<|im_end|>").save_pretrained(tmp_path / "llm")
    Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "llm")
    write_vit_folder(tmp_path / "vit")
    run = apply_overrides(recipe("pretrain"), [f"--vit_from={tmp_path / 'vit'}", f"--llm_from={tmp_path / 'llm'}"])
    with pytest.raises(ValueError, match="pass --tokenizer <an InternVL3 tokenizer folder>"):
        build(run, tmp_path / "out")


def test_validation_loss_is_logged_exact_and_leaves_training_unchanged(uninterrupted, tmp_path, monkeypatch):
    """--val_meta: the loss over the held-out set every val_every steps (and at the end), equal to a
    plain cross-entropy over those records with the weights of that step; the training losses are those
    of a run without validation, also across a stop and resume, and no validation is logged twice."""
    import torch.nn.functional as F

    from nativevl.data import synthetic
    from nativevl.io.tokenizer import load_tokenizer
    from nativevl.recipes import build_val_dataset

    _, ref = uninterrupted
    meta = synthetic.write_dataset(tmp_path / "held_out", n_images=12, n_texts=6, seed=7, size=56)
    run = apply_overrides(recipe("debug_tiny"), SMALL + [f"--val_meta={meta}", "--val_every=2", "--val_records=10"])
    out = tmp_path / "run"
    launch_stopped_at(run, out, monkeypatch)
    summary = launch(run, out)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"]: r["loss"] for r in records if "loss" in r} == ref
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [2, 4, 6] and summary["val_loss"] == val[-1]["val_loss"]
    assert val[0]["val_loss"] > val[-1]["val_loss"]  # it learns what the held-out records hold too

    # the same number, computed plainly from the exported weights: sum of weighted CE / sum of weights
    model = VisionLanguageModel.from_pretrained(out / "final").eval()
    tokenizer = load_tokenizer(out / "data" / "tokenizer")
    _, _, _, aligned = build(run, tmp_path / "scratch")
    held_out = build_val_dataset(aligned, tokenizer, tmp_path / "scratch")
    assert held_out.cfg.training is False  # no augmentation or random V2PE strides in validation
    from nativevl.train.objectives import LMObjective

    batches = loop.read_val_batches(held_out, LMObjective(4096), torch.device("cpu"))
    total = weights = 0.0
    with torch.no_grad():
        for b in batches:
            logits = model(**b.model_inputs()).logits.reshape(-1, model.config.text.vocab_size)  # (T, V)
            keep = b.labels != -100
            ce = F.cross_entropy(logits[keep].float(), b.labels[keep], reduction="none")
            total += float((ce * b.loss_weights[keep]).sum())
            weights += float(b.loss_weights[keep].sum())
    assert sum(b.num_tokens for b in batches) == val[-1]["val_tokens"]
    assert abs(val[-1]["val_loss"] - total / weights) < 1e-5 * total / weights



def test_a_step_past_hang_timeout_dumps_every_threads_stack(tmp_path, monkeypatch):
    """The watchdog writes where the run waits (here: a save that sleeps) to DIR/hang-rank0-TIME.txt while
    the step lasts; a run whose steps all end in time leaves no file."""
    import time

    original = loop.save_train_state

    def slow_save(out_dir, model, optimizer, step, *args):
        if step == 2:
            time.sleep(2.5)
        original(out_dir, model, optimizer, step, *args)

    monkeypatch.setattr(loop, "save_train_state", slow_save)
    args = ["--max_steps=3", "--save_every=1", "--global_batch=2", "--tensorboard=false", "--export=false",
            "--max_tokens=256"]
    launch(apply_overrides(recipe("debug_tiny"), args + ["--hang_timeout=1"]), tmp_path / "slow")
    dumps = list((tmp_path / "slow").glob("hang-rank0-*.txt"))
    assert len(dumps) == 1 and "Timeout" in dumps[0].read_text() and "slow_save" in dumps[0].read_text()
    monkeypatch.setattr(loop, "save_train_state", original)
    launch(apply_overrides(recipe("debug_tiny"), args + ["--hang_timeout=60"]), tmp_path / "fine")
    assert not list((tmp_path / "fine").glob("hang-*"))
    with pytest.raises(ValueError, match="hang_timeout must be"):
        apply_overrides(recipe("debug_tiny"), ["--hang_timeout=-1"])


def test_a_validation_set_of_the_wrong_kind_fails_before_training(tmp_path):
    from test_alignment import preference_meta

    (tmp_path / "pref").mkdir()
    run = apply_overrides(recipe("debug_tiny"), ["--max_steps=2", "--tensorboard=false",
                                                 f"--val_meta={preference_meta(tmp_path / 'pref')}"])
    with pytest.raises(ValueError, match="validation set \\(val_meta\\) does not suit this stage's objective"):
        launch(run, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any step


def test_each_step_logs_its_data_wait_and_tokens_per_device(tmp_path, monkeypatch):
    """Users ask whether a slow step is the data or the model: each metrics line has the time the step
    waited for its batches (the slowest rank's) and its share of the step, and tokens/s per device."""
    import time

    original = loop.iterate_batches

    def slow(*args, **kwargs):  # a data source that takes 0.2 s per batch
        for batch in original(*args, **kwargs):
            time.sleep(0.2)
            yield batch

    monkeypatch.setattr(loop, "iterate_batches", slow)
    out = tmp_path / "run"
    launch(apply_overrides(recipe("debug_tiny"), ["--max_steps=3", "--global_batch=2", "--tensorboard=false",
                                                  "--max_tokens=256", "--export=false"]), out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert 0.4 <= r["data_wait_s"] <= r["step_time_s"]  # two batches a step, 0.2 s each
        assert r["data_wait_frac"] == pytest.approx(r["data_wait_s"] / r["step_time_s"])
        assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"])  # one process
        assert r["peak_memory_gib"] is None  # CPU: no device memory to report


LORA_BF16 = ["--max_steps=3", "--global_batch=2", "--tensorboard=false", "--dtype=bfloat16", "--stage.vit.mode=frozen",
             "--stage.llm.mode=lora", "--stage.llm.lora_rank=4", "--stage.llm.lora_dropout=0", "--export=false"]


def as_bf16_checkpoint(model) -> None:
    """The model's weights rounded to bf16 and held in float32: a released (bf16) checkpoint loaded in float32."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())


def test_frozen_linear_layers_kept_in_bf16_train_as_fp32_ones_do_under_autocast(tmp_path):
    """bf16 compute (here on the CPU) over a bf16 base: --frozen_dtype=auto keeps the LoRA base, the frozen
    ViT's linear layers and the lm_head in bf16, which autocast would cast them to at every use anyway: the
    same losses bit for bit as --frozen_dtype=float32, in less memory; the export merges the adapters in
    float32."""
    runs = {}
    for frozen in ("float32", "auto"):
        run = apply_overrides(recipe("debug_tiny"), [*LORA_BF16, f"--frozen_dtype={frozen}"])
        model, tokenizer, dataset, run = build(run, tmp_path / frozen)
        as_bf16_checkpoint(model)
        loop.train(model, tokenizer, dataset, run.stage, run.train, tmp_path / frozen)
        runs[frozen] = (losses(tmp_path / frozen), model)
    (want, full), (got, half) = runs["float32"], runs["auto"]
    assert got == want and len(got) == 3
    params = dict(half.named_parameters())
    kept = {k for k, p in params.items() if p.dtype == torch.bfloat16}
    assert "language_model.layers.0.self_attn.q_proj.base.weight" in kept and "lm_head.weight" in kept
    assert "vision_tower.encoder.layer.0.attention.projection_layer.weight" in kept
    assert "vision_tower.embeddings.patch_embeddings.projection.weight" in kept  # a Conv2d
    trained = {k for k, p in params.items() if p.requires_grad}
    assert trained and not trained & kept  # adapters and the projector stay fp32
    assert not any(k.endswith(("norm.weight", "embed_tokens.weight", "position_embeddings")) for k in kept)
    assert all(p.dtype == torch.float32 for p in full.parameters())
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())
    assert size(half) < 0.7 * size(full)
    batch = next(iter(dataset))
    with torch.no_grad():
        reference = copy.deepcopy(half).float().eval()(**batch.model_inputs()).logits  # unmerged, float32
        export_snapshot(half, tokenizer, tmp_path / "best", True)  # DIR/best/'s way: from a state dict
        loop.export_final(half, tokenizer, tmp_path / "final", True)
        for folder in ("best", "final"):
            merged = VisionLanguageModel.from_pretrained(tmp_path / folder)(**batch.model_inputs()).logits
            assert (reference - merged).abs().max().item() < 1e-5, folder
    # the frozen ViT exported as it was loaded (a bf16 base loses nothing in bf16)
    exported = VisionLanguageModel.from_pretrained(tmp_path / "final").vision_tower.state_dict()
    assert all(torch.equal(v, exported[k]) for k, v in full.vision_tower.state_dict().items())


def test_frozen_linear_params_leave_a_tied_head_and_trained_layers_alone():
    from nativevl.train.stages import frozen_linear_params

    cfg = preset("tiny")
    model = VisionLanguageModel(dataclasses.replace(cfg, tie_word_embeddings=True)).requires_grad_(False)
    model.language_model.layers[0].mlp.up_proj.weight.requires_grad_(True)  # its bias-free layer trains
    picked = {id(p) for p in frozen_linear_params(model)}
    assert id(model.lm_head.weight) not in picked  # the embedding table, which autocast does not cast
    assert id(model.language_model.layers[0].mlp.up_proj.weight) not in picked
    assert id(model.language_model.layers[0].mlp.down_proj.weight) in picked
    assert not any(id(p) in picked for p in model.language_model.norm.parameters())


def test_auto_rounds_no_float32_base_and_bfloat16_says_it_rounds_one(tmp_path, caplog):
    """A base bf16 does not hold exactly (nativevl's own float32 exports, a random initialisation): auto
    leaves its frozen layers float32, so the exports keep its weights; --frozen_dtype=bfloat16 rounds them
    (as autocast computes with them) and says so."""
    import logging

    dtypes = {}
    for frozen in ("auto", "bfloat16"):
        caplog.clear()
        run = apply_overrides(recipe("debug_tiny"), [*LORA_BF16, "--max_steps=1", f"--frozen_dtype={frozen}"])
        model, tokenizer, dataset, run = build(run, tmp_path / frozen)
        frozen_weight = model.language_model.layers[0].mlp.down_proj.weight.detach().clone()
        with caplog.at_level(logging.INFO, logger="nativevl.train.loop"):
            loop.train(model, tokenizer, dataset, run.stage, run.train, tmp_path / frozen)
        base = model.language_model.layers[0].mlp.down_proj.base.weight
        dtypes[frozen] = base.dtype
        assert ("kept in float32" in caplog.text) == (frozen == "auto")
        assert ("final/ and best/ hold them rounded" in caplog.text) == (frozen == "bfloat16")
        assert torch.equal(base.float(), frozen_weight if frozen == "auto" else frozen_weight.bfloat16().float())
    assert dtypes == {"auto": torch.float32, "bfloat16": torch.bfloat16}


def test_frozen_dtype_bfloat16_needs_bf16_compute(tmp_path):
    with pytest.raises(ValueError, match="frozen_dtype=bfloat16"):
        apply_overrides(recipe("debug_tiny"), ["--dtype=float32", "--frozen_dtype=bfloat16"])
    run = apply_overrides(recipe("debug_tiny"), ["--max_steps=1", "--tensorboard=false", "--frozen_dtype=bfloat16"])
    model, tokenizer, dataset, run = build(run, tmp_path)
    with pytest.raises(ValueError, match="computes in float32"):  # dtype=auto on the CPU
        loop.train(model, tokenizer, dataset, run.stage, run.train, tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_frozen_layers_in_bf16_train_as_fp32_ones_with_compiled_blocks(tmp_path):
    """CUDA (bf16 autocast, blocks compiled, varlen attention): the LoRA run with its frozen base and ViT
    kept in bf16 computes the float32-kept run's first loss exactly and follows it (kernels with atomic
    adds may differ in the last bits after an update), in fewer parameter bytes."""
    runs = {}
    for frozen in ("float32", "auto"):
        run = apply_overrides(recipe("debug_tiny"), [*LORA_BF16, f"--frozen_dtype={frozen}", "--compile=true"])
        model, tokenizer, dataset, run = build(run, tmp_path / frozen)
        as_bf16_checkpoint(model)
        loop.train(model, tokenizer, dataset, run.stage, run.train, tmp_path / frozen)
        runs[frozen] = (losses(tmp_path / frozen), sum(p.numel() * p.element_size() for p in model.parameters()))
    (want, full), (got, half) = runs["float32"], runs["auto"]
    assert got[1] == want[1] and got == pytest.approx(want, rel=1e-3)
    assert half < 0.7 * full


def test_a_resume_runs_the_optimizer_as_this_machine_does(tmp_path, monkeypatch):
    """The optimiser's groups came back from the checkpoint whole: a run saved on the CPU (no fused
    AdamW) and resumed on a GPU stayed unfused. The moments come from the checkpoint, fused / foreach
    from the optimiser built for this machine."""
    from nativevl.train import optim

    run = apply_overrides(recipe("debug_tiny"), [*SMALL, "--export=false", "--max_steps=2"])
    launch(run, tmp_path)
    built = []

    def fused_build(*args, **kwargs):
        opt = optim.build_optimizer(*args, **kwargs)
        for group in opt.param_groups:
            group["fused"] = True  # as built on CUDA (AdamW's fused step also runs on the CPU)
        built.append(opt)
        return opt

    monkeypatch.setattr(loop, "build_optimizer", fused_build)
    launch(apply_overrides(recipe("debug_tiny"), [*SMALL, "--export=false", "--max_steps=3"]), tmp_path)
    assert built and all(g["fused"] for g in built[0].param_groups)
    assert sorted(losses(tmp_path)) == [1, 2, 3]


def test_a_resume_says_when_a_datasets_records_changed(tmp_path, caplog):
    """Lines added to or removed from an annotation file between launches moved the saved data position
    (the mixture is laid over the records' count) without a word: the resume check read the meta file only."""
    import logging

    base = ["--global_batch=2", "--tensorboard=false", "--max_tokens=256", "--export=false", "--save_every=1"]
    launch(apply_overrides(recipe("debug_tiny"), [*base, "--max_steps=2"]), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["data_records"]
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    name, entry = next(iter(meta.items()))
    annotation = tmp_path / "data" / entry["annotation"]
    lines = annotation.read_text().splitlines()
    annotation.write_text("\n".join(lines[:-1]) + "\n")  # a bad line removed, say
    with caplog.at_level(logging.WARNING, logger="nativevl.train.checkpoint"):
        launch(apply_overrides(recipe("debug_tiny"), [*base, "--max_steps=3"]), tmp_path)
    said = [r.getMessage() for r in caplog.records if "no longer points at the same records" in r.getMessage()]
    assert said and f"dataset {name!r} held {len(lines)} records" in said[0] and f"holds {len(lines) - 1} now" in said[0]
    assert sorted(losses(tmp_path)) == [1, 2, 3]
