"""Packing: samples -> packed batches within a token budget and a tile budget.

A sample (one document) is never split, so no image span is ever cut; each document keeps its own
positions (starting at 0, or V2PE's). The Batch is the model's native input: flat tokens, cu_seqlens,
float positions, next-token targets, per-token loss weights and the tiles in slot order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from nativevl.data.template import IGNORE_INDEX

LOSS_REDUCTIONS = ("token", "sample", "square")


@dataclass
class Sample:
    """One document. `labels` align with `input_ids` (IGNORE_INDEX where nothing is learnt)."""

    input_ids: np.ndarray  # (T,) int64
    labels: np.ndarray  # (T,) int64
    position_ids: np.ndarray  # (T,) float32
    pixel_values: torch.Tensor | None = None  # (tiles, 3, H, W)
    source: str = ""
    index: int = -1  # position in the global record stream
    # a preference pair: this document is the chosen response and `rejected` (input_ids, labels,
    # position_ids) the rejected one; both use this sample's tiles, which the batch holds once
    rejected: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    # per-token loss multiplier aligned with labels (None: 1 everywhere), e.g. a PRM's step-text targets
    label_weights: np.ndarray | None = None
    # a PRM's label tokens ('+' / '-'): their indices in labels (None: not a PRM conversation); the
    # `prm` objective learns them as a choice between the two label tokens
    label_slots: np.ndarray | None = None
    # which pack-sized part of its record this is (a long text document split: DataConfig.long_text)
    part: int = 0

    def __post_init__(self) -> None:
        if self.label_slots is not None and len(self.label_slots) and (
            self.label_slots.min() < 1 or self.label_slots.max() >= len(self.labels)
            or (self.labels[self.label_slots] == IGNORE_INDEX).any()
        ):
            raise ValueError(f"{self.source}: label_slots must index labelled tokens after the first")
        if self.label_weights is not None and len(self.label_weights) != len(self.labels):
            raise ValueError(f"{self.source}: label_weights ({len(self.label_weights)}) and labels ({len(self.labels)}) differ")
        docs = [(self.input_ids, self.labels, self.position_ids)] + ([self.rejected] if self.rejected else [])
        for ids, labels, positions in docs:
            if len(labels) != len(ids) or len(positions) != len(ids):
                raise ValueError(
                    f"{self.source}: input_ids, labels and position_ids lengths differ "
                    f"({len(ids)}, {len(labels)}, {len(positions)})"
                )

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids) + (len(self.rejected[0]) if self.rejected else 0)

    @property
    def num_tiles(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])

    @property
    def num_targets(self) -> int:
        """Tokens the loss sees: positions t whose next token t+1 is labelled."""
        return int((self.labels[1:] != IGNORE_INDEX).sum())


@dataclass
class Batch:
    input_ids: torch.Tensor  # (T,) int64
    cu_seqlens: torch.Tensor  # (S+1,) int32
    position_ids: torch.Tensor  # (T,) float32
    labels: torch.Tensor  # (T,) int64: the token to predict at each position, IGNORE_INDEX at document ends
    loss_weights: torch.Tensor  # (T,) float32, 0 where labels == IGNORE_INDEX
    pixel_values: torch.Tensor | None  # (N, 3, H, W) in slot order (each pair's tiles once)
    sources: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # filled by the loader: worker id, records seen / rejected, state
    # preference batches: (P, 2) document indices (chosen, rejected) per pair, and for every tile slot
    # in the text, which tile of pixel_values fills it (a pair's two documents share its tiles)
    pairs: torch.Tensor | None = None
    tile_index: torch.Tensor | None = None
    # PRM batches: (T,) bool, True where the target is a '+' / '-' label (Sample.label_slots, shifted)
    label_slots: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_tiles(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])

    @property
    def num_documents(self) -> int:
        return int(self.cu_seqlens.numel() - 1)

    def model_inputs(self) -> dict[str, torch.Tensor | None]:
        """Keyword arguments for VisionLanguageModel.forward (packed form)."""
        inputs = {
            "input_ids": self.input_ids,
            "pixel_values": self.pixel_values,
            "position_ids": self.position_ids,
            "cu_seqlens": self.cu_seqlens,
        }
        if self.tile_index is not None:
            inputs["tile_index"] = self.tile_index
        return inputs

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        pixels = move(self.pixel_values)
        if pixels is not None and dtype is not None and pixels.is_floating_point():  # uint8 tiles stay raw
            pixels = pixels.to(dtype)
        return Batch(
            move(self.input_ids), move(self.cu_seqlens), move(self.position_ids), move(self.labels),
            move(self.loss_weights), pixels, self.sources, self.indices, self.stats, move(self.pairs), move(self.tile_index),
            move(self.label_slots),
        )


def document_weight(num_targets: int, reduction: str) -> float:
    """Per-token loss weight of a document with n targets: 1 (token), 1/n (sample), n^-0.5 (square)."""
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}")
    if num_targets == 0:
        return 0.0
    return {"token": 1.0, "sample": 1.0 / num_targets, "square": num_targets**-0.5}[reduction]


def collate(samples: list[Sample], loss_reduction: str = "square") -> Batch:
    """Concatenate whole documents into one packed Batch.

    A preference sample becomes two documents, chosen then rejected; the loss weights (the SFT term
    of MPO) cover only the chosen one, while both keep their labels for the sequence log-probs.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    ids, positions, targets, weights, lengths = [], [], [], [], []
    pairs, tile_index, tiles, n_tiles, slots = [], [], [], 0, []
    any_slots = any(s.label_slots is not None for s in samples)
    for s in samples:
        w = document_weight(s.num_targets, loss_reduction)
        scale = None if s.label_weights is None else w * np.concatenate([s.label_weights[1:], [0.0]])
        docs = [(s.input_ids, s.labels, s.position_ids, w if scale is None else scale)]
        if s.rejected is not None:
            pairs.append((len(lengths), len(lengths) + 1))
            docs.append((*s.rejected, 0.0))
        own = np.arange(n_tiles, n_tiles + s.num_tiles)
        for k, (doc_ids, labels, pos, w) in enumerate(docs):
            if any_slots:
                mask = np.zeros(len(doc_ids), dtype=bool)
                if k == 0 and s.label_slots is not None:
                    mask[s.label_slots - 1] = True  # position t predicts the label at t + 1
                slots.append(mask)
            shifted = np.concatenate([labels[1:], [IGNORE_INDEX]])  # predict token t+1 at position t
            ids.append(doc_ids)
            positions.append(pos)
            targets.append(shifted)
            weights.append(np.where(shifted != IGNORE_INDEX, w, 0.0).astype(np.float32))
            lengths.append(len(doc_ids))
            tile_index.append(own)
        if s.num_tiles:
            tiles.append(s.pixel_values)
            n_tiles += s.num_tiles
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return Batch(
        input_ids=torch.from_numpy(np.concatenate(ids).astype(np.int64)),
        cu_seqlens=torch.from_numpy(cu),
        position_ids=torch.from_numpy(np.concatenate(positions).astype(np.float32)),
        labels=torch.from_numpy(np.concatenate(targets).astype(np.int64)),
        loss_weights=torch.from_numpy(np.concatenate(weights)),
        pixel_values=torch.cat(tiles) if tiles else None,
        sources=[s.source for s in samples],
        indices=[s.index for s in samples],
        pairs=torch.tensor(pairs, dtype=torch.long).reshape(-1, 2) if pairs else None,
        tile_index=torch.from_numpy(np.concatenate(tile_index).astype(np.int64)) if pairs and n_tiles else None,
        label_slots=torch.from_numpy(np.concatenate(slots)) if any_slots else None,
    )


