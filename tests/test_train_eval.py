"""Evaluation inside training (`--eval_tasks`): the report of `nativevl eval` on the model being trained,
every eval_every steps and at the end, without changing the training run; across a stop and resume, and
with the model sharded over 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from test_parallel import one_and_two_processes
from test_train import SMALL, launch_stopped_at, losses

from nativevl import VisionLanguageModel
from nativevl.eval.runner import LazyPrompts, compare, evaluate, predict
from nativevl.eval.tasks import get_task
from nativevl.io.tokenizer import load_tokenizer
from nativevl.recipes import apply_overrides, launch, recipe


def metrics(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def evals(out) -> list[dict]:
    return [r for r in metrics(out) if any(k.startswith("eval_") for k in r)]


def test_evaluation_in_training_is_nativevl_eval_and_leaves_training_unchanged(tmp_path, monkeypatch):
    """Every eval_every steps and at the end: DIR/evals/step-N.json, the report `nativevl eval` writes for
    the model of that step (the same questions and answers as evaluating the exported model), its scores
    in metrics.jsonl and the summary; the training losses are a run's without evaluation. A run stopped
    after a step's checkpoint but before its evaluation evaluates that step first when it resumes, and the
    reports of steps after its checkpoint (trained again) go. evals/scores.png plots the scores by step."""
    plain = tmp_path / "plain"
    launch(apply_overrides(recipe("debug_tiny"), SMALL + ["--export=false"]), plain)
    args = SMALL + ["--eval_tasks=shapes, arithmetic", "--eval_every=3", "--eval_n=4", "--eval_batch_size=2"]
    run = apply_overrides(recipe("debug_tiny"), args)
    out = tmp_path / "run"
    launch_stopped_at(run, out, monkeypatch, stop=3)  # killed after step 3's checkpoint, before its evaluation
    assert not (out / "evals" / "step-000003.json").exists()
    (out / "evals").mkdir()
    (out / "evals" / "step-000004.json").write_text("{}")  # as left by a run that died after step 4's evaluation
    summary = launch(run, out)
    assert sorted(p.name for p in (out / "evals").glob("*.json")) == ["step-000003.json", "step-000006.json"]
    assert (out / "evals" / "scores.png").stat().st_size > 10_000
    assert losses(out) == losses(plain)
    logged = evals(out)
    assert [r["step"] for r in logged] == [3, 6] and set(logged[0]) == {"step", "eval_shapes", "eval_arithmetic"}
    assert summary["eval"] == {k: v for k, v in logged[-1].items() if k != "step"}

    last = json.loads((out / "evals" / "step-000006.json").read_text())
    assert (out / "evals" / "step-000006.md").is_file()
    model = VisionLanguageModel.from_pretrained(out / "final")
    tokenizer = load_tokenizer(out / "data" / "tokenizer")
    standalone = evaluate(model, tokenizer, ["shapes", "arithmetic"], n=4, batch_size=2)
    for task, entry in standalone.items():
        assert [r["prediction"] for r in last[task]["records"]] == [r["prediction"] for r in entry["records"]]
        assert last[task]["accuracy"] == entry["accuracy"] == logged[-1][f"eval_{task}"]
        assert last[task]["records"] and all(r["prediction"] for r in last[task]["records"])
    first = json.loads((out / "evals" / "step-000003.json").read_text())
    assert compare(first, last, "shapes")["n"] == 4  # two steps compare question by question
    other = evaluate(model, tokenizer, ["shapes"], n=4, batch_size=2, system_message="Answer briefly.")
    with pytest.raises(ValueError, match="different system messages"):  # the same questions, asked otherwise
        compare(last, other, "shapes")


@pytest.mark.parametrize("tasks, message", [("shapes,colours", "eval_tasks: colours: unknown task"),
                                            ("shapes,missing.jsonl", "eval_tasks: missing.jsonl: .*does not exist"),
                                            (" , ", "names no task"),
                                            ("shapes,data/mean.jsonl", "would read as the mean of the tasks")])
def test_a_bad_evaluation_task_stops_the_run_before_its_first_step(tmp_path, tasks, message):
    with pytest.raises(ValueError, match=message):
        launch(apply_overrides(recipe("debug_tiny"), SMALL + [f"--eval_tasks={tasks}"]), tmp_path)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def custom_set(folder) -> str:
    """An InternVL-format jsonl of 5 questions, 3 on a picture and 2 text-only: with one question per batch
    the ranks' first rounds are a picture's (rank 0) and a text's (rank 1), which then runs the ViT on a
    blank tile to take part in its collectives."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, colour in enumerate(["red", "blue", "green", "yellow", "blue"]):
        if i in (1, 3):
            turns = [{"from": "human", "value": "one two three"}, {"from": "gpt", "value": "four"}]
            lines.append(json.dumps({"conversations": turns}))
            continue
        Image.new("RGB", (56, 56), colour).save(folder / f"{i}.png")
        turns = [{"from": "human", "value": "<image>\nwhat colour is the square?"},
                 {"from": "gpt", "value": f"the square is {colour}"}]
        lines.append(json.dumps({"image": f"{i}.png", "conversations": turns}))
    path = folder / "custom.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_two_processes_evaluate_the_sharded_model_as_one_process_does(tmp_path):
    """2 processes (FSDP2) evaluate their shares of the questions in step (3 and 2 batches of one question)
    and the report is the one a plain process writes from the same weights (lr 0: both hold the random
    initial model, whose answers differ from question to question), which is what the model answers
    question by question outside training. --best_metric's copy of the sharded model is 1 process's."""
    custom = custom_set(tmp_path / "custom")
    args = ["--max_steps=1", "--lr=0", "--global_batch=2", "--max_buffers=0", "--max_tokens=256", "--tensorboard=false",
            f"--eval_tasks=shapes,{custom}", "--eval_n=5", "--eval_batch_size=1", "--best_metric=eval_mean"]
    one, two = tmp_path / "one", tmp_path / "two"
    one_and_two_processes(args, one, two)
    a = json.loads((one / "evals" / "step-000001.json").read_text())
    b = json.loads((two / "evals" / "step-000001.json").read_text())
    for task in ("shapes", custom):
        answers = [r["prediction"] for r in a[task]["records"]]
        assert [r["index"] for r in b[task]["records"]] == list(range(5))
        assert [r["prediction"] for r in b[task]["records"]] == answers
        assert b[task]["accuracy"] == a[task]["accuracy"]
        assert len(set(answers)) > 1, answers
    assert evals(one) == evals(two)
    # --best_metric: the sharded model gathered into best/, as 1 process writes it
    ours, theirs = (VisionLanguageModel.from_pretrained(d / "best").state_dict() for d in (one, two))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    model = VisionLanguageModel.from_pretrained(one / "final").eval()
    tokenizer = load_tokenizer(one / "final")
    for name in ("shapes", custom):
        task = get_task(name)
        direct = predict(model, tokenizer, LazyPrompts(task, task.load(5, 10_000)), max_new_tokens=task.max_new_tokens,
                         batch_size=1, system_message=None, max_num=task.tile_cap)
        assert direct == [r["prediction"] for r in a[name]["records"]]


