"""Prefix reuse: a finished sequence's slot keeps its keys and values for the next request that starts
with the same tokens (the next turn of a conversation, a question asked again about the same picture).

When a sequence finishes, the engine records in its slot the tokens whose keys the slot holds (the
prompt and the generated tokens fed back) and where the prompt's images are, with their keys
(`vision_cache.image_key`, a hash of the pixels' source and their tiling). A new prompt is matched
against the free slots' records: the longest common token prefix, cut at the first image whose key
differs or is unknown (an image's tokens are the same placeholder ids whatever the picture), and at
one token before the prompt's end (its logits give the first new token). A match of at least
`min_tokens` tokens takes that slot, and only the rest of the prompt is prefilled on top of it.

A slot given to another request loses its record; slots with records are taken last when a free
slot without one is within the running batch's bucket (so that keeping records does not widen the
running requests' decode steps), or anywhere when nothing runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence


@dataclasses.dataclass(frozen=True)
class ImageSpan:
    """An image's tokens [start, end) in a prompt; key None: the pixels have no name (never reused)."""

    start: int
    end: int
    key: Hashable | None


def image_spans(prompt: Sequence[int], image_token_id: int, tokens_per_tile: int,
                tiles_per_image: Sequence[int] | None, keys: Sequence[Hashable] | None) -> list[ImageSpan]:
    """Each image's span of `image_token_id` tokens, in order. Without keys (or when the counts do not
    add up), one unnamed span from the first image token to the last: nothing from there on is reused."""
    at = [i for i, t in enumerate(prompt) if t == image_token_id]
    if not at:
        return []
    unnamed = [ImageSpan(at[0], at[-1] + 1, None)]
    if keys is None or tiles_per_image is None or len(keys) != len(tiles_per_image):
        return unnamed
    spans, seen = [], 0
    for tiles, key in zip(tiles_per_image, keys):
        count = tiles * tokens_per_tile
        if count < 1 or seen + count > len(at):
            return unnamed
        spans.append(ImageSpan(at[seen], at[seen + count - 1] + 1, key))
        seen += count
    return spans if seen == len(at) else unnamed


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists (slice comparisons, bisected)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclasses.dataclass
class _Record:
    tokens: list[int]  # the tokens whose keys/values the slot holds, from position 0
    spans: list[ImageSpan]
    used: int  # when it was recorded (a counter): the oldest goes first


class PrefixCache:
    def __init__(self, slots: int, min_tokens: int) -> None:
        if min_tokens < 1:
            raise ValueError(f"prefix_min_tokens must be >= 1, got {min_tokens}")
        self.min_tokens = min_tokens
        self._records: list[_Record | None] = [None] * slots
        self._clock = 0

    def __len__(self) -> int:
        return sum(r is not None for r in self._records)

    def record(self, slot: int, tokens: list[int], spans: list[ImageSpan]) -> None:
        """Slot `slot` holds the keys/values of `tokens` (positions 0..len-1), whose images are `spans`."""
        self._clock += 1
        self._records[slot] = _Record(tokens, [s for s in spans if s.end <= len(tokens)], self._clock)

    def drop(self, slot: int) -> None:
        self._records[slot] = None

    def clear(self) -> None:
        self._records = [None] * len(self._records)

    def reusable(self, prompt: list[int], spans: list[ImageSpan], record: _Record) -> int:
        """How many of the prompt's first tokens the record's keys/values serve."""
        n = min(common_prefix(prompt, record.tokens), len(prompt) - 1)
        for i, span in enumerate(spans):
            if span.start >= n:
                break
            other = record.spans[i] if i < len(record.spans) else None
            if span.key is None or other is None or (other.start, other.end, other.key) != (span.start, span.end, span.key):
                return span.start
        return n

    def match(self, prompt: list[int], spans: list[ImageSpan], free: list[int]) -> tuple[int, int] | None:
        """(slot, tokens reused) of the free slot that serves the longest prefix of at least min_tokens, or
        None. The slot's record is dropped: the caller writes into it."""
        best = None
        for slot in free:
            record = self._records[slot]
            n = self.reusable(prompt, spans, record) if record is not None else 0
            if n >= self.min_tokens and (best is None or n > best[1]):
                best = (slot, n)
        if best is not None:
            self.drop(best[0])
        return best

    def take(self, free: list[int], bucket: int) -> int:
        """A free slot for a prompt that reuses nothing; its record is dropped. Below `bucket` (the running
        batch's width, which the slot then does not widen): the lowest without a record, else the one
        recorded longest ago; past it, the lowest (the narrowest widening)."""
        below = [s for s in free if s < bucket]
        if below:
            bare = [s for s in below if self._records[s] is None]
            slot = bare[0] if bare else min(below, key=lambda s: self._records[s].used)
        else:
            slot = min(free)
        self.drop(slot)
        return slot


def choose_slots(slots: list, count: int, claimed: set[int], prefixes: PrefixCache | None,
                 bucket: Callable[[int], int]) -> list[int]:
    """`count` free slots (entries None in `slots`, none of `claimed`) for a prompt that reuses nothing: the
    lowest first; with `prefixes`, slots holding a record are taken last while that does not widen the
    running batch (`bucket(n)`: the decode call's width for slots [0, n)), and on an idle engine last
    of all."""
    out: list[int] = []
    for _ in range(count):
        free = [i for i, s in enumerate(slots) if s is None and i not in claimed and i not in out]
        if prefixes is None:
            out.append(free[0])
            continue
        busy = [i for i, s in enumerate(slots) if s is not None] + [*claimed, *out]
        # idle: any bare slot before a record goes (only the new prompt's own steps are wider)
        out.append(prefixes.take(free, bucket(max(busy) + 1) if busy else len(slots)))
    return out