class Packer:
    """Greedy first-fit packing into open buffers, each within `max_tokens` and `max_tiles`.

    A buffer is emitted when it is full (no room for even a short document, or the tile budget is
    reached) or, when more than `max_buffers` are open, the fullest one is emitted.
    """

    def __init__(self, max_tokens: int, max_tiles: int, max_buffers: int = 8, min_fill: float = 0.95) -> None:
        if max_tokens < 1 or max_tiles < 0:
            raise ValueError(f"packing budgets must be positive, got max_tokens={max_tokens}, max_tiles={max_tiles}")
        self.max_tokens, self.max_tiles = max_tokens, max_tiles
        self.max_buffers, self.min_fill = max_buffers, min_fill
        self.buffers: list[list[Sample]] = []

    def fits(self, sample: Sample) -> bool:
        return sample.num_tokens <= self.max_tokens and sample.num_tiles <= self.max_tiles

    def add(self, sample: Sample) -> list[list[Sample]]:
        """Add one sample; return the packs that are complete now."""
        if not self.fits(sample):
            raise ValueError(
                f"{sample.source}: {sample.num_tokens} tokens / {sample.num_tiles} tiles exceed the pack budget "
                f"({self.max_tokens} tokens, {self.max_tiles} tiles)"
            )
        for buf in self.buffers:
            if (sum(s.num_tokens for s in buf) + sample.num_tokens <= self.max_tokens
                    and sum(s.num_tiles for s in buf) + sample.num_tiles <= self.max_tiles):
                buf.append(sample)
                break
        else:
            self.buffers.append([sample])
        done = [b for b in self.buffers if self.is_full(b)]
        self.buffers = [b for b in self.buffers if not self.is_full(b)]
        while len(self.buffers) > self.max_buffers:
            fullest = max(range(len(self.buffers)), key=lambda i: sum(s.num_tokens for s in self.buffers[i]))
            done.append(self.buffers.pop(fullest))
        return done

    def is_full(self, buf: list[Sample]) -> bool:
        """Whether a pack is done: its tokens at min_fill of the budget, or its tiles at the budget."""
        tokens = sum(s.num_tokens for s in buf)
        tiles = sum(s.num_tiles for s in buf)
        return tokens >= self.min_fill * self.max_tokens or (self.max_tiles > 0 and tiles >= self.max_tiles)

    def flush(self) -> list[list[Sample]]:
        done, self.buffers = self.buffers, []
        return done
