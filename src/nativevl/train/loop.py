"""The one training loop: native pre-training, SFT (and later MPO / PRM) differ only by config.

Per optimiser step: `global_batch` packs (split over ranks, accumulated), loss = weighted CE on the
labelled positions normalised by the global weight sum, gradients all-reduced, clipped, AdamW,
warmup + cosine. Resumes exactly from DIR/checkpoints; exports the -hf layout to DIR/final.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from nativevl.data.pipeline import PackedDataset, StreamTracker, iterate_batches, make_loader
from nativevl.model.vlm import VisionLanguageModel
from nativevl.train import checkpoint as ckpt
from nativevl.train.lora import merge_lora
from nativevl.train.losses import labelled_lm_loss
from nativevl.train.metrics import MetricsLogger, batch_flops, module_sizes, pass_factors, peak_flops
from nativevl.train.optim import build_optimizer, lr_factor, set_lr
from nativevl.train.parallel import all_reduce_grads, all_reduce_sum, barrier, init_distributed
from nativevl.train.stages import MODULES, StagePolicy, apply_policy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 1000
    lr: float = 2e-5
    min_lr_ratio: float = 0.0
    warmup_steps: int = 30
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0
    global_batch: int = 8  # packs per optimiser step over all ranks (gradient accumulation fills the rest)
    num_workers: int = 0
    loss_chunk: int = 4096  # labelled positions per logits chunk
    save_every: int = 0  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    seed: int = 0
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, float32 on CPU
    peak_tflops: float | None = None  # for MFU where the device is not known
    tensorboard: bool = True
    export: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.max_steps < 1 or self.global_batch < 1:
            raise ValueError(f"max_steps and global_batch must be >= 1, got {self.max_steps}, {self.global_batch}")


class NonFiniteLoss(RuntimeError):
    pass


def train(
    model: VisionLanguageModel,
    tokenizer,
    dataset: PackedDataset,
    policy: StagePolicy,
    cfg: TrainConfig,
    out_dir: str | Path,
    run_config: dict | None = None,
) -> dict:
    """Train (or resume) into out_dir; returns a summary. The dataset must already know its rank."""
    out_dir = Path(out_dir)
    rank, world, device = init_distributed()
    if cfg.global_batch % world:
        raise ValueError(f"global_batch {cfg.global_batch} is not divisible by the {world} processes")
    accum = cfg.global_batch // world
    main = rank == 0
    torch.manual_seed(cfg.seed + rank)

    params = apply_policy(model, policy)
    model.to(device)
    trainable = [p for ps in params.values() for p in ps]
    lrs = {m: (policy.get(m).lr if policy.get(m).lr is not None else cfg.lr) for m in MODULES}
    optimizer = build_optimizer(model, {m: ps for m, ps in params.items() if ps}, lrs,
                                weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext

    step, tokens_total = 0, 0
    state = ckpt.load_latest(out_dir / "checkpoints")
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, tokens_total = state["step"], state["tokens"]
        if len(state["rng"]) != world:
            raise ValueError(
                f"{out_dir / 'checkpoints'} was written by {len(state['rng'])} process(es); resume with the same number, not {world}"
            )
        dataset.load_state_dict(state["data"][str(rank)])
        ckpt.set_rng_state(state["rng"][rank])
        if main:
            log.info("resumed from step %d (%s)", step, out_dir / "checkpoints")
    if main and run_config is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(run_config, indent=2, default=str) + "\n")

    tracker = StreamTracker(dataset.cfg.max_reject_fraction, dataset.cfg.min_records_before_abort)
    if state is not None:
        tracker.load_state_dict(state["data"][str(rank)])
    batches = iterate_batches(make_loader(dataset, cfg.num_workers), tracker)
    sizes = module_sizes(model)
    factors = pass_factors({m: policy.get(m).mode for m in MODULES})
    peak = peak_flops(device, cfg.peak_tflops)
    logger = MetricsLogger(out_dir, cfg.max_steps, step, enabled=main, tensorboard=cfg.tensorboard)
    model.train()
    last_loss = float("nan")
    try:
        while step < cfg.max_steps:
            started = time.perf_counter()
            micro = []
            for _ in range(accum):
                batch = next(batches, None)
                if batch is None:
                    break
                micro.append(batch)
            if len(micro) < accum:
                if main:
                    log.warning("data ran out at step %d (%d records read)", step, tracker.seen)
                break
            weight_sum = all_reduce_sum(torch.stack([b.loss_weights.sum() for b in micro]).sum().to(device))
            factor = lr_factor(step, warmup_steps=cfg.warmup_steps, total_steps=cfg.max_steps, min_ratio=cfg.min_lr_ratio)
            set_lr(optimizer, factor)
            loss_sum = torch.zeros((), device=device)
            flops, n_tokens = 0.0, 0
            for batch in micro:
                b = batch.to(device, dtype=torch.bfloat16 if use_bf16 else None)
                with autocast():
                    hidden = model(**b.model_inputs(), compute_logits=False).hidden_states
                    loss = labelled_lm_loss(hidden, model.lm_head.weight, b.labels, b.loss_weights, weight_sum, cfg.loss_chunk)
                if not torch.isfinite(loss):
                    dump = out_dir / f"nonfinite-step{step + 1}-rank{rank}.pt"
                    torch.save(batch, dump)
                    raise NonFiniteLoss(
                        f"non-finite loss {loss.item()} at step {step + 1} (rank {rank}); batch dumped to {dump} "
                        f"(documents: {batch.sources})"
                    )
                loss.backward()
                loss_sum += loss.detach()
                lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
                flops += batch_flops(model.config, sizes, factors, lengths, batch.num_tiles)
                n_tokens += batch.num_tokens
            all_reduce_grads(trainable)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_value = all_reduce_sum(loss_sum).item()
            n_tokens = int(all_reduce_sum(torch.tensor(float(n_tokens), device=device)).item())
            flops = all_reduce_sum(torch.tensor(flops, device=device, dtype=torch.float64)).item()
            tokens_total += n_tokens
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - started
            last_loss = loss_value
            logger.log({
                "step": step,
                "loss": loss_value,
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": float(grad_norm),
                "tokens": n_tokens,
                "tokens_total": tokens_total,
                "tokens_per_s": n_tokens / elapsed,
                "mfu": flops / elapsed / (peak * world) if peak else None,
                "step_time_s": elapsed,
                "rejected_records": tracker.total_rejected,
            })
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps:
                save_train_state(out_dir, model, optimizer, step, tokens_total, tracker, cfg, rank, world)
    finally:
        logger.close()
    summary = {"step": step, "tokens": tokens_total, "loss": last_loss, "rejected": tracker.by_kind, "records": tracker.seen}
    if cfg.export and step >= cfg.max_steps:
        export_final(model, tokenizer, out_dir / "final", main)
    return summary


def save_train_state(out_dir, model, optimizer, step, tokens, tracker, cfg, rank, world) -> None:
    """Every rank contributes its data and RNG state; rank 0 writes (model and optimiser are replicated)."""
    data_state, rng = tracker.state_dict(), ckpt.rng_state()
    if world > 1:
        gathered_data, gathered_rng = [None] * world, [None] * world
        torch.distributed.all_gather_object(gathered_data, data_state)
        torch.distributed.all_gather_object(gathered_rng, rng)
    else:
        gathered_data, gathered_rng = [data_state], [rng]
    if rank == 0:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "tokens": tokens,
            "data": {str(r): s for r, s in enumerate(gathered_data)},
            "rng": gathered_rng,
            "train_config": asdict(cfg),
        }
        ckpt.save_checkpoint(out_dir / "checkpoints", step, state, keep=cfg.keep_checkpoints)
    barrier()


def export_final(model: VisionLanguageModel, tokenizer, path: Path, main: bool) -> None:
    """LoRA merged into the base weights, then the -hf layout with tokenizer and processor files."""
    if main:
        merge_lora(model)
        model.eval().save_pretrained(path, layout="hf", tokenizer=tokenizer, dtype=torch.float32)
    barrier()
