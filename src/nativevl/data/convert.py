"""`nativevl data convert`: fine-tuning data in other trainers' formats -> InternVL jsonl + meta.json.

The formats, and what is refused, are `convert_records.py`'s; the files read, `convert_files.py`'s.
This module runs a conversion: every record converted and checked as nativevl's loader will read it,
written atomically (a run that stops leaves an earlier output as it was). Every refused record goes,
whole, with its kind and reason, to OUT.rejects.jsonl; the run stops past a rejected fraction (default
5%, after 200 records, and over the whole file at the end), leaving no output but the rejects. With a
validation fraction, a fixed share of the records (by a hash of the seed and the record's place) goes
to OUT_val.jsonl, listed in meta_val.json.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from tqdm import tqdm

from nativevl.data.convert_files import KINDS, ConvertError, Media, count_records, input_files, read_records
from nativevl.data.convert_records import Layout, convert_record
from nativevl.data.records import (
    DatasetSpec,
    RecordError,
    meta_entry_reading,
    parse_record,
    read_meta_entries,
    write_meta_entries,
    write_meta_entry,
)
from nativevl.data.validate import ValidationReport

log = logging.getLogger(__name__)
__all__ = ["ConversionAborted", "ConvertStats", "Layout", "convert", "held_out"]


class ConversionAborted(RuntimeError):
    """The rejected fraction passed the limit: nothing was written but the rejects file (the CLI says
    "stopped" and exits 1, as a training run past its limit of bad records)."""


@dataclass
class ConvertStats(ValidationReport):
    """Records read, written and refused (by kind, `bad`), with the first examples of each kind."""

    kinds: ClassVar[tuple[str, ...]] = KINDS
    written: int = 0
    held_out: int = 0  # of the written, those in the validation file
    pairs: int = 0
    images_written: int = 0

    def headline(self) -> str:
        val = f", {self.held_out} of them held out for validation" if self.held_out else ""
        return (f"{self.records} records: {self.written} written ({self.pairs} preference pairs{val}), {self.bad} refused "
                f"({self.bad / max(1, self.records):.1%}); {self.images_written} embedded image(s) written")


def _jsonable(raw: Any) -> Any:
    """A raw record for the rejects file: bytes (parquet images) shown by size."""
    if isinstance(raw, (bytes, bytearray)):
        return f"<{len(raw)} bytes>"
    if isinstance(raw, dict):
        return {k: _jsonable(v) for k, v in raw.items()}
    if isinstance(raw, (list, tuple)):
        return [_jsonable(v) for v in raw]
    return raw


def convert(
    inputs: list[Path],
    out: Path,
    layout: Layout = Layout(),  # noqa: B008 - frozen
    image_root: Path | None = None,
    max_reject_fraction: float = 0.05,
    min_records_before_abort: int = 200,
    max_dynamic_patch: int | None = None,
    data_augment: bool | None = None,
    overwrite: bool = False,
    examples: int = 3,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> ConvertStats:
    """Convert every record of `inputs` into `out` (InternVL jsonl) and add it to out's meta.json.
    Rejected records go to out.rejects.jsonl (whole, with kind and reason). With `val_fraction`, that
    share of the written records (drawn by a hash of `seed` and the record's picture group, so that the
    records sharing any image or video stay together (PictureGroups), else its place in the input; the
    same every run) goes to
    OUT_val.jsonl instead, listed in meta_val.json beside it (`--val_meta`)."""
    out = Path(out)
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_dynamic_patch is not None and max_dynamic_patch < 1:
        raise ValueError(f"max_dynamic_patch must be >= 1, got {max_dynamic_patch}")
    val_out = out.with_name(out.stem + "_val.jsonl")
    if val_fraction and val_out.exists() and not overwrite:
        raise ValueError(f"{val_out} exists; pass --overwrite to replace it")
    if out.suffix != ".jsonl":
        raise ValueError(f"--out must be a .jsonl file, got {out}")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    if not 0 <= max_reject_fraction <= 1:
        raise ValueError(f"max_reject_fraction must be in [0, 1], got {max_reject_fraction}")
    rejects_path = out.with_name(out.stem + ".rejects.jsonl")
    # this conversion's own files, never its input (a folder holding --out, converted again)
    own = {os.path.realpath(f)
           for f in (out, val_out, rejects_path, out.with_name(out.stem + ".stopped.rejects.jsonl"))}
    files = [f for p in inputs for f in input_files(Path(p), skip=own)]
    out.parent.mkdir(parents=True, exist_ok=True)
    for meta_name, target in (("meta.json", out), ("meta_val.json", val_out if val_fraction else None)):
        meta_path = out.parent / meta_name
        meta = read_meta_entries(meta_path)  # a damaged meta file beside --out: now, not after the work
        other = meta.get(target.stem) if target else None  # the name this output's entry would take ...
        if other is not None and meta_entry_reading(meta, meta_path, target) is None and not overwrite:
            raise ValueError(f"{meta_path} already lists a dataset {target.stem!r} reading "
                             f"{other.get('annotation') if isinstance(other, dict) else other!r}; pass --overwrite to "
                             f"replace that entry, or name --out otherwise")
    replacing = out.exists()  # an earlier output (--overwrite), whose held-out file may have to go
    out_dir = Path(os.path.abspath(out.parent))
    media = Media(Path("."), out.parent / f"{out.stem}_images")
    spec = DatasetSpec(name=out.stem, annotation=out, root=out_dir)
    # a run that stops leaves an earlier output as it was, and so its rejects: its own go beside them
    stopped_path = out.with_name(out.stem + ".stopped.rejects.jsonl") if out.exists() else rejects_path
    tmp = out.with_name(out.name + ".tmp")
    val_tmp = val_out.with_name(val_out.name + ".tmp")
    rejects_tmp = out.with_name(f".{out.stem}.rejects.jsonl.tmp")
    stats = ConvertStats()
    groups = PictureGroups(lambda key: held_out(seed, key, val_fraction))

    def too_many() -> str:
        return (f"{stats.bad} of {stats.records} records rejected, over --max_reject_fraction {max_reject_fraction:.1%}; "
                f"each one is in {stopped_path}; nothing else was written\n{stats.format()}")

    def over_limit(final: bool) -> bool:
        seen = stats.records
        return (final or seen >= min_records_before_abort) and stats.bad > max_reject_fraction * seen

    def one(where: str, raw: Any) -> tuple[str, list[str]]:
        """(The output line of a record, its images or video as written), or ConvertError (the images it
        embedded removed again)."""
        if isinstance(raw, ConvertError):
            raise raw
        created = len(media.created)
        try:
            return checked(where, raw)
        except ConvertError:
            for image in media.created[created:]:  # written by this record alone: content-addressed, new
                image.unlink(missing_ok=True)
            del media.created[created:]
            raise

    def checked(where: str, raw: Any) -> tuple[str, list[str]]:
        try:
            record = convert_record(raw, layout, media, out_dir)
            parse_record(record, spec, where)  # what nativevl's loader will read: its checks, now, by record
            line = json.dumps(record, ensure_ascii=False)
            line.encode("utf-8")
        except ConvertError:
            raise
        except RecordError as e:
            raise ConvertError(e.kind if e.kind in KINDS else "malformed", str(e)) from None
        except UnicodeEncodeError:
            raise ConvertError("malformed", "the text holds a lone UTF-16 surrogate (half of a broken emoji)") from None
        except Exception as e:  # a record of a shape nothing above foresaw: counted, never the end of the run
            log.debug("%s: %s", where, e, exc_info=True)
            raise ConvertError("malformed", f"unreadable record ({type(e).__name__}: {e})") from None
        stats.pairs += "chosen" in record
        return line, _pictures_of(record)

    def rejected(where: str, raw: Any, error: ConvertError) -> str:
        entry = {"where": where, "kind": error.kind, "error": str(error)}
        try:
            entry["record"] = raw.raw if isinstance(raw, ConvertError) else _jsonable(raw)
            return json.dumps(entry, default=str)  # ASCII: a lone surrogate cannot break the rejects file
        except (RecursionError, ValueError, TypeError):
            entry["record"] = repr(raw)[:100_000]
            return json.dumps(entry)

    try:
        with open(tmp, "w", encoding="utf-8") as f, open(rejects_tmp, "w", encoding="utf-8") as rejects:
            for path in files:
                media.root = Path(image_root) if image_root is not None else path.parent  # each file's own folder
                for where, raw in tqdm(read_records(path), total=count_records(path), desc=path.name, unit="rec"):
                    stats.records += 1
                    try:
                        line, pictures = one(where, raw)
                    except ConvertError as e:
                        stats.add(ConvertError(e.kind, f"{where}: {e}"), examples)
                        rejects.write(rejected(where, raw, e) + "\n")
                        if over_limit(final=False):
                            raise ConversionAborted(too_many()) from None
                        continue
                    stats.written += 1
                    f.write(line + "\n")
                    if val_fraction:
                        groups.add(pictures, stats.records)
        if stats.records == 0:
            raise ConversionAborted(f"{', '.join(map(str, files))}: no records")
        if over_limit(final=True):
            raise ConversionAborted(too_many())
        if val_fraction:  # records sharing a picture (or video) fall on the same side of the split
            stats.held_out = groups.split(tmp, val_tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        val_tmp.unlink(missing_ok=True)
        for image in media.created:  # embedded images of a run that wrote nothing
            image.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # and their folder, when it made it (an earlier run's stays)
            media.embed_dir.rmdir()
        if stats.bad:
            os.replace(rejects_tmp, stopped_path)
        else:
            rejects_tmp.unlink(missing_ok=True)
        raise
    stats.images_written = len(media.created)
    os.replace(tmp, out)
    if stats.bad:
        os.replace(rejects_tmp, rejects_path)
    else:  # this output has no rejects (an earlier output's go with it)
        rejects_tmp.unlink()
        rejects_path.unlink(missing_ok=True)
    write_meta_entry(out, max_dynamic_patch=max_dynamic_patch, data_augment=data_augment)
    if val_fraction and stats.held_out:
        os.replace(val_tmp, val_out)
        write_meta_entry(val_out, max_dynamic_patch=max_dynamic_patch, meta_name="meta_val.json")
        if stats.held_out == stats.written:
            log.warning("every record went to %s: %s holds none to train on", val_out, out)
    else:
        val_tmp.unlink(missing_ok=True)
        if val_fraction:
            log.warning("--val_fraction %s held out none of %d records: no validation set written", val_fraction,
                        stats.written)
        if replacing:
            _drop_held_out(val_out)  # the earlier run's, which would now share records with `out`
    return stats


class PictureGroups:
    """The held-out split's groups: records joined by any picture or video they share (a record about
    pictures 1 and 2 joins the records about either). A record whose pictures no record shows with
    another is keyed by its picture ("media PATH"); one of a group joined so, by the group's first
    picture in path order; a record without any, by its place in the input (decided at once).

    The records are written first and split after (`split`), a group being known only at the end;
    memory: a byte per record, and the pictures of the records that show several."""

    def __init__(self, is_held: Callable[[str | int], bool]) -> None:
        self.is_held = is_held
        self.parent: dict[str, str] = {}  # union-find over the pictures of records showing several
        self.marks = bytearray()  # per written record: 0 / 1 its side, decided; 2 keyed by its pictures, later

    def _root(self, m: str) -> str:
        while self.parent[m] != m:
            self.parent[m] = self.parent[self.parent[m]]
            m = self.parent[m]
        return m

    def add(self, pictures: list[str], position: int) -> None:
        """The next written record: its pictures (as written), its place in the input."""
        if not pictures:
            self.marks.append(int(self.is_held(position)))
            return
        self.marks.append(2)
        if len(pictures) > 1:
            for m in pictures:
                self.parent.setdefault(m, m)
            for m in pictures[1:]:
                a, b = self._root(pictures[0]), self._root(m)
                if a != b:
                    self.parent[max(a, b)] = min(a, b)  # a root is its group's first picture in path order

    def split(self, path: Path, held_path: Path) -> int:
        """Move the held-out records of the written file `path` (one line each, in `add`'s order) to
        `held_path`; returns how many."""
        kept, n = path.with_name(path.name + ".kept"), 0
        try:
            with open(path, encoding="utf-8") as lines, open(kept, "w", encoding="utf-8") as train, \
                    open(held_path, "w", encoding="utf-8") as held:
                for k, line in enumerate(lines):
                    side = self.marks[k]
                    if side == 2:
                        first = _pictures_of(json.loads(line))[0]
                        side = self.is_held(f"media {self._root(first) if first in self.parent else first}")
                    n += side
                    (held if side else train).write(line)
            os.replace(kept, path)
        finally:
            kept.unlink(missing_ok=True)
        return n


def _pictures_of(record: dict) -> list[str]:
    """A written record's images, then its video, as written."""
    return [m for k in ("image", "video") for m in _media_of(record.get(k))]


def _media_of(value: Any) -> list[str]:
    """The paths of a written record's `image` / `video` field (a path or a list of them)."""
    if isinstance(value, str):
        return [value]
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _drop_held_out(val_out: Path) -> None:
    """Remove the held-out file an earlier run wrote beside this output (listed in its meta_val.json)."""
    meta_path = val_out.parent / "meta_val.json"
    meta = read_meta_entries(meta_path)
    entry = meta.get(val_out.stem)
    if isinstance(entry, dict) and entry.get("annotation") == val_out.name and entry.get("root") == "":
        meta.pop(val_out.stem)
        val_out.unlink(missing_ok=True)
        write_meta_entries(meta_path, meta)


def held_out(seed: int, key: int | str, fraction: float) -> bool:
    """Whether a record goes to the validation set: a hash of (seed, key) below `fraction`, so the split is
    the same every run and on every machine. The key: the record's picture group (PictureGroups), else
    its position in the input."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction
