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

    def __post_init__(self) -> None:
        n = len(self.input_ids)
        if len(self.labels) != n or len(self.position_ids) != n:
            raise ValueError(
                f"{self.source}: input_ids, labels and position_ids lengths differ "
                f"({n}, {len(self.labels)}, {len(self.position_ids)})"
            )

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

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
    pixel_values: torch.Tensor | None  # (N, 3, H, W) in slot order
    sources: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # filled by the loader: worker id, records seen / rejected, state

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
        return {
            "input_ids": self.input_ids,
            "pixel_values": self.pixel_values,
            "position_ids": self.position_ids,
            "cu_seqlens": self.cu_seqlens,
        }

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        pixels = move(self.pixel_values)
        if pixels is not None and dtype is not None and pixels.is_floating_point():  # uint8 tiles stay raw
            pixels = pixels.to(dtype)
        return Batch(
            move(self.input_ids), move(self.cu_seqlens), move(self.position_ids), move(self.labels),
            move(self.loss_weights), pixels, self.sources, self.indices, self.stats,
        )


def document_weight(num_targets: int, reduction: str) -> float:
    """Per-token loss weight of a document with n targets: 1 (token), 1/n (sample), n^-0.5 (square)."""
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}")
    if num_targets == 0:
        return 0.0
    return {"token": 1.0, "sample": 1.0 / num_targets, "square": num_targets**-0.5}[reduction]


def collate(samples: list[Sample], loss_reduction: str = "square") -> Batch:
    """Concatenate whole documents into one packed Batch."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    lengths = [s.num_tokens for s in samples]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    targets, weights = [], []
    for s in samples:
        shifted = np.concatenate([s.labels[1:], [IGNORE_INDEX]])  # predict token t+1 at position t
        targets.append(shifted)
        w = document_weight(s.num_targets, loss_reduction)
        weights.append(np.where(shifted != IGNORE_INDEX, w, 0.0).astype(np.float32))
    tiles = [s.pixel_values for s in samples if s.pixel_values is not None and s.pixel_values.shape[0]]
    return Batch(
        input_ids=torch.from_numpy(np.concatenate([s.input_ids for s in samples]).astype(np.int64)),
        cu_seqlens=torch.from_numpy(cu),
        position_ids=torch.from_numpy(np.concatenate([s.position_ids for s in samples]).astype(np.float32)),
        labels=torch.from_numpy(np.concatenate(targets).astype(np.int64)),
        loss_weights=torch.from_numpy(np.concatenate(weights)),
        pixel_values=torch.cat(tiles) if tiles else None,
        sources=[s.source for s in samples],
        indices=[s.index for s in samples],
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
        done = [b for b in self.buffers if self._full(b)]
        self.buffers = [b for b in self.buffers if not self._full(b)]
        while len(self.buffers) > self.max_buffers:
            fullest = max(range(len(self.buffers)), key=lambda i: sum(s.num_tokens for s in self.buffers[i]))
            done.append(self.buffers.pop(fullest))
        return done

    def _full(self, buf: list[Sample]) -> bool:
        tokens = sum(s.num_tokens for s in buf)
        tiles = sum(s.num_tiles for s in buf)
        return tokens >= self.min_fill * self.max_tokens or (self.max_tiles > 0 and tiles >= self.max_tiles)

    def flush(self) -> list[list[Sample]]:
        done, self.buffers = self.buffers, []
        return done
