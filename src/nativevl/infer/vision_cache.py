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
import time
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
    """A cache key for a video file known by its path, size and modification time (a long video is not read
    whole to hash it; a file written again gets another key). Take it before reading the file: a file
    rewritten while it is read then gets a key its new contents never had, never its old pixels the new
    file's key. Images, read whole anyway, are keyed by their bytes (`image_key`)."""
    stat = Path(path).stat()
    return image_key(f"{Path(path).resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode(), *settings)


def derived_key(base: str, *settings) -> str:
    """The key of one image of a source already keyed (`image_key` / `file_key` without settings): a video's
    frame k, say, without hashing the whole file once per frame."""
    return image_key(base.encode(), *settings)


class VisionCache:
    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"the vision cache's budget must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[Hashable, tuple[torch.Tensor, int]] = OrderedDict()  # key -> (features, tiles)
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
        # an entry made of another number of tiles is not this image's (a key reused for other pixels)
        found = [e[0] if (e := self._entries.get(k)) is not None and e[1] == n else None
                 for k, n in zip(keys, tiles_per_image)]
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
                self._store(keys[i], found[i], tiles_per_image[i])
        for i, key in enumerate(keys):
            if i not in missing and key in self._entries:
                self._entries.move_to_end(key)
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        return torch.cat(found), len(keys) - len(missing)

    def _store(self, key: Hashable, feats: torch.Tensor, tiles: int) -> None:
        size = feats.numel() * feats.element_size()
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)  # a key seen again with other tiles: the new features replace it
        if old is not None:
            self.bytes -= old[0].numel() * old[0].element_size()
        # a view of the batch's features would keep the whole batch alive: store its own copy
        self._entries[key] = (feats.clone(), tiles)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (gone, _) = self._entries.popitem(last=False)
            self.bytes -= gone.numel() * gone.element_size()


def prompt_embeddings(model, cache: VisionCache | None, req, start: int = 0) -> torch.Tensor:
    """The prompt's input embeddings from position `start` on (T - start, C), image features in place
    (from the vision cache for images with keys; the ViT runs on the others). Images before `start`
    are not encoded (a reused prefix holds them); one that `start` falls inside is."""
    prompt, pv = req.prompt, req.pixel_values
    keys, tiles = req.image_keys, req.tiles_per_image
    first = start
    if start and pv is not None:  # prefix reuse: only the images from the one `start` falls in or precedes
        spans = req.image_spans
        k = next((i for i, span in enumerate(spans) if span.end > start), len(spans))
        if k and spans[k - 1].key is None:
            raise RuntimeError("a reused prefix covers an unnamed image")  # prefix_cache.reusable cuts before it
        if k < len(spans):
            first = min(start, spans[k].start)
        tile0 = sum(tiles[:k]) if k else 0
        pv = pv[tile0:] if k < len(spans) else None
        keys, tiles = (keys[k:], tiles[k:]) if keys is not None and k < len(spans) else (None, None)
    ids = torch.tensor(prompt[first:], device=model.device)
    pv = pv.to(model.device) if pv is not None else None
    tv = time.perf_counter()
    if pv is not None and keys and cache is not None:
        feats, req.timings["images_cached"] = cache.features(keys, tiles, pv, model.encode_images)
        embeds = model.embed(ids, None, image_features=feats)  # the ViT runs on the others
    else:
        embeds = model.embed(ids, pv)  # (T, C); the ViT runs here
    if pv is not None and pv.device.type == "cuda":
        torch.cuda.synchronize(pv.device)  # the ViT's time, for the timing log
    req.timings["vision_s"] = time.perf_counter() - tv if pv is not None else 0.0
    return embeds[start - first:]
