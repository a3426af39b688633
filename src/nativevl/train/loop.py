"""The one training loop: native pre-training, SFT (and later MPO / PRM) differ only by config.

Per optimiser step: `global_batch` packs (split over ranks, accumulated), loss = weighted CE on the
labelled positions normalised by the global weight sum, gradients all-reduced, clipped, AdamW,
warmup + cosine. Resumes exactly from DIR/checkpoints; exports the -hf layout to DIR/final.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from nativevl.data.pipeline import PackedDataset, StreamTracker, iterate_batches, make_loader, read_all
from nativevl.infer.prm import label_token_ids
from nativevl.model.attention import resolve_backend
from nativevl.model.vlm import VisionLanguageModel
from nativevl.train import checkpoint as ckpt
from nativevl.train import parallel, qlora
from nativevl.train.checkpoint import check_resume_config
from nativevl.train.evaluation import TrainingEval, metric_key
from nativevl.train.export import BestModel, export_final
from nativevl.train.losses import MPOWeights
from nativevl.train.metrics import MetricsLogger, batch_flops, module_sizes, pass_factors, peak_flops
from nativevl.train.objectives import OBJECTIVES, make_objective
from nativevl.train.optim import build_optimizer, lr_factor, set_lr
from nativevl.train.parallel import all_reduce_max, all_reduce_sum, broadcast_object, init_distributed
from nativevl.train.plan import keeps_frozen_bf16, preflight
from nativevl.train.stages import MODULES, StagePolicy, apply_policy, bf16_base, quantize_base, store_frozen
from nativevl.train.watch import HangWatchdog, Interrupted, MemoryMarks, OutOfMemory, StopRequests

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
    save_every: int = 500  # steps between checkpoints (0: only at the end; a stopping signal saves too)
    keep_checkpoints: int = 2
    # steps whose loss or gradient is not finite, or whose batches ran out of device memory (several processes:
    # on the resume), skipped (no update; their batches dumped / marked, logged) before the run stops, in one
    # session; 0: the first stops it
    max_skipped_steps: int = 0
    seed: int = 0
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, float32 on CPU
    # the frozen linear layers' weights (a LoRA base, a frozen ViT, MPO's reference) when the run computes in
    # bf16, which autocast casts them to at each use anyway (the same products, half the bytes, no copies):
    # auto keeps in bf16 those bf16 holds exactly (a bf16 checkpoint, as InternVL3's releases are), bfloat16
    # all of them (rounding a float32 base's, in the exports too), float32 none
    frozen_dtype: str = "auto"
    peak_tflops: float | None = None  # for MFU where the device is not known
    tensorboard: bool = True
    export: bool = True
    attn_implementation: str = "auto"  # auto (varlen on CUDA, sdpa on the CPU) | sdpa | eager | varlen | flex
    activation_checkpointing: bool = False  # recompute each ViT / LLM block in backward
    compile: bool | None = None  # torch.compile per block; None: on CUDA, off on the CPU
    objective: str = "lm"  # lm (pre-training, SFT, VisualPRM's PRM) | mpo (preference records) | prm (two-way labels)
    mpo_beta: float = 0.1
    mpo_preference_weight: float = 0.8  # w_p, DPO sigmoid
    mpo_quality_weight: float = 0.2  # w_q, BCO pair with reward shift
    mpo_generation_weight: float = 1.0  # w_g, NLL of the chosen response
    val_every: int = 0  # steps between validations on the run's val_meta; 0: once, at the end
    val_records: int = 256  # records of val_meta in the validation set (the same ones every time)
    # `nativevl eval`'s tasks on the model in training (toy families, .tsv / .jsonl files; comma-separated),
    # every eval_every steps (0: once, at the end), eval_n questions each, DIR/evals/step-N.json
    eval_tasks: str = ""
    eval_every: int = 0
    eval_n: int = 100
    eval_batch_size: int = 16
    eval_seed: int = 10_000  # the toy tasks' question generator (`nativevl eval --seed`'s default)
    # DIR/best: the model of the step with the best val_loss (lowest) or eval_<task> / eval_mean (highest)
    best_metric: str = ""
    # seconds a step may take before every thread's stack goes to DIR/hang-rankN-<time>.txt; 0: off. Below
    # NCCL's 10-minute collective timeout, which ends a rank stuck in a collective before any dump
    hang_timeout: float = 300.0
    # before anything moves to a GPU, `nativevl plan`'s estimate for this run on the GPU's memory: a run
    # that would not fit stops with the plan and what would fit (error), or only logs them (warn), or off
    memory_check: str = "error"

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.frozen_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"frozen_dtype must be auto, float32 or bfloat16, got {self.frozen_dtype!r}")
        if self.frozen_dtype == "bfloat16" and self.dtype == "float32":
            raise ValueError("frozen_dtype=bfloat16 keeps frozen layers for bf16 autocast; dtype=float32 computes in "
                             "float32 (use dtype=bfloat16, or frozen_dtype=auto)")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.max_steps < 1 or self.global_batch < 1:
            raise ValueError(f"max_steps and global_batch must be >= 1, got {self.max_steps}, {self.global_batch}")
        for name in ("lr", "min_lr_ratio", "weight_decay", "eps", "grad_clip", "mpo_beta", "mpo_preference_weight",
                     "mpo_quality_weight", "mpo_generation_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:  # NaN passes every comparison; a NaN lr trains NaN weights
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.min_lr_ratio > 1:
            raise ValueError(f"min_lr_ratio is the floor of the schedule as a share of lr: at most 1, got {self.min_lr_ratio}")
        if not math.isfinite(self.hang_timeout) or self.hang_timeout < 0:
            raise ValueError(f"hang_timeout must be a finite number of seconds >= 0, got {self.hang_timeout}")
        if self.memory_check not in ("error", "warn", "off"):
            raise ValueError(f"memory_check must be error, warn or off, got {self.memory_check!r}")
        for name in ("val_records", "eval_n", "eval_batch_size", "loss_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "save_every", "num_workers", "keep_checkpoints", "val_every", "eval_every",
                     "max_skipped_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")


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
    val_dataset: PackedDataset | None = None,
) -> dict:
    """Train (or resume) into out_dir; returns a summary. The dataset must already know its rank.
    With `val_dataset` (a finite held-out stream for this rank), the validation loss is measured every
    `cfg.val_every` steps and at the end. In a bf16 run (`cfg.frozen_dtype` auto or bfloat16) the model's
    frozen linear layers are bf16 when this returns: use it under bf16 autocast (its exports are float32)."""
    out_dir = Path(out_dir)
    rank, world, device = init_distributed()
    if cfg.global_batch % world:
        raise ValueError(f"global_batch {cfg.global_batch} is not divisible by the {world} processes")
    accum = cfg.global_batch // world
    main = rank == 0
    if main and cfg.warmup_steps >= cfg.max_steps:
        log.warning("warmup_steps (%d) >= max_steps (%d): the learning rate never reaches --lr (it ends at %.3g)",
                    cfg.warmup_steps, cfg.max_steps, cfg.lr * cfg.max_steps / max(cfg.warmup_steps, 1))
    torch.manual_seed(cfg.seed + rank)
    evaluator = TrainingEval(cfg.eval_tasks, every=cfg.eval_every, n=cfg.eval_n, batch_size=cfg.eval_batch_size,
                             seed=cfg.eval_seed, tokenizer=tokenizer, out_dir=out_dir, rank=rank, world=world,
                             system_message=dataset.cfg.system_message) if cfg.eval_tasks else None
    measured = ({"val_loss"} if val_dataset is not None else set()) | (
        {*map(metric_key, evaluator.tasks), "eval_mean"} if evaluator is not None else set())
    BestModel.check(cfg.best_metric, measured)  # before anything runs

    check_memory(model, policy, cfg, dataset, world, device, main)
    # QLoRA: each layer quantized on the device, so only the 4-bit copies live there; MPO's pi_0 is this base
    if quantize_base(model, policy, device) and run_config is not None:
        run_config = {**run_config, "qlora_base": qlora.fingerprint(model)}  # a resume must quantize the same base
    model.to(device)
    mpo = MPOWeights(cfg.mpo_preference_weight, cfg.mpo_quality_weight, cfg.mpo_generation_weight, cfg.mpo_beta)
    label_ids = label_token_ids(tokenizer) if cfg.objective == "prm" else None
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    frozen = frozen_storage(cfg.frozen_dtype, use_bf16)
    exact_only = cfg.frozen_dtype == "auto"  # auto rounds nothing; bfloat16 rounds a float32 base's layers
    objective = make_objective(cfg.objective, model, cfg.loss_chunk, mpo, label_ids)  # before LoRA: the reference is pi_0
    freed, inexact = (store_frozen(objective.reference, frozen, exact_only=exact_only)
                      if frozen and hasattr(objective, "reference") else (0, 0))
    apply_policy(model, policy)
    model.to(device)  # LoRA adapters were made on the CPU
    if frozen:
        more = store_frozen(model, frozen, exact_only=exact_only)
        freed, inexact = freed + more[0], inexact + more[1]
    if main and freed:
        log.info("frozen linear layers kept in %s (--frozen_dtype=%s): %.2f GiB less", frozen, cfg.frozen_dtype,
                 freed / 2**30)
    if main and inexact:
        log.warning("%d frozen linear tensors hold values bf16 does not (a float32 base): %s", inexact,
                    "kept in float32 (--frozen_dtype=bfloat16 rounds them, as bf16 autocast computes with them "
                    "anyway, for half their memory)" if exact_only else
                    "rounded to bf16 (as autocast computes with them); final/ and best/ hold them rounded")
    sizes = module_sizes(model)  # whole counts, before sharding
    model.attn_backend = resolve_backend(cfg.attn_implementation, device)
    if hasattr(objective, "reference"):  # pi_0 must run the same kernels, or step 1's log-ratios are not 0
        objective.reference.attn_backend = model.attn_backend
    # one process: the plain module; several: FSDP2 per block (train/parallel.py)
    parallel.parallelize(model, world=world, mixed_precision=use_bf16, activation_checkpointing=cfg.activation_checkpointing,
                         compile=cfg.compile if cfg.compile is not None else device.type == "cuda")
    if hasattr(objective, "reference"):  # pi_0 is sharded like the policy (no compile or checkpointing: no grads)
        parallel.parallelize(objective.reference, world=world, mixed_precision=use_bf16, activation_checkpointing=False,
                             compile=False)
    params = parallel.trainable_by_module(model)
    trainable = [p for ps in params.values() for p in ps]
    lrs = {m: (policy.get(m).lr if policy.get(m).lr is not None else cfg.lr) for m in MODULES}
    optimizer = build_optimizer(model, {m: ps for m, ps in params.items() if ps}, lrs,
                                weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext

    step, tokens_total = 0, 0
    found = ckpt.latest(out_dir / "checkpoints")
    rank_state = None
    if found is not None and run_config is not None:  # before loading: a changed setting is named, not a missing key
        check_resume_config(out_dir, run_config, ckpt.step_of(found), main)
        if world > 1:  # every rank has read config.json before rank 0 moves it and writes the new one
            torch.distributed.barrier()
    if found is not None:
        meta, rank_state = load_train_state(found, model, optimizer, rank, world, max(cfg.num_workers, 1))
        step, tokens_total = meta["step"], meta["tokens"]
        objective.load_state_dict(meta.get("objective", {"reward_shift": {"mean": 0.0, "count": 0.0}}))
        dataset.load_state_dict(rank_state["data"])
        if rank_state["rng"] is not None:  # None: a rank the saving run did not have keeps its seed
            ckpt.set_rng_state(rank_state["rng"])
        if main:
            log.info("resumed from step %d (%s, written by %d process(es))", step, found, meta["world"])
    if found is None:  # from step 0: an earlier start's rejected records (no checkpoint kept them) are read again
        for d in {getattr(x, "rejects_dir", None) for x in (dataset, val_dataset)} - {None}:
            for f in d.glob(f"rejects-rank{rank}-worker*.jsonl"):
                f.unlink()
    if main and run_config is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(run_config, indent=2, default=str) + "\n")

    best = None
    if cfg.best_metric:  # what the value is measured on: a best measured otherwise is not compared with
        basis = ({"val_records": cfg.val_records, "val_sets": [[src.name, len(src)] for src in val_dataset.sources]}
                 if cfg.best_metric == "val_loss" else evaluator.basis)
        best = BestModel(cfg.best_metric, basis, out_dir, tokenizer, main, start_step=step)
    tracker = StreamTracker(dataset.cfg.max_reject_fraction, dataset.cfg.min_records_before_abort)
    if rank_state is not None:
        tracker.load_state_dict(rank_state["data"])
    batches = iterate_batches(make_loader(dataset, cfg.num_workers), tracker)
    val_batches = read_val_batches(val_dataset, objective, device) if val_dataset is not None else None
    last_val: dict = {}
    last_eval: dict = {}
    factors = pass_factors({m: policy.get(m).mode for m in MODULES})
    # MPO's frozen reference runs a forward pass of the whole model over every batch: work the step does
    reference_factors = dict.fromkeys(factors, 2) if hasattr(objective, "reference") else None
    peak = peak_flops(device, cfg.peak_tflops)
    logger = MetricsLogger(out_dir, cfg.max_steps, step, enabled=main, tensorboard=cfg.tensorboard)
    model.train()
    watchdog = HangWatchdog(out_dir / f"hang-rank{rank}-{time.strftime('%Y%m%d-%H%M%S')}.txt", cfg.hang_timeout)
    stops = StopRequests().__enter__()  # SIGTERM, SIGUSR1, ^C: save after the step, then stop (watch.py)
    started_at = step  # the step this session began from (a checkpoint's, on resume)
    skipped = 0  # steps skipped for a non-finite loss or gradient, or out of memory (--max_skipped_steps)
    oom = MemoryMarks(out_dir)  # steps whose batches ran out of memory before (rank 0's files, on every rank)
    oom.share(broadcast_object)
    last_loss = float("nan")
    saved_step = step  # a resumed run's checkpoint holds its step already
    ran_out = False

    def evaluate_now() -> dict:
        watchdog.arm()  # each batch of questions re-arms it: an evaluation may take longer than a step
        record, report = evaluator(model, step, autocast, heartbeat=watchdog.arm)
        if best is not None:
            watchdog.arm()  # a copy of the model to the host and to disk
            best.offer(record, model, step)
        # the report last: a run stopped before it evaluates (and offers) this step again when it resumes
        evaluator.write(report, step)
        logger.log_eval(record)
        return record

    def validate_now() -> dict:
        record = validate(model, objective, val_batches, device, use_bf16, autocast, step)
        if best is not None:
            watchdog.arm()
            best.offer(record, model, step)
        # logged last: a run stopped before it validates (and offers) this step again when it resumes
        logger.log_val(record)
        return record

    def val_due() -> bool:
        return val_batches is not None and ((cfg.val_every and step % cfg.val_every == 0) or step == cfg.max_steps)

    def forward_backward(micro: list, norms: torch.Tensor) -> tuple:
        """Forward and backward over a step's batches: (loss sum, logged parts, flops, tokens)."""
        loss_sum = torch.zeros((), device=device)
        parts: dict[str, torch.Tensor] = {}
        flops, n_tokens = 0.0, 0
        for batch in micro:
            b = batch.to(device, dtype=torch.bfloat16 if use_bf16 else None)
            with autocast():
                loss, logs = objective(model, b, norms)
            finite = bool(torch.isfinite(loss))
            if not finite:
                dump = out_dir / f"nonfinite-step{step + 1}-rank{rank}.pt"
                torch.save(batch, dump)
                said = (f"non-finite loss {loss.item()} at step {step + 1} (rank {rank}); batch dumped to {dump} "
                        f"(documents: {batch.sources})")
                if skipped >= cfg.max_skipped_steps:
                    raise NonFiniteLoss(said)
                log.warning("%s: the step is skipped", said)
            # backward all the same: the ranks' collectives stay in step, and the NaN gradient norm they
            # reduce together skips the update on every rank
            loss.backward()
            for k, v in logs.items() if finite else ():
                parts[k] = parts.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float32, device=device)
            if finite:
                loss_sum += loss.detach()
            lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
            flops += batch_flops(model.config, sizes, factors, lengths, batch.num_tiles)
            if reference_factors:
                flops += batch_flops(model.config, sizes, reference_factors, lengths, batch.num_tiles)
            n_tokens += batch.num_tokens
        return loss_sum, parts, flops, n_tokens

    try:
        # stopped after this step's checkpoint, before its validation or evaluation ended: they run first
        if step > 0 and val_due() and not broadcast_object("val_loss" in logger.logged_at_start):
            last_val = validate_now()
        if evaluator is not None and evaluator.resume(step, cfg.max_steps):
            last_eval = evaluate_now()
        while step < cfg.max_steps:
            watchdog.arm()  # the step, its logging, validation and checkpoint must end within hang_timeout
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)  # peak_memory_gib: this step's
            started = time.perf_counter()
            micro = []
            for _ in range(accum):
                batch = next(batches, None)
                if batch is None:
                    break
                micro.append(batch)
            data_wait = time.perf_counter() - started  # this rank's time waiting for its batches
            # every rank stops at the same step when any rank's data ran out (no one waits in a collective);
            # one process decides alone, without a device sync before every step
            out_of_data = len(micro) < accum
            if parallel.is_distributed():
                out_of_data = all_reduce_sum(torch.tensor(float(out_of_data), device=device)).item() > 0
            if out_of_data:
                if main:
                    log.warning("data ran out at step %d (%d records read)", step, tracker.seen)
                ran_out = True
                break
            norms = all_reduce_sum(objective.local_normalizers(micro).to(device))
            factor = lr_factor(step, warmup_steps=cfg.warmup_steps, total_steps=cfg.max_steps, min_ratio=cfg.min_lr_ratio)
            set_lr(optimizer, factor)
            skip = None  # why this step makes no update (its batches ran out of memory)
            if step + 1 in oom.steps:  # every rank knows the marked steps: they agree on whether to skip
                again = all_reduce_max(torch.tensor([float(oom.holds(step + 1, micro))], device=device)).item() > 0
                if again and skipped < cfg.max_skipped_steps:
                    skip = "its batches ran out of memory before (oom-step*.json): skipped"
                elif again and main:
                    log.warning("step %d's batches ran out of memory before (oom-step%d-rank*.json); with "
                                "--max_skipped_steps=%d they are tried again", step + 1, step + 1, cfg.max_skipped_steps)
            if skip is None:
                # what a skip in place undoes: the objective's running state (MPO's reward shift) and the
                # random draws (dropout) of the batches that ran, so that it equals a skip on the resume
                undo = (objective.state_dict(), ckpt.rng_state()) if world == 1 and cfg.max_skipped_steps else None
                try:
                    loss_sum, parts, flops, n_tokens = forward_backward(micro, norms)
                except torch.OutOfMemoryError as e:
                    said = oom.record(step + 1, rank, micro, e)
                    if undo is None or skipped >= cfg.max_skipped_steps:
                        raise OutOfMemory(f"{said}. {OutOfMemory.BATCH_ADVICE}") from e
                    skip = f"{said}: skipped"
                    objective.load_state_dict(undo[0])
                    ckpt.set_rng_state(undo[1])
            if skip is not None:  # no update (one process: in place; several: on the resume, every rank together)
                gc.collect()  # what the failed step held
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                loss_sum, parts, flops, n_tokens = torch.zeros((), device=device), {}, 0.0, 0
                skipped += 1
                skipping, grad_norm = True, None
                log.warning("step %d: %s (%d of --max_skipped_steps=%d)", step + 1, skip, skipped,
                            cfg.max_skipped_steps)
                optimizer.zero_grad(set_to_none=True)
            else:
                # FSDP summed the gradients over ranks during backward
                parallel.fill_missing_grads(trainable)
                grad_norm = parallel.clip_grad_norm(trainable, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                skipping = not math.isfinite(grad_norm) and skipped < cfg.max_skipped_steps
                if skipping:  # the global norm: every rank skips together, before any weight changes
                    skipped += 1
                    log.warning("non-finite gradient norm at step %d: no update (%d of --max_skipped_steps=%d skipped)",
                                step + 1, skipped, cfg.max_skipped_steps)
                    optimizer.zero_grad(set_to_none=True)
                elif not math.isfinite(grad_norm):  # the global norm: every rank stops here, before any weight changes
                    dump = out_dir / f"nonfinite-step{step + 1}-rank{rank}.pt"
                    torch.save(micro, dump)
                    raise NonFiniteLoss(
                        f"non-finite gradient norm {grad_norm} at step {step + 1} (rank {rank}) with a finite loss; "
                        f"the step's {len(micro)} batch(es) dumped to {dump} "
                        f"(documents: {[s for b in micro for s in b.sources]})"
                    )
                else:
                    try:
                        optimizer.step()
                    except torch.OutOfMemoryError as e:  # not a batch's: every step would (its state is made once)
                        raise OutOfMemory(f"the optimiser's update at step {step + 1} ran out of device memory (rank "
                                          f"{rank}). {OutOfMemory.OPTIMISER_ADVICE}") from e
                    optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_value = all_reduce_sum(loss_sum).item()
            part_values = {k: all_reduce_sum(v).item() for k, v in sorted(parts.items())}
            n_tokens = int(all_reduce_sum(torch.tensor(float(n_tokens), device=device)).item())
            flops = all_reduce_sum(torch.tensor(flops, device=device, dtype=torch.float64)).item()
            tokens_total += n_tokens
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - started
            # the slowest rank's data wait (everyone waits for it in the collectives) and the largest peak memory
            memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
            # ... and whether any rank was asked to stop (the ranks stop together, after the same step)
            data_wait, memory, stop = all_reduce_max(torch.tensor([data_wait, memory, stops.signal is not None],
                                                                  device=device, dtype=torch.float64)).tolist()
            last_loss = last_loss if skipping else loss_value
            logger.log({
                "step": step,
                "loss": None if skipping else loss_value,
                "lr": cfg.lr * factor,  # the run's; a module with its own learning rate also logs lr_<module>
                **{f"lr_{m}": lrs[m] * factor for m in MODULES if policy.get(m).lr is not None and params[m]},
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens": n_tokens,
                "tokens_total": tokens_total,
                "tokens_per_s": n_tokens / elapsed,
                "tokens_per_s_per_device": n_tokens / elapsed / world,  # per process: one device each
                "mfu": flops / elapsed / (peak * world) if peak else None,
                "step_time_s": elapsed,
                "data_wait_s": data_wait,
                "data_wait_frac": min(data_wait / elapsed, 1.0),
                "peak_memory_gib": memory if device.type == "cuda" else None,
                "rejected_records": tracker.total_rejected,
                **({"skipped_steps": skipped} if cfg.max_skipped_steps else {}),
                **part_values,
            })
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps or stop:
                save_train_state(out_dir, model, optimizer, step, tokens_total, tracker, cfg, rank, world,
                                 objective.state_dict())
                saved_step = step
            if stop and step < cfg.max_steps:
                raise Interrupted(f"asked to stop ({stops.signal or 'by another rank'}) at step {step} of "
                                  f"{cfg.max_steps}: its checkpoint is saved; the same command resumes the run")
            if val_due():
                last_val = validate_now()
            if evaluator is not None and evaluator.due(step, cfg.max_steps):
                last_eval = evaluate_now()
        if ran_out and val_batches is not None and step > started_at and last_val.get("step") != step:
            last_val = validate_now()
        if ran_out and evaluator is not None and step > started_at and last_eval.get("step") != step:
            last_eval = evaluate_now()
        if ran_out and step > saved_step:  # the steps since the last checkpoint are kept, not lost
            save_train_state(out_dir, model, optimizer, step, tokens_total, tracker, cfg, rank, world,
                             objective.state_dict())
    finally:
        stops.__exit__()
        watchdog.close()
        logger.close()
    if step == started_at and main:
        log.info("the run is at step %d of %d already: nothing to train", step, cfg.max_steps)
    # the loss of this session's last step (null when it trained none: JSON has no NaN)
    summary = {"step": step, "tokens": tokens_total, "loss": last_loss if math.isfinite(last_loss) else None,
               "rejected": tracker.by_kind, "records": tracker.seen}
    if last_val:
        summary["val_loss"] = last_val["val_loss"]
    if last_eval:
        summary["eval"] = {k: v for k, v in last_eval.items() if k != "step"}
    if best is not None and best.step is not None:
        summary["best"] = best.summary()
    if cfg.export and (step >= cfg.max_steps or (ran_out and step > 0)):  # the data's end is the run's end too
        export_final(model, tokenizer, out_dir / "final", main, policy)
    return summary


def read_val_batches(dataset: PackedDataset, objective, device: torch.device) -> list:
    """This rank's share of the validation set, read once (bad records counted and skipped as in training)
    and checked against the objective before the first step (preference records for an `lm` stage fail
    here, not at the first validation). A sharded forward is collective: every rank must hold a pack."""
    batches = read_all(dataset, "validation set")
    if batches:
        try:
            objective.local_normalizers(batches)
        except ValueError as e:
            raise ValueError(f"the validation set (val_meta) does not suit this stage's objective: {e}") from None
    fewest = -all_reduce_max(torch.tensor([-float(len(batches))], device=device)).item()
    if fewest < 1:
        raise ValueError(f"the validation set ({dataset.cfg.max_records} records of val_meta) gives some of the "
                         f"{dataset.world_size} process(es) no pack: raise --val_records or give more held-out data")
    return batches


@torch.no_grad()
def validate(model, objective, batches: list, device, use_bf16: bool, autocast, step: int) -> dict:
    """The objective's loss (and its logged parts) over the whole validation set, normalised over all of it
    and all ranks as a training step is over its batches: {"step", "val_loss", "val_<part>", "val_tokens"}.
    Dropout is off; the RNG and the objective's running state (MPO's reward shift) are left as they were,
    so validating does not change the training run. Every rank runs as many forwards (the most any rank
    has; a rank with fewer repeats its packs without counting them), as a sharded forward needs."""
    rng = ckpt.rng_state()
    model.eval()
    try:
        norms = all_reduce_sum(objective.local_normalizers(batches).to(device))
        rounds = int(all_reduce_max(torch.tensor([float(len(batches))], device=device)).item())
        loss_sum = torch.zeros((), device=device)
        parts: dict[str, torch.Tensor] = {}
        tokens = 0
        for i in range(rounds):
            batch = batches[i % len(batches)]
            b = batch.to(device, dtype=torch.bfloat16 if use_bf16 else None)
            with autocast():
                loss, logs = objective(model, b, norms, update=False)
            if i >= len(batches):
                continue  # a repeat that only keeps this rank in step with the others
            loss_sum += loss.float()
            for k, v in logs.items():
                parts[k] = parts.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float32, device=device)
            tokens += batch.num_tokens
        record = {"step": step, "val_loss": all_reduce_sum(loss_sum).item()}
        record.update({f"val_{k}": all_reduce_sum(v).item() for k, v in sorted(parts.items())})
        record["val_tokens"] = int(all_reduce_sum(torch.tensor(float(tokens), device=device)).item())
    finally:
        model.train()
        ckpt.set_rng_state(rng)
    return record


