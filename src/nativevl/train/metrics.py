"""Training metrics: FLOPs (ViT + MLP + LLM) and MFU, a progress bar with ETA, metrics.jsonl and
tensorboard events."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from nativevl.config import ModelConfig
from nativevl.train.qlora import NF4Linear

# dense bf16 peak FLOP/s by device name (users_and_performance.md B1)
# (the more specific names first: an "H100 PCIe" is not an SXM H100)
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989.4e12, "H200": 989.4e12, "A100": 312e12,
              "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def module_sizes(model: torch.nn.Module) -> dict[str, int]:
    """Matmul parameters per module: ViT (all), MLP, LLM (layers + lm_head; input embeddings excluded)."""
    def count(module: torch.nn.Module) -> int:  # QLoRA's NF4 layers hold their weights as buffers
        return sum(p.numel() for p in module.parameters()) + sum(
            m.weight_numel() for m in module.modules() if isinstance(m, NF4Linear))

    return {
        "vit": count(model.vision_tower),
        "mlp": count(model.multi_modal_projector),
        "llm": count(model.language_model.layers) + model.lm_head.weight.numel(),
    }


def pass_factors(modes: dict[str, str]) -> dict[str, int]:
    """FLOPs per parameter per token: 6 trained (fwd 2 + bwd 4), 4 when only backpropagated through
    (frozen or LoRA with something trainable upstream), 2 forward only."""
    trains = {k: modes[k] != "frozen" for k in ("vit", "mlp", "llm")}
    need_input_grad = {"vit": False, "mlp": trains["vit"], "llm": trains["vit"] or trains["mlp"]}
    out = {}
    for k in ("vit", "mlp", "llm"):
        if modes[k] == "full":
            out[k] = 6
        elif modes[k] in ("lora", "qlora") or need_input_grad[k]:
            out[k] = 4
        else:
            out[k] = 2
    return out


def batch_flops(cfg: ModelConfig, sizes: dict[str, int], factors: dict[str, int], doc_lengths: list[int], tiles: int) -> float:
    """PaLM-style FLOPs of one packed batch: dense + per-document attention for the LLM, per tile for the ViT."""
    t, v = cfg.text, cfg.vision
    tokens = sum(doc_lengths)
    # attention has no weights: whenever backward runs through it (factor > 2), it computes the gradients
    # of both its inputs (dQ, dK, dV via dP), twice its forward, so it counts 6 even for a frozen or LoRA module
    attn = {k: 6 if f > 2 else 2 for k, f in factors.items()}
    llm = factors["llm"] * sizes["llm"] * tokens
    llm += 2 * attn["llm"] * t.num_hidden_layers * t.num_attention_heads * t.head_dim * sum(n * n for n in doc_lengths)
    seq = v.num_positions
    vit = tiles * (factors["vit"] * sizes["vit"] * seq + 2 * attn["vit"] * v.num_hidden_layers * v.hidden_size * seq * seq)
    mlp = factors["mlp"] * sizes["mlp"] * cfg.image_seq_length * tiles
    return float(llm + vit + mlp)


def format_eta(seconds: float) -> str:
    """H:MM:SS with the hours unbounded (a 10,000-step pre-training run lasts days), or '?'."""
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0  # a torn last line: kept only if nothing says it is later


def _keys_of(line: str) -> list[str]:
    try:
        return list(json.loads(line))
    except (ValueError, TypeError):
        return []


class MetricsLogger:
    def __init__(self, out_dir: Path, max_steps: int, start_step: int, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.max_steps = max_steps
        self.file = None
        self.writer = None
        self.bar = None
        self.tokens_per_step: list[float] = []
        self.logged_at_start: set[str] = set()  # the keys of the lines already logged at start_step (a resume)
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "metrics.jsonl"
        if start_step > 0 and path.is_file():
            # a resumed run goes on from its checkpoint's step: the steps logged after it (by the run that
            # stopped) are trained again, so their old records go
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and _step_of(line) <= start_step]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            self.logged_at_start = {key for line in kept if _step_of(line) == start_step
                                    for key in _keys_of(line)}
        # a run from step 0 (the first, or one stopped before its first checkpoint, started again) logs afresh
        self.file = open(path, "a" if start_step > 0 else "w", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: tensorboard drops the old run's events from that step on
            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)
        self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.started = time.perf_counter()

    def _write(self, record: dict, tag) -> None:
        """One metrics.jsonl line, and its numbers to tensorboard under tag(key)."""
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(tag(key), value, record["step"])

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._write(record, lambda key: f"train/{key}")
        self.tokens_per_step.append(record["tokens"])
        recent = self.tokens_per_step[-20:]
        remaining_tokens = (self.max_steps - record["step"]) * sum(recent) / len(recent)
        eta = remaining_tokens / record["tokens_per_s"] if record["tokens_per_s"] > 0 else float("inf")
        extra = {"mfu": f"{record['mfu']:.1%}"} if record.get("mfu") is not None else {}
        if record.get("peak_memory_gib") is not None:
            extra["mem"] = f"{record['peak_memory_gib']:.1f}G"
        loss = "skipped" if record["loss"] is None else f"{record['loss']:.4f}"
        self.bar.set_postfix(loss=loss, tok_s=f"{record['tokens_per_s']:.0f}", **extra,
                             data=f"{record.get('data_wait_frac', 0.0):.0%}", eta=format_eta(eta))
        self.bar.update(1)

    def log_val(self, record: dict) -> None:
        """A validation record ({"step": ..., "val_loss": ..., ...}): metrics.jsonl, tensorboard's val/ tags,
        and a line above the progress bar."""
        if not self.enabled:
            return
        self._write(record, lambda key: f"val/{key.removeprefix('val_')}")
        self.bar.write(f"step {record['step']}: " + ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items() if k != "step"))

    def log_eval(self, record: dict) -> None:
        """An in-training evaluation ({"step": ..., "eval_<task>": score, ...}): metrics.jsonl, tensorboard's
        eval/ tags, and a line above the progress bar."""
        if not self.enabled:
            return
        self._write(record, lambda key: f"eval/{key.removeprefix('eval_')}")
        self.bar.write(f"step {record['step']}: " + ", ".join(
            f"{k.removeprefix('eval_')} {v:.3f}" for k, v in record.items() if k != "step"))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
