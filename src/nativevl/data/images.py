"""Image and video loading and InternVL's dynamic high-resolution tiling.

An image becomes 1..max_num tiles of image_size^2 on the grid whose aspect ratio is closest to the
image's (ties go to the larger grid when the image has enough pixels), plus a thumbnail of the
whole image last when there is more than one tile; bicubic resizing, ImageNet normalisation.
Training data marked for augmentation re-encodes every tile as JPEG at a random quality 75-100.
A video becomes 8..32 frames in training (a random one per equal segment), or N segment centres at
inference (as transformers' InternVLVideoProcessor samples them), each frame a single tile.
"""

from __future__ import annotations

import base64
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # larger images are rejected as likely decompression bombs


def load_image(
    source: str | Path | bytes | Image.Image | np.ndarray,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    exif: bool = True,
    alpha_background: tuple[int, int, int] | None = None,
) -> Image.Image:
    """An RGB PIL image from a path, raw bytes, a PIL image, an (H, W, 3) uint8 array or a (3, H, W)
    uint8 torch tensor.

    `exif` applies the EXIF orientation; `alpha_background` composites transparent images onto that
    colour (transformers' processors use white) instead of dropping the alpha channel (InternVL).
    16-bit grayscale is scaled to 8 bits rather than clipped.
    """
    if hasattr(source, "permute") and hasattr(source, "numpy"):  # a torch tensor, (C, H, W) as transformers takes
        if source.ndim != 3 or source.shape[0] not in (3, 4) or source.dtype != torch.uint8:
            raise ValueError(f"an image tensor must be (3|4, H, W) uint8, got {tuple(source.shape)} {source.dtype}")
        source = source.permute(1, 2, 0).contiguous().cpu().numpy()
    if isinstance(source, np.ndarray):
        if source.ndim != 3 or source.shape[2] not in (3, 4) or source.dtype != np.uint8:
            raise ValueError(f"an image array must be (H, W, 3|4) uint8, got {source.shape} {source.dtype}")
        source = Image.fromarray(source)
    if isinstance(source, Image.Image):
        image = source
        name = "PIL image"
    else:
        name = f"{len(source)} bytes" if isinstance(source, bytes) else str(source)
        data = io.BytesIO(source) if isinstance(source, bytes) else source
        if not isinstance(source, bytes):
            existing_file(source)
        try:
            image = Image.open(data)
            if image.width * image.height > max_pixels:
                raise ValueError(
                    f"image {name} is {image.width}x{image.height} = {image.width * image.height} pixels, "
                    f"over the limit of {max_pixels} (possible decompression bomb)"
                )
            image.load()
        except UnidentifiedImageError:  # PIL's message names a BytesIO object
            raise ValueError(f"cannot read image {name}: not in an image format PIL reads") from None
        except (OSError, Image.DecompressionBombError, SyntaxError) as e:
            raise ValueError(f"cannot read image {name}: {e}") from None
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image {name} is empty ({image.width}x{image.height} pixels)")
    if exif:
        image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit grayscale (PNG, TIFF): Pillow's convert("RGB") clips at 255, turning the image white
        # (InternVL and transformers both do that); scale 0..65535 to 0..255 instead. Mode "I" holds
        # 8-bit data just as often, so it is only scaled when some value is over 255.
        values = np.asarray(image)
        if image.mode != "I" or values.max() > 255:
            values = (np.clip(values, 0, 65535).astype(np.uint32) * 255 + 32767) // 65535
        image = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))  # mode L
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if alpha_background is not None and has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*alpha_background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """All (cols, rows) with min_num <= cols*rows <= max_num, ordered by tile count."""
    if not 1 <= min_num <= max_num:
        # no grid would qualify, and the caller would silently get one tile
        raise ValueError(f"tile bounds need 1 <= min_num <= max_num, got min_num={min_num}, max_num={max_num}")
    grids = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


