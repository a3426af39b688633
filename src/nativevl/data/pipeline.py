"""From dataset records to packed batches: the data side of every training stage.

records (meta json) -> Mixture (seeded, weighted) -> Samples (samples.py: tiles, chat template,
positions) -> Packer (token + tile budget) -> Batch, in DataLoader worker processes.

Every record's randomness (JPEG quality, V2PE strides, video frames) comes from its (seed, index),
so a record is processed the same way wherever and whenever it is processed; that and the
random-access mixture make the stream resumable from a small state. Bad records are skipped,
counted by kind and written to a rejects file; `StreamTracker` stops the run past a limit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nativevl.data.mixture import Enumeration, Mixture, mixture_weights, sample_share_for_token_share
from nativevl.data.packing import LOSS_REDUCTIONS, Batch, Packer, Sample, collate
from nativevl.data.records import PROBLEMS, Annotation, DatasetSpec, PreferenceRecord, Record, RecordError, parse_record
from nativevl.data.samples import build_sample, build_samples, load_visuals, record_rng  # noqa: F401 (re-exported)
from nativevl.data.template import DEFAULT_SYSTEM_MESSAGE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataConfig:
    max_tokens: int = 16384  # token budget of one pack
    max_tiles: int = 48  # tile budget of one pack
    max_buffers: int = 8
    image_size: int = 448
    image_seq_length: int = 256
    image_token_id: int = 151667
    v2pe: str = "off"  # off | random (training) | fixed (v2pe_delta)
    v2pe_delta: float = 1.0
    loss_reduction: str = "square"
    # text-only data's share of the mixture (0.25 = text : multimodal 1 : 3), in tokens (the InternVL3
    # recipe's unit: ~50B text + 150B multimodal tokens) or in samples; for tokens the mean tokens per
    # sample of every dataset are measured on a few of its records when the stream is built
    text_ratio: float | None = None
    text_ratio_unit: str = "tokens"  # tokens | samples
    # a text-only document longer than a pack: "split" into pack-sized parts, each its own document
    # (positions from 0; consecutive parts share one token, so every token but the first is a target
    # once), or "cut" to its first max_tokens tokens (the rest dropped)
    long_text: str = "split"
    max_reject_fraction: float = 0.05
    min_records_before_abort: int = 200
    system_message: str | None = DEFAULT_SYSTEM_MESSAGE
    min_frames: int = 8
    max_frames: int = 32
    training: bool = True  # random augmentation / V2PE strides / frame choice
    uint8_pixels: bool = False  # raw tiles; the model normalises them on its device (4x less to move)
    seed: int = 0
    max_records: int | None = None  # stop the stream after this many records (None: endless)
    # a finite set (validation, calibration): every record of the datasets once, in a seeded order
    # (mixture.Enumeration: no weights, no text_ratio), the stream ending after all (or max_records) of them
    read_once: bool = False
    # PRM training: each assistant turn's label token ('+' / '-') is shown in the input as this token,
    # as at scoring time (every slot '+'), while the target keeps the true label. Otherwise the model
    # learns to copy the previous turn's label instead of reading the step.
    prm_placeholder: str | None = None
    # PRM training: also learn the text of every step that is right so far (its own label and all
    # before it '+'), each token at this weight (a label token weighs 1; 0: labels only). It keeps the
    # policy's computation of the next step alive inside the PRM's conversation, which a small PRM
    # needs to check the step (docs/results/alignment.md).
    prm_step_lm: float = 0.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.prm_step_lm) or self.prm_step_lm < 0:
            raise ValueError(f"prm_step_lm must be a finite number >= 0, got {self.prm_step_lm}")
        if self.prm_step_lm and self.prm_placeholder is None:
            raise ValueError("prm_step_lm applies to PRM training: set prm_placeholder too")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {self.loss_reduction!r}")
        if self.v2pe not in ("off", "random", "fixed"):
            raise ValueError(f"v2pe must be off, random or fixed, got {self.v2pe!r}")
        if self.max_tokens < 2:
            raise ValueError(f"max_tokens (a pack's tokens) must be >= 2, got {self.max_tokens}")
        if self.long_text not in ("split", "cut"):
            raise ValueError(f"long_text must be split or cut, got {self.long_text!r}")
        if self.text_ratio_unit not in ("tokens", "samples"):
            raise ValueError(f"text_ratio_unit must be tokens or samples, got {self.text_ratio_unit!r}")
        if not (math.isfinite(self.v2pe_delta) and 0 < self.v2pe_delta <= 1):
            raise ValueError(f"v2pe_delta (a visual token's position increment) must be in (0, 1], got {self.v2pe_delta}")
        if not 0 <= self.max_reject_fraction <= 1:
            raise ValueError(f"max_reject_fraction must be in [0, 1], got {self.max_reject_fraction}")

    def for_model(self, model_config) -> DataConfig:
        """This config with a model's tile size, visual tokens per tile and <IMG_CONTEXT> id (a ModelConfig,
        as `load_model(...).config` or `io.hf.read_config(folder)[0]` give it)."""
        return dataclasses.replace(self, image_size=model_config.vision.image_size,
                                   image_seq_length=model_config.image_seq_length,
                                   image_token_id=model_config.image_token_id)


class Source(Protocol):
    """Where records come from: a dataset file, or a generator such as the toy world."""

    name: str
    repeat_time: float

    def __len__(self) -> int: ...

    def get(self, i: int) -> Record | PreferenceRecord:
        """Record i, or RecordError."""

    def is_text_only(self) -> bool: ...


class FileSource:
    """A dataset of the meta json: its annotation file, parsed record by record."""

    def __init__(self, spec: DatasetSpec) -> None:
        self.spec, self.name, self.repeat_time = spec, spec.name, spec.repeat_time
        self.annotation = Annotation(spec)

    def __len__(self) -> int:
        return len(self.annotation)

    def get(self, i: int) -> Record | PreferenceRecord:
        lineno, raw = self.annotation[i]
        return parse_record(raw, self.spec, f"{self.name}:{self.spec.annotation.name}:{lineno}")

    def is_text_only(self) -> bool:
        return self.annotation.is_text_only()


def _written_rejects(folder: Path) -> set[int]:
    """Stream indices already in a run's rejects files (every rank's and worker's: a resume may reshard)."""
    out = set()
    for path in folder.glob("rejects-rank*-worker*.jsonl"):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                out.add(int(json.loads(line)["index"]))
            except (ValueError, KeyError, TypeError):  # a line cut short by a crash
                continue
    return out


