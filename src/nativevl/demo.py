"""`nativevl demo`: the whole recipe on the toy world, on a laptop CPU, with no download.

generate the toy world -> train its tokenizer -> build a tiny InternVL3-shaped model -> native
multimodal pre-training (every module from step 0; text documents + image captions, text :
multimodal 1 : 3, square averaging) -> evaluate -> SFT on the task questions -> evaluate -> save
(-hf layout) -> DIR/report.json, DIR/report.md and a loss-curve plot.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nativevl.config import ModelConfig, TextConfig, VisionConfig
from nativevl.data.pipeline import DataConfig, PackedDataset
from nativevl.data.toyworld import FAMILIES, ToyWorldSource, corpus, example, write_dataset
from nativevl.eval.runner import evaluate, markdown_table
from nativevl.io.hf import load_model
from nativevl.io.tokenizer import load_tokenizer, train_tokenizer
from nativevl.model.vlm import VisionLanguageModel
from nativevl.train.evaluation import read_reports
from nativevl.train.loop import TrainConfig, train
from nativevl.train.stages import StagePolicy

IMAGE_FAMILIES = ("shapes", "reading", "charts", "arithmetic")
HEADLINE = ("shapes", "reading", "charts")  # the families whose mean must reach 0.70


@dataclass(frozen=True)
class DemoConfig:
    pretrain_steps: int = 1000
    sft_steps: int = 2200
    global_batch: int = 4
    pack_tokens: int = 384
    lr: float = 1e-3
    init_std: float = 0.08  # 0.02 suits 1k-wide models; a 128-wide one learns faster from a wider init
    eval_n: int = 200
    eval_batch: int = 50
    train_seed: int = 1
    eval_seed: int = 10_000  # held out: training never sees this seed
    val_seed: int = 20_000  # the validation loss's records: another held-out seed
    val_records: int = 128  # per stage, measured 10 times a stage
    vocab_size: int = 768
    inspect_records: int = 24  # written to DIR/data per family, in InternVL's format

    @classmethod
    def quick(cls) -> DemoConfig:
        """A short end-to-end run (CI): a few steps per stage, a handful of questions."""
        return cls(pretrain_steps=6, sft_steps=6, eval_n=6, eval_batch=6, inspect_records=2, val_records=8)


def model_config(tokenizer) -> ModelConfig:
    """InternVL3's architecture at toy size: 96 px tiles, patch 16, pixel shuffle 0.5 -> 9 tokens a tile."""
    # Two departures from the full-size models, both config values: layer scale starts at 1 (0.1 in
    # InternViT) so the 3-layer ViT shapes its features from the first steps, and RoPE's base is 1e4
    # (1e6 in Qwen2.5) so that positions within these short prompts are told apart.
    vision = VisionConfig(hidden_size=96, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256,
                          image_size=96, patch_size=16, layer_scale_init_value=1.0)
    text = text_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id)
    return ModelConfig(vision=vision, text=text, image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"))


def text_config(vocab_size: int, eos_token_id: int, pad_token_id: int) -> TextConfig:
    """The demo's LLM: 4 Qwen2 blocks, 128 wide, GQA 4/2 heads, RoPE base 1e4."""
    return TextConfig(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=384, max_position_embeddings=4096, bos_token_id=None,
                      rope_theta=10_000.0, rope_type="default", eos_token_id=eos_token_id, pad_token_id=pad_token_id)


# share of each family in a stage's mixture (the text : multimodal split comes from text_ratio)
# (multi-image's lookup is learnt from its pre-training captions, hence its larger share there; that
# share cost shapes, the hardest family, hence its larger share in SFT: docs/demo/multi_image.md)
PRETRAIN_WEIGHTS = {"shapes": 2.0, "reading": 2.0, "charts": 2.0, "arithmetic": 1.0, "multi_image": 2.0, "text": 1.0}
SFT_WEIGHTS = {"shapes": 3.0, "reading": 1.5, "charts": 2.0, "arithmetic": 1.0, "multi_image": 1.0, "text": 0.5}
SFT_TURNS = 4  # questions about the same image(s) in one SFT conversation


def _sources(stage: str, seed: int) -> list[ToyWorldSource]:
    """Pre-training: captions of the image families, the multi-image questions, text documents.
    SFT: every task's questions, several per image."""
    weights = PRETRAIN_WEIGHTS if stage == "pretrain" else SFT_WEIGHTS
    return [ToyWorldSource(f, stage, seed, weight=w, turns=1 if stage == "pretrain" else SFT_TURNS)
            for f, w in weights.items()]


def train_stage(name: str, model, tokenizer, cfg: DemoConfig, out: Path, steps: int, text_ratio: float | None,
                policy: StagePolicy | None = None, sources: str | None = None, eval_tasks: str = "") -> dict:
    """Train `model` on the toy world's `sources` stage mixture ("pretrain" or "sft"; default `name`) into
    out/name, every module in full unless `policy` says otherwise (scripts/qlora.py). `eval_tasks`: evaluated
    every fifth of the stage (only at its end in a run under 25 steps) on the first half of the held-out
    questions (out/name/evals)."""
    sources = sources or name
    mcfg = model.config
    data = DataConfig(max_tokens=cfg.pack_tokens, max_tiles=96, image_size=mcfg.vision.image_size,
                      image_seq_length=mcfg.image_seq_length, image_token_id=mcfg.image_token_id, system_message=None,
                      loss_reduction="square", text_ratio=text_ratio, seed=cfg.train_seed,
                      text_ratio_unit="samples")  # as the committed demo was tuned and measured
    dataset = PackedDataset(_sources(sources, cfg.train_seed), tokenizer, data)
    # the stage's own mixture (text share included) on another held-out seed, read as at test time
    held_out = PackedDataset(_sources(sources, cfg.val_seed), tokenizer,
                             dataclasses.replace(data, max_records=cfg.val_records, training=False))
    train_cfg = TrainConfig(max_steps=steps, lr=cfg.lr, warmup_steps=max(1, steps // 20), global_batch=cfg.global_batch,
                            weight_decay=0.0, tensorboard=True, save_every=max(1, steps // 4), seed=cfg.train_seed,
                            val_every=max(1, steps // 10), val_records=cfg.val_records, eval_tasks=eval_tasks,
                            eval_every=steps // 5 if steps >= 25 else 0, eval_n=max(1, cfg.eval_n // 2),
                            eval_batch_size=cfg.eval_batch, eval_seed=cfg.eval_seed)
    return train(model, tokenizer, dataset, policy or StagePolicy(), train_cfg, out / name,
                 run_config={"demo": dataclasses.asdict(cfg), "stage": name, "data": dataclasses.asdict(data)},
                 val_dataset=held_out)


def _curve(path: Path, key: str = "loss") -> list[dict]:
    """The records of a metrics.jsonl that hold `key`: training steps ("loss") or validations ("val_loss")."""
    by_step = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if key in rec:
            by_step[rec["step"]] = rec
    return [by_step[k] for k in sorted(by_step)]


def plot_losses(curves: dict[str, list[dict]], path: Path, val: dict[str, list[dict]] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    offset = 0
    for name, curve in curves.items():
        steps = [offset + r["step"] for r in curve]
        line, = ax.plot(steps, [math.nan if r["loss"] is None else r["loss"] for r in curve], label=name, linewidth=1, alpha=0.8)
        points = (val or {}).get(name) or []
        if points:
            ax.plot([offset + r["step"] for r in points], [r["val_loss"] for r in points], "o-", markersize=4,
                    color=line.get_color(), markeredgecolor="black", linewidth=1.5, label=f"{name}, held-out")
        offset = steps[-1] if steps else offset
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (square-averaged CE)")
    ax.set_yscale("log")
    ax.set_title("nativevl demo: native pre-training, then SFT, on the toy world")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fingerprint(cfg: DemoConfig) -> dict:
    """What a demo folder is made with: the settings and a hash of each family's first questions and pictures."""
    h = hashlib.sha256()
    for family in FAMILIES:
        for i in range(4):
            ex = example(family, cfg.train_seed, i)
            h.update(f"{ex.question}\0{ex.answer}\0{ex.more}".encode())
            for img in ex.images:
                h.update(img.tobytes())
    return {"config": dataclasses.asdict(cfg), "toy_world": h.hexdigest()[:16]}


def _claim(out: Path, cfg: DemoConfig) -> list[str]:
    """Resume only what this demo made: a folder written with other settings or another toy world is refused
    (its tokenizer and checkpoints would be reused silently). Returns the stages already done."""
    stamp, made = out / "demo.json", fingerprint(cfg)
    if stamp.is_file():
        found = json.loads(stamp.read_text())
        if found != made:
            changed = [k for k in made["config"] if found.get("config", {}).get(k) != made["config"][k]]
            what = f"settings {', '.join(changed)}" if changed else "another version of the toy world"
            raise ValueError(f"{out} holds a demo run made with {what}; give a new --out or delete the folder")
    elif any((out / d).exists() for d in ("tokenizer", "pretrain", "sft")):
        raise ValueError(f"{out} holds training files but no demo.json (not a run of this demo); "
                         "give a new --out or delete the folder")
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(made, indent=2) + "\n")
    return [s for s in ("pretrain", "sft") if (out / s / "final").is_dir()]


def run_demo(out: str | Path, cfg: DemoConfig | None = None) -> dict:
    cfg = cfg or DemoConfig()
    out = Path(out)
    resumed = _claim(out, cfg)
    started = time.perf_counter()
    torch.manual_seed(cfg.train_seed)
    print(f"[demo] toy world -> {out / 'data'} (training streams it; these files are for inspection)")
    write_dataset(out / "data", list(FAMILIES), "sft", cfg.train_seed, cfg.inspect_records)
    if (out / "tokenizer").is_dir():
        tokenizer = load_tokenizer(out / "tokenizer")
    else:
        tokenizer = train_tokenizer(corpus(), vocab_size=cfg.vocab_size)
        tokenizer.save_pretrained(str(out / "tokenizer"))

    report: dict = {"config": dataclasses.asdict(cfg), "stages": {}, "resumed": resumed}
    if resumed:
        print(f"[demo] resuming: {', '.join(resumed)} already trained in {out}")
    print("[demo] stage 1: native multimodal pre-training (all modules, text : multimodal = 1 : 3)")
    if (out / "pretrain" / "final").is_dir():
        model = load_model(out / "pretrain" / "final", dtype=torch.float32)
    else:
        model = VisionLanguageModel(model_config(tokenizer))
        model.init_weights(std=cfg.init_std)
        train_stage("pretrain", model, tokenizer, cfg, out, cfg.pretrain_steps, text_ratio=0.25)
    report["parameters"] = sum(p.numel() for p in model.parameters())
    report["stages"]["pretrain"] = evaluate(model, tokenizer, list(FAMILIES), n=cfg.eval_n, seed=cfg.eval_seed,
                                            batch_size=cfg.eval_batch)
    print(markdown_table(report["stages"]["pretrain"], "after native pre-training (held-out seed)"))

    print("[demo] stage 2: supervised fine-tuning on the task questions")
    if not (out / "sft" / "final").is_dir():
        model = load_model(out / "pretrain" / "final", dtype=torch.float32)
        train_stage("sft", model, tokenizer, cfg, out, cfg.sft_steps, text_ratio=None, eval_tasks=",".join(FAMILIES))
    model = load_model(out / "sft" / "final", dtype=torch.float32)
    report["stages"]["sft"] = evaluate(model, tokenizer, list(FAMILIES), n=cfg.eval_n, seed=cfg.eval_seed,
                                       batch_size=cfg.eval_batch)
    print(markdown_table(report["stages"]["sft"], "after SFT (held-out seed)"))

    sft = report["stages"]["sft"]
    report["headline_mean"] = sum(sft[f]["accuracy"] for f in HEADLINE) / len(HEADLINE)
    report["above_3x_chance"] = {f: r["accuracy"] >= min(3 * r["chance"], 0.9) for f, r in sft.items()}
    report["wall_time_s"] = round(time.perf_counter() - started, 1)
    report["machine"] = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    curves = {s: _curve(out / s / "metrics.jsonl") for s in ("pretrain", "sft") if (out / s / "metrics.jsonl").is_file()}
    val = {s: _curve(out / s / "metrics.jsonl", "val_loss") for s in curves}
    report["validation_loss"] = {s: v[-1]["val_loss"] for s, v in val.items() if v}
    plot_losses(curves, out / "loss.png", val)
    report["sft_scores_by_step"] = scores_by_step(out / "sft" / "evals")
    if (out / "sft" / "evals" / "scores.png").is_file():
        shutil.copyfile(out / "sft" / "evals" / "scores.png", out / "scores.png")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(report))
    print(f"[demo] report: {out / 'report.md'} ({report['wall_time_s']} s)")
    question = ToyWorldSource("shapes", "sft", cfg.train_seed).get(0).conversations[0]["value"].split("\n", 1)[1]
    print(f"[demo] chat with the model:  nativevl chat --model {out / 'sft' / 'final'} --image "
          f"{out / 'data' / 'shapes' / '0-0.png'} --prompt '{question}' --system ''")
    return report


def report_markdown(report: dict) -> str:
    lines = ["# nativevl demo report", "",
             f"Tiny InternVL3-shaped model ({report['parameters']:,} parameters), trained from scratch on the toy world: "
             "native multimodal pre-training, then SFT. Accuracy on held-out seeds; chance = always giving the most "
             "frequent answer of each question kind; 95% Wilson intervals.", "",
             f"Machine: {report['machine']}. Wall time: {report['wall_time_s']} s.", ""]
    if report.get("resumed"):
        note = (f"Resumed: {', '.join(report['resumed'])} trained by an earlier run in the same folder; "
                "the wall time covers this run only.")
        lines[-1:-1] = [note, ""]
    for stage, title in (("pretrain", "After native pre-training"), ("sft", "After SFT")):
        lines.append(markdown_table(report["stages"][stage], title))
    if report.get("validation_loss"):
        lines += ["Loss on held-out records of each stage's data (another seed), at the stage's end: "
                  + ", ".join(f"{s} {v:.4f}" for s, v in report["validation_loss"].items())
                  + " (the dots on the plot; the line is the training loss).", ""]
    lines += [f"Mean accuracy over shapes, reading and charts after SFT: {report['headline_mean']:.3f}.", "",
              "At least 3x chance (or 0.90) after SFT: "
              + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in report["above_3x_chance"].items()) + ".", "",
              "![training loss](loss.png)", ""]
    by_step = report.get("sft_scores_by_step") or {}
    if by_step:
        tasks = list(dict.fromkeys(t for scores in by_step.values() for t in scores))
        lines += ["### During SFT", "",
                  ("The first half of the same held-out questions, evaluated inside the training run every fifth of "
                   "its steps (`--eval_tasks`, sft/evals/step-N.json):"), "",
                  "| step | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        lines += [f"| {step} | " + " | ".join(f"{scores[t]:.3f}" if t in scores else "-" for t in tasks) + " |"
                  for step, scores in by_step.items()]
        lines += ["", "![held-out scores during SFT](scores.png)", ""]
    return "\n".join(lines)


def scores_by_step(folder: Path) -> dict[str, dict[str, float]]:
    """{step: {task: accuracy}} of a training run's evaluation reports (out/stage/evals/step-N.json)."""
    return {str(step): {task: entry["accuracy"] for task, entry in report.items()
                        if isinstance(entry, dict) and "accuracy" in entry}
            for step, report in read_reports(folder)}
