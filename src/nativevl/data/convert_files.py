"""The files `nativevl data convert` reads: other trainers' data files (jsonl, json as a list, columns or
JSON Lines, parquet) record by record, and the images and videos they name or embed, resolved to files.
Problems are `ConvertError`s with a kind, which the converter counts by record."""

from __future__ import annotations

import binascii
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from nativevl.data.images import decode_base64

KINDS = ("malformed", "missing_file", "unreadable_image", "placeholder_mismatch", "no_assistant_turn", "unsupported")
INPUT_SUFFIXES = (".jsonl", ".json", ".parquet")
BASE64 = re.compile(r"[A-Za-z0-9+/\s]+={0,2}\s*")


class ConvertError(ValueError):
    def __init__(self, kind: str, message: str) -> None:
        assert kind in KINDS, kind
        super().__init__(message)
        self.kind = kind
        self.raw: Any = None  # what could not be read as a record (a jsonl line's text)


# ---------------------------------------------------------------- reading input files


def input_files(path: Path, skip: frozenset[str] | set[str] = frozenset()) -> list[Path]:
    """A data file, or a folder of them (LLaMA-Factory's file_name may be a folder). A folder's listing
    leaves out what conversions and trainers keep beside their data: the files its meta files list (an
    earlier conversion's output) with their rejects, the meta files, dataset_info.json, and `skip`
    (real paths: this conversion's own outputs); a file named on its own must not be one of `skip`."""
    if path.is_dir():
        written = _conversion_outputs(path)
        listed = sorted(p for p in path.iterdir() if p.suffix in INPUT_SUFFIXES and p.is_file())
        files = [p for p in listed if p.name not in written and os.path.realpath(p) not in skip]
        if not files:
            raise ValueError(f"{path}: a folder with no {', '.join(INPUT_SUFFIXES)} data file"
                             + (f" (left out: {', '.join(p.name for p in listed)})" if listed else ""))
        return files
    if not path.is_file():
        raise FileNotFoundError(f"input {path} does not exist")
    if path.suffix not in INPUT_SUFFIXES:
        raise ValueError(f"{path}: unsupported input type {path.suffix!r} (reads {', '.join(INPUT_SUFFIXES)})")
    if os.path.realpath(path) in skip:
        raise ValueError(f"input {path} is one of this conversion's outputs (--out, its _val or rejects file)")
    return [path]


def _conversion_outputs(folder: Path) -> set[str]:
    """Names in `folder` that are not data to convert: meta files (an object of datasets, each with an
    annotation), the files they list in this folder with their rejects files, and dataset_info.json."""
    names = {"dataset_info.json"}
    here = os.path.realpath(folder)
    for meta in folder.glob("meta*.json"):
        try:
            entries = json.loads(meta.read_bytes())
        except (OSError, ValueError):
            continue
        if not (isinstance(entries, dict) and entries and all(
                isinstance(d, dict) and isinstance(d.get("annotation"), str) for d in entries.values())):
            continue  # not a meta file: data that happens to be called meta*.json
        names.add(meta.name)
        for d in entries.values():
            annotation = os.path.realpath(folder / d["annotation"])
            if os.path.dirname(annotation) == here:
                stem = Path(annotation).stem
                names |= {Path(annotation).name, f"{stem}.rejects.jsonl", f"{stem}.stopped.rejects.jsonl"}
    return names


def count_records(path: Path) -> int | None:
    """Records in a file, for the progress bar (jsonl: its lines, a fast pass; json: None, read whole anyway)."""
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 24), b""))
    if path.suffix == ".parquet":
        return _parquet(path).metadata.num_rows
    return None


def _parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading parquet needs pyarrow (pip install 'nativevl[data]')") from None
    return pq.ParquetFile(path)


def _json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            try:
                raw = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
                raw = ConvertError("malformed", f"not valid JSON ({e}): {text[:200]!r}")
                raw.raw = text  # the rejects file keeps the whole line
            yield f"{path.name}:{lineno}", raw


