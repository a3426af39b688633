"""The engine's cache of image features: what the ViT and projector made of an image, kept by a key the caller
gives (a hash of the image's bytes and how it was tiled), so that a conversation's later turns, questions
about an image already asked, and an n-sample request's samples do not run the ViT on it again.

For InternVL3-1B the ViT is most of a prefill's compute (13 tiles: about 9 of its 12 TFLOPs), so a follow-up
turn about the same picture gets its first token several times sooner. Features are kept on the model's
device, least recently used first out, within a byte budget; changing the model's weights must clear it
(`Engine.refresh_weights` does).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path

import torch


def image_key(data: bytes, *settings) -> str:
    """A cache key for an image: a hash of its file's bytes and of everything that decides its tiles
    (tile size, tile budget, ...)."""
    h = hashlib.blake2b(data, digest_size=16)
    h.update(repr(settings).encode())
    return h.hexdigest()


def file_key(path: str | Path, *settings) -> str:
    """A cache key for an image or video file known by its path, size and modification time (a long video is
    not read whole to hash it; a file written again gets another key)."""
    stat = Path(path).stat()
    return image_key(f"{Path(path).resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode(), *settings)


class VisionCache:
    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"the vision cache's budget must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def features(self, keys: list[Hashable], tiles_per_image: list[int], pixel_values: torch.Tensor,
                 encode: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(every image's features in order, (sum tiles x tokens per tile, C); how many images were cached).
        The images not cached run through `encode` together, in one call on their tiles."""
        if len(keys) != len(tiles_per_image) or sum(tiles_per_image) != pixel_values.shape[0]:
            raise ValueError(f"{len(keys)} image keys and tiles per image {tiles_per_image} do not match "
                             f"{pixel_values.shape[0]} tiles")
        starts = [sum(tiles_per_image[:i]) for i in range(len(keys))]
        found = [self._entries.get(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            tiles = torch.cat([pixel_values[starts[i]: starts[i] + tiles_per_image[i]] for i in missing])
            new = encode(tiles)
            per_tile = new.shape[0] // tiles.shape[0]
            at = 0
            for i in missing:
                rows = tiles_per_image[i] * per_tile
                found[i] = new[at: at + rows]
                at += rows
                self._store(keys[i], found[i])
        for i, key in enumerate(keys):
            if i not in missing and key in self._entries:
                self._entries.move_to_end(key)
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        return torch.cat(found), len(keys) - len(missing)

    def _store(self, key: Hashable, feats: torch.Tensor) -> None:
        size = feats.numel() * feats.element_size()
        if size > self.max_bytes or key in self._entries:
            return
        # a view of the batch's features would keep the whole batch alive: store its own copy
        self._entries[key] = feats.clone()
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