class TooManyBadRecords(RuntimeError):
    """The stream's rejected fraction passed DataConfig.max_reject_fraction."""


def mean_tokens(source: Source, tokenizer, cfg: DataConfig, probes: int = 32) -> float:
    """A dataset's mean tokens per sample (a preference pair: both responses), measured on up to `probes`
    of its records spread over it; unreadable ones are passed over (the stream counts them later)."""
    n = len(source)
    picks = sorted({int(i) for i in np.linspace(0, n - 1, num=min(probes, n))})
    probe_cfg = dataclasses.replace(cfg, training=False)
    counts, first_error = [], None
    for i in picks:
        try:
            counts.append(sum(s.num_tokens for s in build_samples(source.get(i), tokenizer, probe_cfg, index=i)))
        except (RecordError, OSError, RecursionError, TypeError, KeyError, AttributeError) as e:
            first_error = first_error or f"record {i}: {e}"
            continue
    if not counts:
        raise ValueError(f"dataset {source.name!r}: none of the {len(picks)} records probed for their token count "
                         f"could be read (text_ratio in tokens needs them), the first: {first_error}. Records the "
                         "loader reads but this config cannot (a model's tile size or visual tokens per tile other "
                         "than the config's: DataConfig.for_model) are told apart by `nativevl data validate "
                         "--tokenizer`")
    return float(np.mean(counts))