def choose_grid(width: int, height: int, *, min_num: int = 1, max_num: int = 12, image_size: int = 448) -> tuple[int, int]:
    """InternVL's rule: the closest aspect ratio; on a tie, the larger grid if the image fills over half of it."""
    if width <= 0 or height <= 0:
        raise ValueError(f"cannot tile an empty image ({width}x{height} pixels)")
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(min_num, max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def existing_file(path: str | Path, kind: str = "image") -> Path:
    """`path`, a file that is there; else FileNotFoundError naming it (a folder too, as a missing file:
    every caller reports the record / request that named it)."""
    if Path(path).is_dir():
        raise FileNotFoundError(f"{kind} path {path} is a directory, not {'an' if kind[0] in 'aeiou' else 'a'} "
                                f"{kind} file")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{kind} file {path} does not exist")
    return Path(path)


def read_file(path: str | Path, kind: str = "image") -> bytes:
    """A local image's (or video's) bytes, read once: callers that key a cache by them decode the same
    bytes they hashed."""
    return existing_file(path, kind).read_bytes()


def tile_image(
    image: Image.Image, *, image_size: int = 448, min_num: int = 1, max_num: int = 12, use_thumbnail: bool = True
) -> list[Image.Image]:
    """The tiles as PIL images (the JPEG augmentation works on these)."""
    return [Image.fromarray(t.transpose(1, 2, 0)) for t in tile_array(image, image_size=image_size, min_num=min_num,
                                                                       max_num=max_num, use_thumbnail=use_thumbnail)]


def tile_array(
    image: Image.Image, *, image_size: int = 448, min_num: int = 1, max_num: int = 12, use_thumbnail: bool = True
) -> np.ndarray:
    """Tiles (+ thumbnail) as one uint8 array (N, 3, S, S): one resize, crops as a reshape, no per-tile objects."""
    s = image_size
    if image.mode != "RGB":  # callers that skipped load_image: grayscale, RGBA, palette
        image = image.convert("RGB")
    cols, rows = choose_grid(image.width, image.height, min_num=min_num, max_num=max_num, image_size=s)
    big = np.asarray(image.resize((cols * s, rows * s), Image.BICUBIC))  # (rows*S, cols*S, 3)
    parts = [big.reshape(rows, s, cols, s, 3).transpose(0, 2, 4, 1, 3).reshape(rows * cols, 3, s, s)]  # row-major
    if use_thumbnail and rows * cols > 1:
        parts.append(np.asarray(image.resize((s, s), Image.BICUBIC)).transpose(2, 0, 1)[None])
    return np.concatenate(parts)


# uint8 value -> normalised float32, per channel: one table lookup instead of per-pixel arithmetic.
# Same float32 operations as (x / 255 - mean) / std, so the values are bit-identical.
_NORM_LUT = ((np.arange(256, dtype=np.float32)[:, None] / np.float32(255.0) - IMAGENET_MEAN) / IMAGENET_STD).T.copy()


def normalize(tiles: list[Image.Image] | np.ndarray) -> torch.Tensor:
    """RGB tiles (PIL list, or uint8 (N, 3, S, S)) -> (N, 3, S, S) float32, ImageNet-normalised."""
    if isinstance(tiles, np.ndarray):
        chw = np.ascontiguousarray(tiles)
    else:
        chw = np.stack([np.asarray(t, dtype=np.uint8) for t in tiles]).transpose(0, 3, 1, 2).copy()  # (N, 3, S, S)
    out = np.empty(chw.shape, dtype=np.float32)
    for c in range(3):
        np.take(_NORM_LUT[c], chw[:, c], out=out[:, c])
    return torch.from_numpy(out)


def jpeg_reencode(tiles: list[Image.Image], rng: np.random.Generator, qualities: tuple[int, int] = (75, 100)) -> list[Image.Image]:
    """InternVL's training augmentation: each tile re-encoded as JPEG at a random quality in [75, 100]."""
    out = []
    for tile in tiles:
        buf = io.BytesIO()
        tile.save(buf, format="JPEG", quality=int(rng.integers(qualities[0], qualities[1] + 1)))
        buf.seek(0)
        out.append(Image.open(buf).convert("RGB"))
    return out


def tiles_per_image(max_dynamic_patch: int, n_images: int) -> int:
    """Tile cap for each image of a multi-image sample: max(1, max_dynamic_patch // n_images)."""
    return max(1, max_dynamic_patch // max(1, n_images))


def image_to_tiles(
    source: str | Path | bytes | Image.Image,
    *,
    image_size: int = 448,
    max_num: int = 12,
    use_thumbnail: bool = True,
    normalized: bool = True,
) -> torch.Tensor:
    """Load and tile one image: (tiles, 3, S, S), ImageNet-normalised float32, or uint8 with
    normalized=False (4x less to move between processes and to the GPU; the model normalises uint8
    input itself)."""
    tiles = tile_array(load_image(source), image_size=image_size, max_num=max_num, use_thumbnail=use_thumbnail)
    return normalize(tiles) if normalized else torch.from_numpy(tiles)


# ---------------------------------------------------------------- video


class FramesTooLarge(ValueError):
    """A video whose frames have more pixels than allowed (refused before decoding any)."""


def frame_indices(n_total: int, n_frames: int, *, rng: np.random.Generator | None) -> list[int]:
    """One frame per equal segment: a random one in training (rng given); otherwise each segment's centre,
    floor(n_total / n_frames * (k + 1/2)) for k < n_frames, computed as transformers' InternVLVideoProcessor
    computes it (sample_frames with initial_shift=True: a float32 arange, so that a centre that falls
    on a whole number rounds the same way and the frames are the same). A clip shorter than asked gives
    the count asked all the same, its frames repeated (as InternVL's load_video; transformers refuses it)."""
    n_frames = max(1, n_frames)
    if rng is None:
        step = n_total / n_frames
        centres = torch.arange(step / 2, n_total, step).int().tolist()[:n_frames]
        return [min(i, n_total - 1) for i in centres]
    edges = np.linspace(0, n_total, n_frames + 1).astype(int)
    return [int(rng.integers(a, max(a + 1, b))) for a, b in zip(edges[:-1], edges[1:])]


def _video_stream(container):
    """The container's video: its first video stream that is not a cover picture (an MP3's or MKV's art)."""
    import av

    cover = getattr(getattr(av.stream, "Disposition", None), "attached_pic", 0)
    streams = [s for s in container.streams.video
               if not (getattr(s, "disposition", 0) & cover)] or list(container.streams.video)
    if not streams:
        raise ValueError("it has no video stream")
    return streams[0]


def _upright(frame) -> Image.Image:
    """A decoded frame as it is shown: turned by its display matrix (a phone's portrait video is stored
    landscape with a rotation), as ffmpeg and players turn it."""
    image = frame.to_image()
    rotation = int(round(getattr(frame, "rotation", 0) or 0)) % 360
    return image.rotate(rotation, expand=True) if rotation else image  # both counterclockwise, in degrees


def load_video_frames(
    path: str | Path | bytes,
    *,
    rng: np.random.Generator | None = None,
    min_frames: int = 8,
    max_frames: int = 32,
    num_frames: int | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> list[Image.Image]:
    """Decode a video with PyAV and pick frames by segment.

    Training (rng given): the frame count is uniform in [min_frames, max_frames] and each segment
    contributes a random frame. Inference: `num_frames` (default max_frames) segment centres. `path` may
    also be the file's bytes (a video sent in a request). The frames are counted by reading the file's
    packets, not taken from its header (often wrong: fragmented or cut files, variable frame rates), and
    decoded in order, only the chosen ones kept (a long video never sits in memory); when fewer frames
    decode than there are packets (a damaged file), the segments are drawn again over those that do.
    Frames are turned upright by their rotation. ValueError for what does not decode.
    """
    try:
        import av
    except ImportError as e:  # pragma: no cover - av is a declared dependency
        raise ImportError("video records need PyAV: pip install av") from e
    if isinstance(path, bytes):
        name, data = "in the request", path
    else:
        name, data = str(existing_file(path, "video")), None
    count = int(rng.integers(min_frames, max_frames + 1)) if rng is not None else (num_frames or max_frames)

    def opened():  # a fresh container for each pass: raw streams (.h264) cannot seek back
        return av.open(io.BytesIO(data) if data is not None else name)

    def decode(wanted: list[int]) -> tuple[dict[int, Image.Image], int]:
        """The frames at `wanted` (sorted), and how many frames were decoded to reach them."""
        keep, decoded, last, chosen = {}, 0, wanted[-1], set(wanted)
        with opened() as container:
            for decoded, frame in enumerate(container.decode(_video_stream(container)), start=1):
                if decoded - 1 in chosen:
                    keep[decoded - 1] = _upright(frame)
                if decoded - 1 >= last:
                    break
        return keep, decoded

    try:
        with opened() as container:
            stream = _video_stream(container)
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > max_pixels:
                raise FramesTooLarge(f"the video {name}'s frames are {width}x{height}, over the limit of "
                                     f"{max_pixels} pixels")
            n_total = sum(1 for packet in container.demux(stream) if packet.size)  # no decoding
        if n_total == 0:  # packets that say nothing of their size: count the frames by decoding them
            n_total = decode([2**62])[1]
        wanted = frame_indices(max(n_total, 1), count, rng=rng)
        keep, decoded = decode(sorted(set(wanted)))
        if any(i not in keep for i in wanted) and decoded:  # fewer frames decode than packets: over those that do
            wanted = frame_indices(decoded, count, rng=rng)
            keep, _ = decode(sorted(set(wanted)))
        frames = [keep[i] for i in wanted if i in keep]
    except FramesTooLarge:
        raise
    except (av.error.FFmpegError, ValueError, IndexError, OSError) as e:
        raise ValueError(f"cannot decode the video {name}: {e}") from None
    if len(frames) < len(wanted) or not frames:
        raise ValueError(f"the video {name} has no decodable frames" if not frames else
                         f"the video {name}: {len(frames)} of the {len(wanted)} frames chosen decode")
    return [f.convert("RGB") for f in frames]


def frame_tiles(frames: list[Image.Image], image_size: int = 448) -> np.ndarray:
    """Video frames -> uint8 (F, 3, S, S): each frame one tile (resized whole, no thumbnail), as InternVL
    tiles a video's frames (max_num=1)."""
    return np.concatenate([tile_array(f, image_size=image_size, max_num=1) for f in frames])


@dataclass(frozen=True)
class VideoClip:
    """A video's chosen frames among a prompt's images (`processor.chat_inputs`): one tile per frame
    whatever the prompt's tile budget, each frame standing for one `<image>` of the text (template.video_prefix)."""

    frames: tuple[Image.Image, ...]


def pixel_digest(image) -> str | None:
    """A hash of a decoded image's pixels (PIL image, array, every frame of a clip) or of an image file's
    bytes: equal pictures from different rows (a benchmark's rotated copies of a question) get the same
    digest. None for what is neither (a path: not read here)."""
    h = hashlib.blake2b(digest_size=16)
    clip = isinstance(image, VideoClip)
    frames = image.frames if clip else (image,)
    h.update(b"clip;" if clip else b"picture;")  # a clip's frame is one tile whatever the tile cap
    for frame in frames:
        if isinstance(frame, Image.Image):
            # what load_image reads besides the pixels: the EXIF orientation it applies, a palette's colours
            orientation = frame.getexif().get(0x0112, 1)
            h.update(f"image {frame.mode} {frame.width}x{frame.height} {orientation};".encode())
            if frame.mode in ("P", "PA"):
                h.update(bytes(frame.getpalette() or ()))
            h.update(frame.tobytes())
        elif isinstance(frame, np.ndarray):
            h.update(f"array {frame.dtype} {frame.shape};".encode())
            h.update(np.ascontiguousarray(frame).tobytes())
        elif isinstance(frame, bytes | bytearray):
            h.update(b"file;")
            h.update(frame)
        else:
            return None
    return h.hexdigest()


def decode_base64(text: str) -> bytes:
    """Base64 text -> bytes, line-wrapped base64 (`base64 img.png`, encodebytes) too; ValueError
    (binascii.Error) if it is not base64."""
    return base64.b64decode("".join(text.split()), validate=True)
