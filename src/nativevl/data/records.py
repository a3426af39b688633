"""Dataset formats: InternVL's meta json + jsonl, LLaVA json, text-only and preference records.

A meta json maps dataset names to {root, annotation, repeat_time, max_dynamic_patch, data_augment,
length}; `annotation` is a jsonl file (one record a line) or a json file holding a list (LLaVA).
Records are parsed into `Record` (conversation) or `PreferenceRecord`; anything malformed raises
`RecordError` with a problem kind, which the loader counts and `nativevl data validate` reports.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nativevl.data.template import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, has_image_markup, normalize_turns

log = logging.getLogger(__name__)

PROBLEMS = (
    "malformed",  # not JSON, wrong types, unknown roles
    "missing_file",  # an image or video path that does not exist
    "unreadable_image",  # a file that does not decode (or is a decompression bomb)
    "placeholder_mismatch",  # number of <image> placeholders != number of images
    "no_assistant_turn",  # nothing to learn from
    "over_length",  # more tokens or tiles than the budget
)


class RecordError(ValueError):
    def __init__(self, kind: str, message: str) -> None:
        assert kind in PROBLEMS, kind
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    annotation: Path
    root: Path
    repeat_time: float = 1.0
    max_dynamic_patch: int = 12
    data_augment: bool = False
    length: int | None = None


@dataclass
class Record:
    """One conversation. `images` are resolved paths; `video` likewise; `source` says where it came from."""

    conversations: list[dict[str, str]]
    images: list[Path] = field(default_factory=list)
    video: Path | None = None
    source: str = ""
    max_dynamic_patch: int = 12
    data_augment: bool = False
    image_sizes: list[tuple[int, int]] | None = None  # (width, height) when the record gives them
    text: str | None = None  # a plain document: every token is learnt, no chat template

    @property
    def is_multimodal(self) -> bool:
        return bool(self.images) or self.video is not None


@dataclass
class PreferenceRecord:
    question: str
    chosen: str
    rejected: str
    images: list[Path] = field(default_factory=list)
    source: str = ""
    max_dynamic_patch: int = 12
    data_augment: bool = False
    system: str | None = None  # the pair's system message (None: the run's default)
    video: Path | None = None  # instead of images: its frames replace <video> (or lead the question)


def _bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{what} must be a boolean, got {value!r}")


def load_meta(path: str | Path) -> list[DatasetSpec]:
    """Read an InternVL meta json; relative paths are taken from the meta file's folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"meta file {path} does not exist")
    try:
        meta = json.loads(path.read_bytes())  # bytes: UTF-8 (with or without a BOM) whatever the locale
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not meta:
        raise ValueError(f"{path}: a meta file maps dataset names to settings, got {type(meta).__name__}")
    specs = []
    for name, d in meta.items():
        if not isinstance(d, dict) or "annotation" not in d:
            raise ValueError(f"{path}: dataset {name!r} needs at least an 'annotation' path")
        unknown = set(d) - {"root", "annotation", "repeat_time", "max_dynamic_patch", "data_augment", "length"}
        if unknown:
            raise ValueError(f"{path}: dataset {name!r} has unknown key(s) {sorted(unknown)}")
        base = path.parent
        for key in ("annotation", "root"):
            if key in d and not isinstance(d[key], str):
                raise ValueError(f"{path}: dataset {name!r} {key} must be a path string, got {d[key]!r}")
        annotation = base / d["annotation"]
        if not annotation.is_file():
            raise FileNotFoundError(f"{path}: dataset {name!r} annotation {annotation} does not exist")
        try:
            repeat = float(d.get("repeat_time", 1.0))
        except (TypeError, ValueError):
            raise ValueError(f"{path}: dataset {name!r} repeat_time must be a number, got {d['repeat_time']!r}") from None
        try:
            max_patch = int(d.get("max_dynamic_patch", 12))
        except (TypeError, ValueError):
            raise ValueError(
                f"{path}: dataset {name!r} max_dynamic_patch must be an integer, got {d['max_dynamic_patch']!r}"
            ) from None
        if repeat <= 0:
            raise ValueError(f"{path}: dataset {name!r} repeat_time must be > 0, got {repeat}")
        specs.append(
            DatasetSpec(
                name=name,
                annotation=annotation,
                root=base / d.get("root", ""),
                repeat_time=repeat,
                max_dynamic_patch=max_patch,
                data_augment=_bool(d.get("data_augment", False), f"{path}: {name}.data_augment"),
                length=d.get("length"),
            )
        )
    return specs


def read_meta_entries(path: Path) -> dict:
    """The datasets a meta.json lists ({} when there is none); a damaged one is an error, never overwritten."""
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); mend or move it: its datasets would be lost") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: a meta file maps dataset names to settings, got {type(meta).__name__}")
    return meta


def meta_entry_reading(meta: dict, meta_path: Path, jsonl: Path) -> str | None:
    """The name of the dataset of a meta file that reads `jsonl` (annotation paths taken from the meta
    file's folder), whatever the user named it; None when none does."""
    target = os.path.realpath(jsonl)
    return next((name for name, d in meta.items() if isinstance(d, dict) and isinstance(d.get("annotation"), str)
                 and os.path.realpath(meta_path.parent / d["annotation"]) == target), None)


