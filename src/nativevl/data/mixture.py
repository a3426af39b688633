"""Weighted, seeded, random-access mixing of datasets into one endless record stream.

Item i of the stream is a pure function of (seed, sizes, weights, i): block b of the stream draws
its dataset choices from rng(seed, b), and dataset d's records are visited in a fresh permutation
rng(seed, d, epoch) every epoch. So any rank / worker can start anywhere (resume) without replaying
what came before, and all of them agree on the stream whatever their number.

A finite set (validation, calibration) is read with `Enumeration` instead: every record of every
dataset once, in one seeded order, so that the set measured is the set named.
"""

from __future__ import annotations

import numpy as np

_PERM_SALT = 1_000_003
_ENUM_SALT = 2_000_003


def mixture_weights(
    sizes: list[int],
    repeat_times: list[float],
    is_text: list[bool] | None = None,
    text_ratio: float | None = None,
) -> list[float]:
    """InternVL's default weights (size x repeat_time); with `text_ratio` (e.g. 0.25 for text:multimodal
    = 1:3) the text-only datasets together get that share of the samples, split by their default weights."""
    base = np.array([n * r for n, r in zip(sizes, repeat_times)], dtype=np.float64)
    if text_ratio is None:
        return (base / base.sum()).tolist()
    if not 0 <= text_ratio <= 1:
        raise ValueError(f"text_ratio must be in [0, 1], got {text_ratio}")
    assert is_text is not None and len(is_text) == len(sizes)
    text = np.array(is_text)
    if text_ratio > 0 and not text.any():
        raise ValueError(f"text_ratio {text_ratio} asks for text-only data but every dataset is multimodal")
    if text_ratio < 1 and text.all():
        raise ValueError(f"text_ratio {text_ratio} asks for multimodal data but every dataset is text-only")
    w = np.zeros_like(base)
    if text.any():
        w[text] = text_ratio * base[text] / base[text].sum()
    if (~text).any():
        w[~text] = (1 - text_ratio) * base[~text] / base[~text].sum()
    return w.tolist()


def sample_share_for_token_share(token_share: float, text_tokens: float, multimodal_tokens: float) -> float:
    """The share of text-only samples that gives text `token_share` of the tokens, when a text-only
    sample holds `text_tokens` tokens on average and a multimodal one `multimodal_tokens`."""
    if not 0 <= token_share <= 1:
        raise ValueError(f"text_ratio must be in [0, 1], got {token_share}")
    if token_share in (0, 1):
        return float(token_share)
    if text_tokens <= 0 or multimodal_tokens <= 0:
        raise ValueError(f"mean tokens per sample must be > 0, got {text_tokens} and {multimodal_tokens}")
    text, mm = token_share * multimodal_tokens, (1 - token_share) * text_tokens
    return text / (text + mm)


def _check_sizes(sizes: list[int]) -> None:
    if not sizes:
        raise ValueError("no datasets given")
    if any(n <= 0 for n in sizes):
        raise ValueError(f"every dataset needs at least one record, got sizes {sizes}")


class Enumeration:
    """Every record of every dataset once, in one order drawn from `seed` (no weights): its first
    `total` items are all the records, and its first k < total a uniform sample without replacement.
    Item total + j starts another pass, in a fresh order."""

    def __init__(self, sizes: list[int], seed: int = 0) -> None:
        _check_sizes(sizes)
        self.sizes, self.seed = list(sizes), seed
        self.starts = np.cumsum([0, *sizes])
        self.total = int(self.starts[-1])
        self._order: dict[int, np.ndarray] = {}

    def locate(self, i: int) -> tuple[int, int]:
        """(dataset, record index) of stream item i."""
        rounds, j = divmod(i, self.total)
        if rounds not in self._order:
            self._order = {rounds: np.random.default_rng([self.seed, _ENUM_SALT, rounds]).permutation(self.total)}
        k = int(self._order[rounds][j])
        d = int(np.searchsorted(self.starts, k, side="right")) - 1
        return d, k - int(self.starts[d])


class Mixture:
    def __init__(self, sizes: list[int], weights: list[float], seed: int = 0, block: int = 4096) -> None:
        if len(sizes) != len(weights) or not sizes:
            raise ValueError(f"need one weight per dataset, got {len(sizes)} sizes and {len(weights)} weights")
        _check_sizes(sizes)
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {weights}")
        self.sizes, self.probs, self.seed, self.block = list(sizes), w / w.sum(), seed, block
        self._blocks: dict[int, np.ndarray] = {}
        self._before: dict[int, np.ndarray] = {0: np.zeros(len(sizes), dtype=np.int64)}  # per-dataset counts before block b
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _choices(self, b: int) -> np.ndarray:
        if b not in self._blocks:
            rng = np.random.default_rng([self.seed, b])
            self._blocks = {b: rng.choice(len(self.sizes), size=self.block, p=self.probs)}  # keep one block cached
        return self._blocks[b]

    def _counts_before(self, b: int) -> np.ndarray:
        known = max(k for k in self._before if k <= b)
        counts = self._before[known].copy()
        for k in range(known, b):
            counts += np.bincount(self._choices(k), minlength=len(self.sizes))
        self._before = {0: self._before[0], b: counts}
        return counts

    def _record(self, dataset: int, position: int) -> int:
        n = self.sizes[dataset]
        epoch, offset = divmod(position, n)
        key = (dataset, epoch)
        if key not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k[0] != dataset}
            self._perms[key] = np.random.default_rng([self.seed, _PERM_SALT, dataset, epoch]).permutation(n)
        return int(self._perms[key][offset])

    def locate(self, i: int) -> tuple[int, int]:
        """(dataset, record index) of stream item i."""
        b, j = divmod(i, self.block)
        choices = self._choices(b)
        d = int(choices[j])
        position = int(self._counts_before(b)[d] + (choices[:j] == d).sum())
        return d, self._record(d, position)