class PackedDataset(IterableDataset):
    """Endless (or `max_records`-long) stream of packed Batches for one data-parallel rank.

    Stream item i goes to shard i % (world_size * workers); each shard packs its own records.
    `state_dict()` / `load_state_dict()` hold, per shard, the next stream index and the records of the
    packs made but not yet given (`ready`: one record can complete several) and of the open ones
    (`buffers`); every Batch carries its shard's state after it was made.
    """

    def __init__(
        self,
        sources: list[DatasetSpec | Source],
        tokenizer,
        cfg: DataConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        rejects_dir: str | Path | None = None,
        weights: list[float] | None = None,
    ) -> None:
        super().__init__()
        if not sources:
            raise ValueError("no datasets given")
        self.sources = [FileSource(s) if isinstance(s, DatasetSpec) else s for s in sources]
        self.tokenizer, self.cfg = tokenizer, cfg
        self.rank, self.world_size = rank, world_size
        self.rejects_dir = Path(rejects_dir) if rejects_dir is not None else None
        sizes = [len(src) for src in self.sources]
        empty = [src.name for src, n in zip(self.sources, sizes) if n == 0]
        if empty:
            raise ValueError(f"dataset(s) {empty} hold no records")
        if weights is not None and cfg.text_ratio is not None:
            raise ValueError(f"explicit mixture weights would override DataConfig.text_ratio={cfg.text_ratio}; "
                             "give one of the two")
        if cfg.read_once and (weights is not None or cfg.text_ratio is not None):
            raise ValueError("DataConfig.read_once reads every record once: mixture weights and text_ratio do not apply")
        if cfg.read_once:
            self.mixture = Enumeration(sizes, seed=cfg.seed)
        else:
            self.mixture = Mixture(sizes, weights if weights is not None else self._default_weights(sizes), seed=cfg.seed)
        self.resume_states: dict[int, dict] = {}
        self.rotation = 0

    def _default_weights(self, sizes: list[int]) -> list[float]:
        """InternVL's size x repeat_time sample shares, with DataConfig.text_ratio (of the samples, or of
        the tokens) given to the text-only datasets."""
        cfg, tokenizer = self.cfg, self.tokenizer
        repeats = [src.repeat_time for src in self.sources]
        is_text = [src.is_text_only() for src in self.sources] if cfg.text_ratio is not None else None
        share = cfg.text_ratio
        if share is not None and cfg.text_ratio_unit == "tokens" and 0 < share < 1 and all(
                is_text.count(v) for v in (True, False)):
            # within each group the datasets keep their default (size x repeat) sample shares
            base = mixture_weights(sizes, repeats)
            means = [mean_tokens(src, tokenizer, cfg) for src in self.sources]

            def group(text: bool) -> float:  # mean tokens per sample of one group, as it is sampled
                pairs = [(w, m) for w, m, t in zip(base, means, is_text) if t == text]
                return sum(w * m for w, m in pairs) / sum(w for w, _ in pairs)

            text_tokens, mm_tokens = group(True), group(False)
            share = sample_share_for_token_share(cfg.text_ratio, text_tokens, mm_tokens)
            log.info("text_ratio %.3f of the tokens: %.1f tokens per text-only sample, %.1f per multimodal one "
                     "-> %.3f of the samples", cfg.text_ratio, text_tokens, mm_tokens, share)
        return mixture_weights(sizes, repeats, is_text, share)

    def load_state_dict(self, state: dict) -> None:
        """Resume from `StreamTracker.state_dict()`: per-shard states and which shard comes next."""
        self.resume_states = {int(k): v for k, v in state["shards"].items()}
        self.rotation = int(state["rotation"])

    def record(self, i: int) -> Record | PreferenceRecord:
        d, r = self.mixture.locate(i)
        return self.sources[d].get(r)

    def sample(self, i: int) -> Sample:
        """Stream item i's first Sample (a long text's first part; `samples` gives every part)."""
        return self.samples(i)[0]

    def samples(self, i: int) -> list[Sample]:
        """Stream item i as its Samples (build_samples); anything wrong with the record becomes a RecordError."""
        try:
            return build_samples(self.record(i), self.tokenizer, self.cfg, index=i)
        except RecordError:
            raise
        except (OSError, RecursionError, TypeError, KeyError, AttributeError) as e:
            # a record the format checks did not foresee: counted and skipped like any bad record
            raise RecordError("malformed", f"stream item {i}: {type(e).__name__}: {e}") from None

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        # The DataLoader polls its workers round-robin from worker 0; after a resume, worker 0 takes the
        # shard whose batch was due next, so the batch order continues exactly.
        local = (worker + self.rotation) % n_workers
        shard, n_shards = self.rank * n_workers + local, self.world_size * n_workers
        state = self.resume_states.get(shard, {"next": shard, "buffers": [], "seen": 0, "rejected": {}})
        packer = Packer(self.cfg.max_tokens, self.cfg.max_tiles, self.cfg.max_buffers)
        seen, rejected = state["seen"], dict(state["rejected"])
        stop = self.cfg.max_records
        if self.cfg.read_once:
            stop = self.mixture.total if stop is None else min(stop, self.mixture.total)
        # the packs complete at the checkpoint but not yet consumed (due first) and the open ones
        ready, packer.buffers = self._rebuild(state.get("ready", []), state["buffers"], rejected)
        if "ready" not in state and packer.buffers:  # an older checkpoint's: its open packs, then its made ones
            made = min([k for k, buf in enumerate(packer.buffers) if packer.is_full(buf)] + [self.cfg.max_buffers])
            if stop is not None and state["next"] >= stop:
                made = 0  # the stream had ended: every pack was made (flushed)
            ready, packer.buffers = packer.buffers[made:], packer.buffers[:made]
        rejects, written = None, set()
        if self.rejects_dir is not None:
            self.rejects_dir.mkdir(parents=True, exist_ok=True)
            if self.resume_states:  # records read ahead of the checkpoint were written before: once is enough
                written = _written_rejects(self.rejects_dir)
            rejects = open(self.rejects_dir / f"rejects-rank{self.rank}-worker{worker}.jsonl", "a", encoding="utf-8")
        since_batch = 0  # records read since this shard last made a batch
        try:
            i = state["next"]
            for j, pack in enumerate(ready):
                yield self._batch(pack, shard, (local, n_workers), i, packer.buffers, ready[j + 1:], seen, rejected)
            while stop is None or i < stop:
                seen += 1
                since_batch += 1
                try:
                    done = [pack for sample in self.samples(i) for pack in packer.add(sample)]
                except RecordError as e:
                    rejected[e.kind] = rejected.get(e.kind, 0) + 1
                    log.debug("skipped record %d (%s): %s", i, e.kind, e)
                    if rejects is not None and i not in written:
                        rejects.write(json.dumps({"index": i, "kind": e.kind, "message": str(e)}) + "\n")
                        rejects.flush()
                    done = []
                    # StreamTracker checks the limit per consumed batch; a shard whose records are (nearly)
                    # all bad makes no batch, so it checks here rather than read the stream forever
                    if since_batch >= self.cfg.min_records_before_abort:
                        n_bad = sum(rejected.values())
                        if n_bad / seen > self.cfg.max_reject_fraction:
                            raise TooManyBadRecords(
                                f"data: {n_bad} of {seen} records rejected ({n_bad / seen:.1%}) in shard {shard}, "
                                f"the last {since_batch} records without a batch; over the limit of "
                                f"{self.cfg.max_reject_fraction:.1%}; by kind: {dict(rejected)}. "
                                "See the rejects files for each record."
                            )
                i += n_shards
                if done:
                    since_batch = 0
                for j, pack in enumerate(done):  # one record may complete several packs (a long text's parts)
                    yield self._batch(pack, shard, (local, n_workers), i, packer.buffers, done[j + 1:], seen, rejected)
            rest = packer.flush()
            for j, pack in enumerate(rest):
                yield self._batch(pack, shard, (local, n_workers), i, [], rest[j + 1:], seen, rejected)
        finally:
            if rejects is not None:
                rejects.close()

    def _rebuild(self, ready: list, buffers: list, rejected: dict) -> tuple[list[list[Sample]], list[list[Sample]]]:
        """The packs of a checkpoint's shard state (entries: a stream index, or [index, part] for a long text's
        part), each waiting record built once; one that went bad since is counted once and left out."""
        built: dict[int, list[Sample] | None] = {}

        def sample(entry) -> Sample | None:
            i, part = (entry, 0) if isinstance(entry, int) else entry
            if i not in built:
                try:
                    built[i] = self.samples(i)
                except RecordError as e:
                    built[i] = None
                    rejected[e.kind] = rejected.get(e.kind, 0) + 1
                    log.warning("record %d waiting in a pack at the checkpoint is now bad (%s): %s", i, e.kind, e)
            if built[i] is not None and part >= len(built[i]):  # the record changed since (a line edited)
                log.warning("record %d waiting in a pack at the checkpoint has no part %d now", i, part)
            return built[i][part] if built[i] is not None and part < len(built[i]) else None

        packs = [[[x for x in map(sample, buf) if x is not None] for buf in group] for group in (ready, buffers)]
        return [[buf for buf in group if buf] for group in packs]

    def _batch(
        self, pack: list[Sample], shard: int, slot: tuple[int, int], nxt: int, open_packs: list[list[Sample]],
        ready: list[list[Sample]], seen: int, rejected: dict,
    ) -> Batch:
        """A Batch carrying its shard's state as it is once this batch has been consumed: the next stream
        index, the packs complete but not yet given (`ready`, due first) and the open ones."""
        batch = collate(pack, self.cfg.loss_reduction)
        batch.stats = {
            "shard": shard,
            "local_shard": slot[0],
            "workers": slot[1],
            "seen": seen,
            "rejected": dict(rejected),
            "state": {
                "next": nxt,
                "buffers": _entries(open_packs),
                "ready": _entries(ready),
                "seen": seen,
                "rejected": dict(rejected),
            },
        }
        return batch