def frozen_storage(frozen_dtype: str, use_bf16: bool) -> torch.dtype | None:
    """The dtype the frozen linear layers are kept in (`stages.store_frozen`), None: as loaded."""
    if frozen_dtype == "float32":
        return None
    if not use_bf16:
        if frozen_dtype == "bfloat16":
            raise ValueError("frozen_dtype=bfloat16 keeps frozen layers for bf16 autocast, but this run computes in "
                             "float32 (dtype=auto on a CPU): use dtype=bfloat16, or frozen_dtype=auto")
        return None
    return torch.bfloat16


def save_train_state(out_dir, model, optimizer, step, tokens, tracker, cfg, rank, world, objective_state=None) -> None:
    """Collective: model and optimiser shards through DCP, each rank's data position and RNG beside them."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {
        "app": {"model": model_sd, "optimizer": optim_sd},
        "meta": {"step": step, "tokens": tokens, "world": world, "train_config": asdict(cfg),
                 "objective": objective_state or {}},
        "rank_state": {"data": tracker.state_dict(), "rng": ckpt.rng_state()},
        "rank": rank,
    }
    ckpt.save_checkpoint(out_dir / "checkpoints", step, state, keep=cfg.keep_checkpoints)


def load_train_state(path: Path, model, optimizer, rank: int, world: int, workers: int) -> tuple[dict, dict]:
    """Model and optimiser from a checkpoint written at any world size; (meta, this rank's data and RNG)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    app = {"model": model_sd, "optimizer": optim_sd}
    meta, rank_state = ckpt.load_checkpoint(path, app, rank, world, workers)
    # the moments and step counts come from the checkpoint, the hyper-parameters from this run's config
    # (the same ones on an exact resume; the new ones when the command changed --lr, --weight_decay, ...)
    # ... and how this machine runs it (fused on CUDA: a checkpoint from the CPU would turn it off)
    hyper = [{k: g[k] for k in ("base_lr", "weight_decay", "betas", "eps", "fused", "foreach") if k in g}
             for g in optimizer.param_groups]
    set_state_dict(model, optimizer, model_state_dict=app["model"], optim_state_dict=app["optimizer"])
    for group, values in zip(optimizer.param_groups, hyper):
        group.update(values)
    return meta, rank_state


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory of a CUDA device; None for the CPU (no check: the host's memory is not planned)."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def check_memory(model, policy: StagePolicy, cfg: TrainConfig, dataset, world: int, device: torch.device,
                 main: bool) -> None:
    """`nativevl plan` for this run on this GPU, before the model is on it. When even the plan's lower
    bound (its exact terms, the activations' estimate taken as 25% high, the overhead's flat part) exceeds
    the GPU's memory: a ValueError with the plan and what would fit (memory_check=error; a warning with
    warn). When only the estimate does, a warning. The plan assumes bf16 compute (--dtype=float32 on a
    GPU needs more) and the GPU's whole memory."""
    budget = device_memory(device)
    if budget is None or cfg.memory_check == "off":
        return
    p, report = preflight(model.config, policy, gpus=world, tokens=dataset.cfg.max_tokens, tiles=dataset.cfg.max_tiles,
                          activation_checkpointing=cfg.activation_checkpointing, loss_chunk=cfg.loss_chunk,
                          gpu_bytes=budget, reference=cfg.objective == "mpo",
                          frozen_bf16=keeps_frozen_bf16(cfg, lambda: bf16_base(model)))
    if p.fits:
        return
    surely = p.lower_bound > budget
    stop = surely and cfg.memory_check == "error"
    message = (f"this run is estimated {'not to fit' if surely else 'to be at the limit of'} the "
               f"{budget / 1024**3:.1f} GiB of each GPU ({device}): at least {p.lower_bound / 1024**3:.1f} GiB, "
               f"about {p.total / 1024**3:.1f} GiB\n{report}"
               + ("\n(--memory_check=warn runs it anyway)" if stop else ""))
    if stop:
        raise ValueError(message)
    if main:
        log.warning("%s", message)