def write_meta_entry(jsonl: Path, max_dynamic_patch: int | None = None, data_augment: bool | None = None,
                     meta_name: str = "meta.json") -> Path:
    """Add the dataset of `jsonl` to the meta file beside it (`meta_name`), named by its stem, with paths
    relative to that folder; or update the entry that already reads it, under whatever name: its other
    settings (repeat_time, ...) stay, max_dynamic_patch and data_augment change only when given, and a
    stale 'length' goes. The other datasets listed there stay. Returns its path."""
    path = jsonl.parent / meta_name
    meta = read_meta_entries(path)
    name = meta_entry_reading(meta, path, jsonl)
    entry = {"root": "", "annotation": jsonl.name, "max_dynamic_patch": 12, "data_augment": False}
    if name is not None:
        entry |= {k: v for k, v in meta[name].items() if k != "length"}  # the record count may have changed
        if entry.get("root", "") != "":
            log.warning("%s: dataset %r's root %r set back to '' (the converted records' paths start at their "
                        "file's folder)", path, name, entry["root"])
    entry |= {"root": "", "annotation": jsonl.name}
    if max_dynamic_patch is not None:
        entry["max_dynamic_patch"] = max_dynamic_patch
    if data_augment is not None:
        entry["data_augment"] = data_augment
    meta[name or jsonl.stem] = entry
    write_meta_entries(path, meta)
    return path