def _entries(packs: list[list[Sample]]) -> list[list]:
    """Packs as a checkpoint keeps them: each sample's stream index, [index, part] for a long text's part."""
    return [[s.index if not s.part else [s.index, s.part] for s in pack] for pack in packs]


class StreamTracker:
    """Follows the consumed batches of one rank: sums the per-shard record counts, aborts once the
    rejected fraction passes the limit, and keeps the state a checkpoint needs to resume exactly."""

    def __init__(self, max_fraction: float, min_records: int = 200) -> None:
        self.max_fraction, self.min_records = max_fraction, min_records
        self.shards: dict[int, dict] = {}
        self.states: dict[int, dict] = {}
        self.rotation = 0

    def state_dict(self) -> dict:
        """JSON-able; give it to PackedDataset.load_state_dict (and this tracker's load_state_dict) to
        continue after the last consumed batch."""
        return {"shards": dict(self.states), "rotation": self.rotation}

    def load_state_dict(self, state: dict) -> None:
        """Carry a resumed run's shard states and counts forward, so that a shard that makes no batch
        after the resume (e.g. one that has run out) is still in the next checkpoint."""
        self.states = {int(k): v for k, v in state["shards"].items()}
        self.shards = {k: {"seen": v["seen"], "rejected": dict(v["rejected"])} for k, v in self.states.items()}
        self.rotation = int(state["rotation"])

    def update(self, batch: Batch) -> None:
        stats = batch.stats
        self.shards[stats["shard"]] = {"seen": stats["seen"], "rejected": stats["rejected"]}
        self.states[stats["shard"]] = stats["state"]
        self.rotation = (stats["local_shard"] + 1) % stats["workers"]
        if self.seen >= self.min_records and self.fraction > self.max_fraction:
            raise TooManyBadRecords(
                f"data: {self.total_rejected} of {self.seen} records rejected ({self.fraction:.1%}), over the limit "
                f"of {self.max_fraction:.1%}; by kind: {self.by_kind}. See the rejects files for each record."
            )

    @property
    def seen(self) -> int:
        return sum(s["seen"] for s in self.shards.values())

    @property
    def by_kind(self) -> dict[str, int]:
        out = {k: 0 for k in PROBLEMS}
        for s in self.shards.values():
            for k, n in s["rejected"].items():
                out[k] += n
        return {k: n for k, n in out.items() if n}

    @property
    def total_rejected(self) -> int:
        return sum(self.by_kind.values())

    @property
    def fraction(self) -> float:
        return self.total_rejected / max(1, self.seen)