def read_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(file:line or file:row, raw record or ConvertError) for every record of a file. A .json file is
    a list of records, a dict of equal-length columns, or JSON Lines (what `Dataset.to_json` writes)."""
    if path.suffix == ".jsonl":
        yield from _json_lines(path)
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_bytes())
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":  # JSON Lines under a .json name
                yield from _json_lines(path)
                return
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if isinstance(data, dict) and any(isinstance(data.get(k), list) and data[k] and isinstance(data[k][0], dict)
                                          for k in ("messages", "conversations", "conversation")):
            data = [data]  # one record, not columns
        if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
            lengths = {len(v) for v in data.values()}
            if len(lengths) != 1:
                raise ValueError(f"{path}: a dict of columns needs columns of one length, got {sorted(lengths)}")
            data = [dict(zip(data, row)) for row in zip(*data.values())]
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json input must hold a list of records (or columns), got {type(data).__name__}")
        for i, raw in enumerate(data):
            yield f"{path.name}:[{i}]", raw
    else:
        row = 0
        for batch in _parquet(path).iter_batches(batch_size=256):
            for raw in batch.to_pylist():
                yield f"{path.name}:row {row}", raw
                row += 1


# ---------------------------------------------------------------- media


class Media:
    """Resolves a record's images and videos to files: paths under `root` (then the current folder),
    and embedded images written once each (by content hash) into `embed_dir`."""

    def __init__(self, root: Path, embed_dir: Path) -> None:
        self.root = root
        self.embed_dir = embed_dir
        self.created: list[Path] = []  # embedded images this run wrote (removed if it stops)

    def path(self, value: str, what: str) -> Path:
        if value.startswith(("http://", "https://", "s3://", "oss://")):
            raise ConvertError("unsupported", f"{what} {value[:120]!r} is remote: nothing is downloaded; "
                                              "fetch the files and give their paths")
        p = Path(value)
        for candidate in ((p,) if p.is_absolute() else (self.root / p, p)):
            try:
                if candidate.is_file():  # absolute, symlinks kept: a cache's blob names mean nothing
                    return Path(os.path.abspath(candidate))
            except OSError:  # a name too long for the file system: an embedded image, or nothing
                break
        raise ConvertError("missing_file", f"{what} {value[:200]!r} not found (looked under {self.root.resolve()} and the current folder)")

    def image(self, value: Any, what: str) -> Path:
        if isinstance(value, dict):
            if isinstance(value.get("bytes"), (bytes, bytearray, str)) and value["bytes"]:
                return self._embedded(value["bytes"], what)
            if isinstance(value.get("path"), str) and value["path"]:
                return self.image(value["path"], what)
            raise ConvertError("malformed", f"{what} is a dict without 'bytes' or 'path': {sorted(value)}")
        if isinstance(value, (bytes, bytearray)):
            return self._embedded(bytes(value), what)
        if not isinstance(value, str) or not value:
            raise ConvertError("malformed", f"{what} must be a path, a data URL or image bytes, got {type(value).__name__}")
        if value.startswith("data:"):
            head, _, payload = value.partition(",")
            if ";base64" not in head:
                raise ConvertError("malformed", f"{what}: a data URL must be base64 ({head[:60]!r})")
            return self._embedded(payload, what)
        try:
            return self.path(value, what)
        except ConvertError as e:
            if e.kind == "missing_file" and len(value) >= 64 and BASE64.fullmatch(value):  # ms-swift takes bare base64
                return self._embedded(value, what)
            raise

    def _embedded(self, data: bytes | str, what: str) -> Path:
        if isinstance(data, str):
            try:
                data = decode_base64(data)
            except (binascii.Error, ValueError):
                raise ConvertError("malformed", f"{what}: neither a file nor valid base64 ({data[:60]!r}...)") from None
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt = (im.format or "png").lower()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise ConvertError("unreadable_image", f"{what}: embedded bytes are not an image ({type(e).__name__})") from None
        target = self.embed_dir / f"{hashlib.sha256(data).hexdigest()[:24]}.{'jpg' if fmt == 'jpeg' else fmt}"
        if not target.exists():
            self.embed_dir.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + f".tmp{os.getpid()}")
            tmp.write_bytes(bytes(data))
            os.replace(tmp, target)
            self.created.append(target)
        return target