SYNCED = """
import sys
import torch
from nativevl.config import preset
from nativevl.infer.generate import generate
from nativevl.model.vlm import VisionLanguageModel
from nativevl.train.parallel import init_distributed, parallelize

rank, world, _ = init_distributed()
torch.manual_seed(0)
model = VisionLanguageModel(preset("tiny")).eval()
model.init_weights()
prompts = [torch.tensor([[15, 17, 9, 33]]), torch.tensor([[8, 20, 41, 7, 12]])]  # no image or end token
# rank 0's answer ends at its 3rd token (made its end token); rank 1's runs to max_new_tokens
free = [generate(model, p, max_new_tokens=8, eos_token_id=[])[0, p.shape[1]:].tolist() for p in prompts]
eos = free[0][2]
assert eos not in free[1], free
plain = generate(model, prompts[rank], max_new_tokens=8, eos_token_id=eos)
parallelize(model, world=world, mixed_precision=False, activation_checkpointing=False, compile=False)
sharded = generate(model, prompts[rank], max_new_tokens=8, eos_token_id=eos, synced=sys.argv[1] == "synced")
n = plain.shape[1]
pad = model.config.text.pad_token_id if model.config.text.pad_token_id is not None else eos
assert torch.equal(sharded[:, :n], plain) and bool((sharded[:, n:] == pad).all()), (sharded, plain)
# one write per line: the two processes share the output
print(f"rank {rank} answer {n - prompts[rank].shape[1]} steps {sharded.shape[1] - prompts[rank].shape[1]}", flush=True)
if sys.argv[1] == "synced":  # neither rank tears its connections down while the other still reads (a loaded
    torch.distributed.barrier()  # machine once aborted the finished run at exit); alone, rank 1 waits in vain
torch.distributed.destroy_process_group()
"""


@pytest.mark.parametrize("mode", ["synced", "alone"])
def test_synced_generation_keeps_the_sharded_ranks_in_step(tmp_path, mode):
    """generate(synced=True) on a model sharded over 2 processes: one rank's answer ends at its 3rd token,
    the other's runs on; both get what the unsharded model generates, the finished rank padded (it keeps
    taking part in the forwards). Without synced, the collectives of the two ranks no longer match."""
    script = tmp_path / "synced.py"
    script.write_text(SYNCED)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), mode], env=env, capture_output=True, text=True, timeout=300)
    if mode == "synced":
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        # rank 0 answered in 3 tokens and padded on while rank 1 needed all 8
        assert "rank 0 answer 3 steps 8" in proc.stdout and "rank 1 answer 8 steps 8" in proc.stdout, proc.stdout
    else:  # rank 0 stops alone at its end token; rank 1's next forward waits for it in vain
        assert "rank 0 answer 3 steps 3" in proc.stdout and proc.returncode != 0, proc.stdout


def scripted_scores(monkeypatch, scores: dict[int, float]) -> None:
    """In-training evaluations that report `scores[step]` for shapes (the choice of the best is under test)."""
    from nativevl.train.evaluation import TrainingEval

    monkeypatch.setattr(TrainingEval, "__call__",
                        lambda self, model, step, autocast, heartbeat=None:
                        ({"step": step, "eval_shapes": scores[step]}, {}))


def test_best_metric_keeps_the_model_of_the_best_step_across_a_resume(tmp_path, monkeypatch):
    """--best_metric=eval_shapes: DIR/best is the model of the step with the highest score (0.2, 0.5, 0.3 at
    steps 2, 4, 6: step 4's weights, exactly), and a run stopped after step 5 and resumed keeps it (its step-6
    score is lower than the step-4 best it reads back); the training losses are a run's without it."""
    from nativevl.train import loop

    plain = tmp_path / "plain"
    launch(apply_overrides(recipe("debug_tiny"), SMALL + ["--export=false"]), plain)
    scripted_scores(monkeypatch, {2: 0.2, 4: 0.5, 6: 0.3})
    weights = {}
    original = loop.save_train_state

    def keep(out_dir, model, optimizer, step, *args):
        weights[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        original(out_dir, model, optimizer, step, *args)

    monkeypatch.setattr(loop, "save_train_state", keep)
    run = apply_overrides(recipe("debug_tiny"), SMALL + ["--eval_tasks=shapes", "--eval_every=2",
                                                         "--best_metric=eval_shapes"])
    out = tmp_path / "run"
    launch_stopped_at(run, out, monkeypatch, stop=5)
    written = json.loads((out / "best" / "nativevl_best.json").read_text())
    assert {k: written[k] for k in ("metric", "value", "step")} == {"metric": "eval_shapes", "value": 0.5, "step": 4}
    assert written["basis"] == {"tasks": ["shapes"], "n": 100, "seed": 10_000, "system": None}
    summary = launch(run, out)
    assert summary["best"] == written
    assert losses(out) == losses(plain)
    best = VisionLanguageModel.from_pretrained(out / "best").state_dict()
    assert best.keys() == weights[4].keys()
    assert all(torch.equal(best[k], weights[4][k]) for k in best)
    assert not all(torch.equal(best[k], weights[6][k]) for k in best)


def test_best_metric_of_a_lora_run_is_the_merged_model(tmp_path, monkeypatch):
    """A LoRA run whose best step is its last: best/ is final/ (the adapters merged), while the adapters
    kept training after every earlier best (the losses are a run's without --best_metric)."""
    args = SMALL + ["--stage.llm.mode=lora", "--eval_tasks=shapes", "--eval_every=2"]
    plain = tmp_path / "plain"
    scripted_scores(monkeypatch, {2: 0.2, 4: 0.3, 6: 0.5})
    launch(apply_overrides(recipe("debug_tiny"), args), plain)
    out = tmp_path / "run"
    summary = launch(apply_overrides(recipe("debug_tiny"), args + ["--best_metric=eval_mean"]), out)
    assert summary["best"]["step"] == 6 and losses(out) == losses(plain)
    best = VisionLanguageModel.from_pretrained(out / "best").state_dict()
    final = VisionLanguageModel.from_pretrained(out / "final").state_dict()
    assert not any("lora" in k for k in best) and best.keys() == final.keys()
    assert all(torch.equal(best[k], final[k]) for k in best)


@pytest.mark.parametrize("extra, message", [([], "best_metric 'val_loss' is not measured by this run"),
                                            (["--eval_tasks=shapes"], "measures \\['eval_mean', 'eval_shapes'\\]")])
def test_a_best_metric_the_run_does_not_measure_is_refused(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        launch(apply_overrides(recipe("debug_tiny"), SMALL + extra + ["--best_metric=val_loss"]), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_evaluation_in_training_runs_eagerly_under_autocast(tmp_path):
    """On CUDA (bf16 autocast, blocks compiled for training and run eagerly by the evaluation): the last
    step's report gives the answers of the exported model evaluated under the same autocast, and best/ is
    written."""
    out = tmp_path / "run"
    launch(apply_overrides(recipe("debug_tiny"), ["--max_steps=4", "--global_batch=2", "--tensorboard=false",
                                                  "--eval_tasks=shapes,arithmetic", "--eval_n=8", "--eval_batch_size=4",
                                                  "--best_metric=eval_mean"]), out)
    report = json.loads((out / "evals" / "step-000004.json").read_text())
    model = VisionLanguageModel.from_pretrained(out / "final", device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = evaluate(model, load_tokenizer(out / "data" / "tokenizer"), ["shapes", "arithmetic"], n=8, batch_size=4)
    for task, entry in plain.items():
        assert [r["prediction"] for r in report[task]["records"]] == [r["prediction"] for r in entry["records"]]
    assert json.loads((out / "best" / "nativevl_best.json").read_text())["metric"] == "eval_mean"


def test_evaluating_leaves_a_lora_run_with_dropout_unchanged(tmp_path, monkeypatch):
    """A real evaluation (not scripted) in a LoRA run, whose adapters use dropout, here also drawing from the
    RNGs (as a sampled task might): the model is back in training mode and the RNGs are restored
    afterwards, so the losses are those of the run without evaluation."""
    import random

    from nativevl.train import evaluation

    real = evaluation.evaluate
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: (torch.rand(100), random.random(), real(*a, **k))[2])
    args = SMALL + ["--export=false", "--stage.llm.mode=lora", "--stage.llm.lora_dropout=0.3"]
    launch(apply_overrides(recipe("debug_tiny"), args), tmp_path / "plain")
    launch(apply_overrides(recipe("debug_tiny"), args + ["--eval_tasks=shapes", "--eval_every=2", "--eval_n=2"]),
           tmp_path / "run")
    assert [r["step"] for r in evals(tmp_path / "run")] == [2, 4, 6]
    assert losses(tmp_path / "run") == losses(tmp_path / "plain")


def test_the_best_so_far_is_read_back_only_when_it_counts(tmp_path, monkeypatch, caplog):
    """BestModel: lower val_loss / higher scores win, a tie keeps the earlier step and NaN never wins; the
    file best/ holds is taken back by a resumed run (also from a step after the resumed one: that model was
    measured), but not when it was measured on another basis, for another metric, by a run starting at
    step 0, or is unreadable; a copy that cannot be written keeps the previous best and the run going."""
    from nativevl.train import export

    exported = []

    def snapshot(model, tok, path, main, extra_files):
        if model == "disk full":
            raise OSError(28, "No space left on device")
        exported.append(json.loads(extra_files[export.BEST_FILE]))
        path.mkdir(exist_ok=True)
        (path / export.BEST_FILE).write_text(extra_files[export.BEST_FILE])

    monkeypatch.setattr(export, "export_snapshot", snapshot)
    basis = {"val_sets": [["held_out", 40]], "val_records": 256}
    best = export.BestModel("val_loss", basis, tmp_path, None, True, start_step=0)
    for step, value in [(2, 0.9), (4, 0.7), (6, 0.7), (8, float("nan")), (10, 0.8), (12, 0.6)]:
        best.offer({"step": step, "val_loss": value}, None, step)
    assert [(e["step"], e["value"]) for e in exported] == [(2, 0.9), (4, 0.7), (12, 0.6)]
    assert not best.offer({"step": 14, "val_loss": 0.5}, "disk full", 14) and best.summary()["step"] == 12
    assert "best/ was not written" in caplog.text
    assert export.BestModel("val_loss", basis, tmp_path, None, True, start_step=12).summary()["step"] == 12
    assert export.BestModel("val_loss", basis, tmp_path, None, True, start_step=10).summary()["step"] == 12
    for metric, b, start, reason in [("val_loss", {**basis, "val_records": 64}, 12, "measured on"),
                                     ("eval_mean", basis, 12, "this run keeps the best eval_mean"),
                                     ("val_loss", basis, 0, "starts from step 0")]:
        assert export.BestModel(metric, b, tmp_path, None, True, start_step=start).value is None
        assert reason in caplog.text
    scores = export.BestModel("eval_mean", {}, tmp_path / "scores", None, True, start_step=0)
    assert scores.value_of({"step": 1, "eval_a": 0.5, "eval_b": 1.0}) == 0.75 and not scores.lowest
    (tmp_path / "best" / export.BEST_FILE).write_text('{"metric": "val_loss", "value": null, "step": 3}')
    assert export.BestModel("val_loss", basis, tmp_path, None, True, start_step=12).value is None
    assert "unreadable" in caplog.text


def test_a_resume_does_not_repeat_a_validation_or_evaluation_that_ended(tmp_path, monkeypatch):
    """Checkpoints every 3 steps, the run stopped at step 5 (after step 3's validation and evaluation):
    the resumed run starts from step 3 and validates and evaluates it no second time."""
    from nativevl.data import synthetic
    from nativevl.train import loop

    meta = synthetic.write_dataset(tmp_path / "held_out", n_images=6, n_texts=2, seed=7, size=56)
    run = apply_overrides(recipe("debug_tiny"), SMALL + ["--save_every=3", f"--val_meta={meta}", "--val_every=3",
                                                         "--val_records=8", "--eval_tasks=shapes", "--eval_every=3",
                                                         "--eval_n=2"])
    out = tmp_path / "run"
    original = loop.MetricsLogger.log

    def stop_at_5(self, record):
        original(self, record)
        if record["step"] == 5:
            raise KeyboardInterrupt("stopped")

    monkeypatch.setattr(loop.MetricsLogger, "log", stop_at_5)
    with pytest.raises(KeyboardInterrupt):
        launch(run, out)
    monkeypatch.setattr(loop.MetricsLogger, "log", original)
    assert [r["step"] for r in metrics(out) if "val_loss" in r] == [3] and [r["step"] for r in evals(out)] == [3]
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-00000003"]  # the resume starts at 3
    launch(run, out)
    assert [r["step"] for r in metrics(out) if "val_loss" in r] == [3, 6]
    assert [r["step"] for r in evals(out)] == [3, 6]


def test_a_validation_cut_off_after_its_checkpoint_runs_when_the_run_resumes(tmp_path, monkeypatch):
    """--val_every=3, the run stopped after step 3's checkpoint but before its validation: the resumed run
    validates step 3 first (the value an uninterrupted run logs), then goes on; each step validated once."""
    from nativevl.data import synthetic

    meta = synthetic.write_dataset(tmp_path / "held_out", n_images=6, n_texts=2, seed=7, size=56)
    args = SMALL + ["--export=false", f"--val_meta={meta}", "--val_every=3", "--val_records=8"]
    launch(apply_overrides(recipe("debug_tiny"), args), tmp_path / "plain")
    run = apply_overrides(recipe("debug_tiny"), args)
    launch_stopped_at(run, tmp_path / "run", monkeypatch, stop=3)
    launch(run, tmp_path / "run")
    val = lambda out: [(r["step"], r["val_loss"]) for r in metrics(out) if "val_loss" in r]
    assert [s for s, _ in val(tmp_path / "run")] == [3, 6] and val(tmp_path / "run") == val(tmp_path / "plain")
