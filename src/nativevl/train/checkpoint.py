"""Train-state checkpoints: DIR/checkpoints/step-00000042/ holding

- the model and optimiser through torch.distributed.checkpoint (DCP: every rank writes its shards,
  `.metadata` says where each piece of every tensor lies), so a run resumes at another world size;
- meta.pt (rank 0): step, tokens, world size, train config, objective state; written last, it marks
  the checkpoint complete;
- rank-00003.pt: rank 3's data position and RNG states.

Everything is written to a temporary folder and renamed, so a crash (even SIGKILL) mid-save never
leaves a checkpoint that looks complete; only the last `keep` are kept. Across nodes, DIR must be on
a file system every node sees.

Resuming at another world size: model and optimiser are resharded by DCP. Rank r takes old rank r's
RNG state when there was one (else its seed). The data stream cannot keep its per-shard positions
(stream item i belongs to shard i % shards, and the shard count changed; so also when only
`num_workers` changed), so every new shard starts
after the furthest position any old shard had reached: no record is seen twice, the packs that waited
in the old shards (made or open) are dealt out over the new ones, and the records that lay between the
old shards' positions (fewer than a few packs' worth) are skipped.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from nativevl.train.parallel import barrier, broadcast_object, is_distributed

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{8})$")
META = "meta.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_file(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


class CheckpointNotSaved(RuntimeError):
    """A checkpoint could not be written (a full disk, say); the ones before it are intact."""


def _described(error: BaseException) -> str:
    """An error as one line of text; DCP's CheckpointException (which holds each rank's error with its
    traceback) by the errors it wraps."""
    wrapped = getattr(error, "failures", None)
    if isinstance(wrapped, dict) and wrapped:
        return "; ".join(f"{type(e).__name__}: {e}" for e, _ in wrapped.values())
    return f"{type(error).__name__}: {error}"


def _interrupt_in(error: BaseException) -> BaseException | None:
    """A KeyboardInterrupt (a second ^C) or SystemExit that DCP wrapped as a failed write."""
    wrapped = getattr(error, "failures", None)
    inner = [e for e, _ in wrapped.values()] if isinstance(wrapped, dict) else []
    return next((e for e in inner if not isinstance(e, Exception)), None)


def _any_failed(error: BaseException | None) -> str | None:
    """Collective: the first failing rank's error as text (None when every rank succeeded)."""
    mine = None if error is None else _described(error)
    if not is_distributed():
        return mine
    import torch.distributed as dist

    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return next((f"rank {r}: {e}" for r, e in enumerate(every) if e is not None), None)


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def save_checkpoint(folder: Path, step: int, state: dict, keep: int = 2) -> Path:
    """Collective. state: {"app": {"model": sd, "optimizer": sd} (DCP), "meta": {...} (rank 0's),
    "rank_state": {...} (this rank's), "rank": int}. A write that fails on any rank (a full disk) raises
    CheckpointNotSaved on every rank, its partial files removed and the earlier checkpoints untouched;
    a save that leaves less free space than another checkpoint needs is warned about."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    folder = Path(folder)
    rank = state["rank"]
    final = folder / f"step-{step:08d}"
    tmp, error = None, None
    if rank == 0:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f".step-{step:08d}.tmp-", dir=folder)
        except OSError as e:
            error = e
    tmp = broadcast_object(tmp)
    if tmp is not None:
        tmp = Path(tmp)
        try:  # DCP agrees over the ranks on its own failures; this rank's file may fail alone
            dcp.save(state["app"], checkpoint_id=str(tmp), no_dist=not is_distributed())
            _save_file(state["rank_state"], tmp / f"rank-{rank:05d}.pt")
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - told to every rank, which all stop
            error = e
            if (interrupt := _interrupt_in(e)) is not None:  # ^C during DCP's writes (on every rank)
                if rank == 0:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise interrupt from None
        except BaseException:  # interrupted: nothing half-written stays
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    failed = _any_failed(error)  # every rank's files are on disk (or one failed) before rank 0 goes on
    if failed is None and rank == 0:
        try:
            _save_file(state["meta"], tmp / META)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except Exception as e:  # noqa: BLE001 - whatever it is, every rank must hear of it
            error = e
    failed = failed or _any_failed(error if rank == 0 else None)
    if failed is not None:
        if rank == 0 and tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        found = checkpoints(folder)
        earlier = found[-1] if found else None
        existing = next(p for p in (folder, *folder.parents) if p.is_dir())
        free = shutil.disk_usage(existing).free
        size = f"; the last one took {_folder_bytes(earlier) / 2**30:.2f} GiB" if earlier is not None else ""
        full = any(x in failed for x in ("No space left", "Disk quota", "ENOSPC", "EDQUOT"))
        fix = "once that is fixed,"
        if full:  # a save writes a whole checkpoint before it removes the oldest: room for one more is needed
            fix = (f"make room (deleting {found[0]}, the oldest kept, frees {_folder_bytes(found[0]) / 2**30:.2f} "
                   "GiB), then" if len(found) > 1 else "make room, then")
        raise CheckpointNotSaved(
            f"the checkpoint of step {step} could not be written under {folder} ({failed}); {free / 2**30:.2f} GiB "
            f"free there{size}. " + (f"The checkpoint of step {step_of(earlier)} is intact: {fix} the same command "
                                     "resumes from it" if earlier is not None else
                                     f"No earlier checkpoint: {fix} the same command starts again"))
    if rank == 0:
        for old in checkpoints(folder)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in folder.glob(".step-*.tmp-*"):  # left by a killed save
            shutil.rmtree(stale, ignore_errors=True)
        size, free = _folder_bytes(final), shutil.disk_usage(folder).free
        if free < 1.1 * size:  # the next save writes a whole checkpoint before it removes the oldest
            log.warning("%.2f GiB free under %s, and a checkpoint takes %.2f GiB: the next one (step %d + "
                        "--save_every) may not fit (%s). Make room", free / 2**30, folder, size / 2**30, step,
                        f"it is written whole before the oldest of the {keep} kept goes" if keep > 0 else
                        "--keep_checkpoints=0 keeps every one")
    barrier()
    return final


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        if _NAME.match(p.name) and (p / META).is_file():
            found.append(p)
        elif _NAME.match(p.name) and (p / "state.pt").is_file():
            raise ValueError(f"{p} holds an older single-file checkpoint (state.pt); this version resumes only DCP ones")
    return sorted(found, key=step_of)


def step_of(path: Path) -> int:
    """The step a checkpoint folder (step-00000042) was written at."""
    return int(_NAME.match(Path(path).name).group(1))


def latest(folder: Path) -> Path | None:
    found = checkpoints(Path(folder))
    return found[-1] if found else None


def _load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged pickle
        raise ValueError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e})") from None


def load_checkpoint(path: Path, app: dict, rank: int, world: int, workers: int) -> tuple[dict, dict]:
    """Fill `app` ({"model": sd, "optimizer": sd} of this rank, as get_state_dict gives them) in place
    from `path`; returns (meta, this rank's {"data", "rng"}) with the data state resharded when the
    world size or the data-loader workers per rank changed (module docstring). `workers`: data-loader
    shards per rank (>= 1)."""
    import torch.distributed.checkpoint as dcp

    meta = _load(path / META)
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        dcp.load(app, checkpoint_id=str(path), no_dist=not is_distributed())
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP wraps reader errors in several types
        raise ValueError(f"{path}: cannot load the model / optimiser shards ({type(e).__name__}: {e})") from None
    old_world = int(meta["world"])
    old_workers = max(int(meta.get("train_config", {}).get("num_workers") or 0), 1)
    if old_world == world and old_workers == workers:
        return meta, _load(path / f"rank-{rank:05d}.pt")
    old = [_load(path / f"rank-{r:05d}.pt") for r in range(old_world)]
    rng = old[rank]["rng"] if rank < old_world else None
    return meta, {"data": reshard_data_state([s["data"] for s in old], rank, world, workers), "rng": rng}


def reshard_data_state(old: list[dict], rank: int, world: int, workers: int) -> dict:
    """StreamTracker states of the old ranks -> rank's state for `world` ranks of `workers` shards.

    Each shard state (data/pipeline.py) holds the next stream index `next`, the packs waiting (`ready`,
    `buffers`), and counts. New shard s starts at base + s, base being the furthest `next`, with its share
    of the old shards' waiting packs."""
    shards = [s for state in old for s in state["shards"].values()]
    base = max((int(s["next"]) for s in shards), default=0)
    # the packs waiting in the old shards (made but not given, then open; a long document's parts can be
    # many) are dealt out over the new shards, the packs of one record's parts together (it is rebuilt,
    # and counted if it went bad, on one shard), in their order
    waiting = [(kind, pack) for kind in ("ready", "buffers") for s in shards for pack in s.get(kind, [])]
    group: dict[int, int] = {}  # record -> the group (first pack) it was dealt with
    deal: list[int] = []  # each pack's group
    for k, (_, pack) in enumerate(waiting):
        records = [e if isinstance(e, int) else e[0] for e in pack]
        deal.append(min([group[r] for r in records if r in group] + [k]))
        for r in records:
            group.setdefault(r, deal[-1])
    order = {g: n for n, g in enumerate(dict.fromkeys(deal))}  # the groups in order of appearance, dealt round-robin
    count = world * workers
    new = {}
    for shard in range(rank * workers, (rank + 1) * workers):
        mine = [(kind, pack) for (kind, pack), g in zip(waiting, deal) if order[g] % count == shard]
        new[shard] = {"next": base + shard, "ready": [p for kind, p in mine if kind == "ready"],
                      "buffers": [p for kind, p in mine if kind == "buffers"], "seen": 0, "rejected": {}}
    if rank == 0:  # the counts that the reject limit needs, carried once
        rejected: dict[str, int] = {}
        for s in shards:
            for kind, n in s["rejected"].items():
                rejected[kind] = rejected.get(kind, 0) + n
        new[0]["seen"], new[0]["rejected"] = sum(int(s["seen"]) for s in shards), rejected
    return {"shards": new, "rotation": 0}


# settings a resumed run may change: how fast and how long it trains, how it runs and logs. Any other
# change (model, data, stream seed, batch, objective, module modes) would give the checkpoint's weights
# or data position another meaning.
RESUMABLE_CHANGES = {
    "train." + k for k in ("max_steps", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2",
                           "eps", "grad_clip", "num_workers", "loss_chunk", "save_every", "keep_checkpoints",
                           "peak_tflops", "tensorboard", "export", "attn_implementation",
                           "activation_checkpointing", "compile", "dtype", "frozen_dtype", "val_every", "val_records", "hang_timeout",
                           "memory_check", "eval_tasks", "eval_every", "eval_n", "eval_batch_size", "eval_seed",
                           "best_metric", "max_skipped_steps")
} | {"data.max_reject_fraction", "data.min_records_before_abort", "val_meta"}


# settings added since runs began whose default is not what those runs did: such a run resumed without
# them is named as changed (data.long_text: a long text document was cut before parts were trained)
ADDED_SINCE = {"data.long_text": "cut"}


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def _same_file(a, b) -> bool:
    """Two paths to files of the same content (a run folder moved with its data, say)."""
    try:
        return isinstance(a, str) and isinstance(b, str) and Path(a).read_bytes() == Path(b).read_bytes()
    except OSError:
        return False


def check_resume_config(out_dir: Path, run_config: dict, step: int, main: bool) -> None:
    """Refuse to resume `out_dir` with settings that change what its checkpoint means; keep the old
    config.json as config-step{step}.json when allowed settings (lr, max_steps, ...) changed."""
    path = out_dir / "config.json"
    if not path.is_file():
        return
    old = raw = _flat(json.loads(path.read_text()))
    new = _flat(json.loads(json.dumps(run_config, default=str)))
    if "data.max_tokens" in old:  # a setting added since with another default than the behaviour before it
        old = {**ADDED_SINCE, **old}
    # any other setting the older file does not know (added since) is not a change: it kept its default then
    changed = {k: (old[k], new[k]) for k in sorted(set(old) & set(new))
               if old[k] != new[k] and not _same_file(old[k], new[k])}
    refused = {k: v for k, v in changed.items() if k not in RESUMABLE_CHANGES and not k.startswith("data_records.")
               and not (k.startswith("stage.") and k.endswith(".lr"))}
    if "qlora_base" in refused:
        base = (run_config.get("model") or {}).get("init_from") or "its base"
        raise ValueError(f"{out_dir} holds a QLoRA run at step {step} whose 4-bit base quantized otherwise than {base} "
                         "does now (the folder was re-written since, or the quantization changed): its adapters belong "
                         "to the other base. Resume with that base, or start a new --out")
    if refused:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" + (f" (not in its config.json: it ran so before the setting "
                                                      f"existed; --{k.split('.')[-1]}={a} resumes it)"
                                                      if k in ADDED_SINCE and k not in raw else "")
                           for k, (a, b) in refused.items())
        raise ValueError(f"{out_dir} holds a run at step {step} made with other settings ({listed}). Resuming with "
                         "them would change what its weights or data position mean: run it with its own settings "
                         f"(its config.json), or start a new --out (--init_from={out_dir / 'final'} for its weights)")
    for k, (a, b) in changed.items():
        if k.startswith("data_records.") and main:  # a file edited (a bad line removed, say): allowed, but said
            log.warning("dataset %r held %s records when this run started and holds %s now: the saved data position "
                        "no longer points at the same records (some will be trained twice or skipped)",
                        k.removeprefix("data_records."), a, b)
    if changed and main:
        log.warning("resuming at step %d with changed settings: %s (the previous config.json is kept as %s)", step,
                    "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()), f"config-step{step}.json")
        path.replace(out_dir / f"config-step{step}.json")