def _identity(batch: Batch) -> Batch:
    return batch


def make_loader(dataset: PackedDataset, num_workers: int = 0) -> DataLoader:
    """A DataLoader over packed batches (each item is already a Batch). It draws its base seed from its
    own generator, not the global RNG: a resumed run restores the global RNG and then makes its
    iterator, and a draw there would shift every dropout / drop-path mask after the resume."""
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_identity,
        persistent_workers=False,
        prefetch_factor=2 if num_workers else None,
        generator=torch.Generator().manual_seed(dataset.cfg.seed),
    )


def iterate_batches(loader: DataLoader, tracker: StreamTracker) -> Iterator[Batch]:
    """Batches from a loader, with the reject limit enforced and counts kept in `tracker`."""
    for batch in loader:
        tracker.update(batch)
        yield batch


def read_all(dataset: PackedDataset, label: str) -> list[Batch]:
    """Every pack of a finite dataset (a validation or calibration set) in this process, read once, bad
    records counted and skipped (logged under `label`) as in training."""
    tracker = StreamTracker(dataset.cfg.max_reject_fraction, dataset.cfg.min_records_before_abort)
    batches = list(iterate_batches(make_loader(dataset, 0), tracker))
    if tracker.total_rejected:
        log.warning("%s: %d record(s) skipped (%s)", label, tracker.total_rejected, tracker.by_kind)
    return batches