def write_meta_entries(path: Path, meta: dict) -> None:
    """A meta file written whole through a temporary file (a reader never sees half of it); removed
    when it lists no dataset."""
    if not meta:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _line_index(path: Path, chunk: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets and 1-based line numbers of the non-blank lines of a file, found with numpy
    (a few bytes per line, not a Python object per line)."""
    starts, ends, base = [np.zeros(1, dtype=np.int64)], [], 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            nl = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10).astype(np.int64) + base
            ends.append(nl)
            starts.append(nl + 1)
            base += len(block)
    start = np.concatenate(starts)
    end = np.concatenate([*ends, np.array([base], dtype=np.int64)])
    keep = end - start > 0
    lineno = np.arange(1, len(start) + 1, dtype=np.int64)
    start, end, lineno = start[keep], end[keep], lineno[keep]
    if len(start):  # drop whitespace-only lines: only a line that starts with whitespace can be one
        first = np.array(np.memmap(path, dtype=np.uint8, mode="r")[start])  # each line's first byte
        maybe = np.flatnonzero(np.isin(first, np.frombuffer(b" \t\r\x0b\x0c", dtype=np.uint8)))
        with open(path, "rb") as f:
            blank = []
            for i in maybe:  # rare: checked one by one
                f.seek(int(start[i]))
                if not f.read(int(end[i] - start[i])).strip():
                    blank.append(i)
            if blank:
                mask = np.ones(len(start), dtype=bool)
                mask[blank] = False
                start, lineno = start[mask], lineno[mask]
    return start, lineno


class Annotation:
    """Random access to a dataset's records: byte offsets of jsonl lines (the file is not held in
    memory), or the parsed list of a LLaVA-style .json file. Item i -> (line number, JSON or RecordError)."""

    def __init__(self, spec: DatasetSpec) -> None:
        self.spec = spec
        self.path = spec.annotation
        self._items: list | None = None
        self._offsets: np.ndarray | None = None
        self._linenos: np.ndarray | None = None
        if self.path.suffix == ".json":
            try:
                data = json.loads(self.path.read_bytes())  # bytes: a UTF-8 BOM is accepted, as in jsonl
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{self.path}: not valid JSON ({e})") from None
            if not isinstance(data, list):
                raise ValueError(f"{self.path}: a .json annotation must hold a list of records")
            self._items = data
        else:
            self._offsets, self._linenos = _line_index(self.path)
        self._fh = None
        self._pid = None

    def __len__(self) -> int:
        return len(self._items) if self._items is not None else len(self._offsets)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        if self._items is not None:
            return i + 1, self._items[i]
        if self._fh is None or self._pid != os.getpid():
            # one handle per process: a forked DataLoader worker must not share the parent's file offset
            self._fh = open(self.path, "rb")  # noqa: SIM115 - kept open for random access
            self._pid = os.getpid()
        self._fh.seek(int(self._offsets[i]))
        line = self._fh.readline()
        lineno = int(self._linenos[i])
        try:
            return lineno, json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            return lineno, RecordError("malformed", f"{self.path}:{lineno}: not valid JSON ({e})")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fh"] = None  # file handles do not cross process boundaries
        state["_pid"] = None
        return state

    def is_text_only(self, probe: int = 64) -> bool:
        """Whether `probe` records spread evenly over the file (the first and the last among them) carry no
        image or video (decides the text:multimodal group; a file that begins with text-only records is
        not taken for a text-only one)."""
        n = len(self)
        picks = sorted({round(k * (n - 1) / max(probe - 1, 1)) for k in range(min(probe, n))})
        for i in picks:
            raw = self[i][1]
            if isinstance(raw, dict) and any(raw.get(k) for k in ("image", "images", "video")):
                return False
        return True


def _paths(value: Any, root: Path, where: str, key: str) -> list[Path]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) and v for v in items):
        raise RecordError("malformed", f"{where}: '{key}' must be a path or a list of paths")
    paths = [root / v for v in items]
    for p in paths:
        try:
            exists = p.is_file()
        except OSError as e:  # e.g. a name too long for the file system
            raise RecordError("missing_file", f"{where}: {key} path {str(p)[:200]!r} is not usable ({e.strerror})") from None
        if not exists:
            raise RecordError("missing_file", f"{where}: {key} file {p} does not exist")
    return paths


def parse_record(raw: Any, spec: DatasetSpec, where: str) -> Record | PreferenceRecord:
    """A raw JSON record -> Record / PreferenceRecord, or RecordError naming the problem."""
    if isinstance(raw, RecordError):
        raise raw
    if not isinstance(raw, dict):
        raise RecordError("malformed", f"{where}: a record must be a JSON object, got {type(raw).__name__}")
    image, more = raw.get("image"), raw.get("images")
    if image not in (None, []) and more not in (None, []):
        raise RecordError("malformed", f"{where}: both 'image' and 'images' are given; use one of them")
    # "image": null (or []) beside "images": [...] is common in converted data: take the filled one
    images = _paths(image if image not in (None, []) else more, spec.root, where, "image")
    if "chosen" in raw or "rejected" in raw:
        for key in ("question", "chosen", "rejected"):
            if not isinstance(raw.get(key), str) or not raw[key].strip():
                raise RecordError("malformed", f"{where}: preference record needs a non-empty string '{key}'")
        system = raw.get("system")
        if system is not None and not isinstance(system, str):
            raise RecordError("malformed", f"{where}: a preference record's 'system' must be a string")
        if any(has_image_markup(raw[key]) for key in ("chosen", "rejected")):
            raise RecordError("placeholder_mismatch", f"{where}: an answer holds image or video markup "
                              f"({IMAGE_PLACEHOLDER}, {VIDEO_PLACEHOLDER}, <IMG_CONTEXT>): only the question carries images")
        video = _paths(raw.get("video"), spec.root, where, "video")
        if video and images:
            raise RecordError("malformed", f"{where}: a record holds images or a video, not both")
        if len(video) > 1:
            raise RecordError("malformed", f"{where}: a preference record holds one video, got {len(video)}")
        n = raw["question"].count(IMAGE_PLACEHOLDER)
        if n and n != len(images):
            raise RecordError("placeholder_mismatch", f"{where}: {n} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s)")
        if raw["question"].count(VIDEO_PLACEHOLDER) > (1 if video else 0):
            raise RecordError("placeholder_mismatch", f"{where}: {raw['question'].count(VIDEO_PLACEHOLDER)} "
                              f"{VIDEO_PLACEHOLDER} placeholder(s) but {len(video)} video(s)")
        return PreferenceRecord(raw["question"], raw["chosen"], raw["rejected"], images, where, spec.max_dynamic_patch,
                                spec.data_augment, system, video[0] if video else None)
    if "text" in raw and "conversations" not in raw:  # a plain document (text corpus for pre-training)
        if not isinstance(raw["text"], str) or not raw["text"].strip():
            raise RecordError("malformed", f"{where}: 'text' must be a non-empty string")
        if images or raw.get("video"):
            raise RecordError("malformed", f"{where}: a plain 'text' record cannot hold images; use 'conversations'")
        return Record(conversations=[], text=raw["text"], source=where)
    conversations = raw.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise RecordError("malformed", f"{where}: 'conversations' must be a non-empty list")
    try:
        _, turns = normalize_turns(conversations)
    except ValueError as e:
        raise RecordError("malformed", f"{where}: {e}") from None
    if not any(role == "assistant" and text.strip() for role, text in turns):
        raise RecordError("no_assistant_turn", f"{where}: no non-empty assistant ('gpt') turn")
    video = _paths(raw.get("video"), spec.root, where, "video")
    if video and images:
        raise RecordError("malformed", f"{where}: a record holds images or a video, not both")
    n_placeholders = sum(text.count(IMAGE_PLACEHOLDER) for role, text in turns if role == "user")
    if images and n_placeholders not in (0, len(images)):
        raise RecordError(
            "placeholder_mismatch", f"{where}: {n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s)"
        )
    if not images and not video and n_placeholders:
        raise RecordError("placeholder_mismatch", f"{where}: {n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but no image")
    sizes = None
    if isinstance(raw.get("width"), int) and isinstance(raw.get("height"), int) and len(images) == 1:
        sizes = [(raw["width"], raw["height"])]
    elif isinstance(raw.get("width_list"), list) and isinstance(raw.get("height_list"), list):
        sizes = list(zip(raw["width_list"], raw["height_list"]))
    return Record(
        conversations=conversations,
        images=images,
        video=video[0] if video else None,
        source=where,
        max_dynamic_patch=spec.max_dynamic_patch,
        data_augment=spec.data_augment,
        image_sizes=sizes,
    )
