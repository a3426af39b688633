"""`nativevl data validate META`: read a whole dataset and report every bad record by kind."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from tqdm import tqdm

from nativevl.data import images as img
from nativevl.data.pipeline import DataConfig
from nativevl.data.records import PROBLEMS, Annotation, DatasetSpec, RecordError, parse_record
from nativevl.data.samples import build_samples


@dataclass
class ValidationReport:
    """Bad records counted by kind, with the first examples of each (also `data convert`'s summary)."""

    kinds: ClassVar[tuple[str, ...]] = PROBLEMS
    records: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def bad(self) -> int:
        return sum(self.counts.values())

    def add(self, error: RecordError, keep: int) -> None:
        self.counts[error.kind] = self.counts.get(error.kind, 0) + 1
        shown = self.examples.setdefault(error.kind, [])
        if len(shown) < keep:
            shown.append(str(error))

    def headline(self) -> str:
        return f"{self.records} records, {self.bad} bad ({self.bad / max(1, self.records):.1%})"

    def format(self) -> str:
        lines = [self.headline()]
        for kind in self.kinds:
            if kind in self.counts:
                lines.append(f"  {kind}: {self.counts[kind]}")
                lines += [f"    e.g. {example}" for example in self.examples[kind]]
        return "\n".join(lines)


def validate(specs: list[DatasetSpec], tokenizer=None, cfg: DataConfig | None = None, examples: int = 3) -> ValidationReport:
    """Check every record of every dataset. Without a tokenizer, token lengths are not checked."""
    cfg = cfg or DataConfig(training=False)
    report = ValidationReport()
    for spec in specs:
        annotation = Annotation(spec)
        if len(annotation) == 0:
            report.add(RecordError("malformed", f"{spec.name}: {spec.annotation} holds no records"), examples)
        for i in tqdm(range(len(annotation)), desc=spec.name, unit="rec", leave=False):
            report.records += 1
            lineno, raw = annotation[i]
            try:
                record = parse_record(raw, spec, f"{spec.name}:{spec.annotation.name}:{lineno}")
                if tokenizer is not None:  # preference records too: their pair must fit a pack
                    build_samples(record, tokenizer, cfg, index=i)
                else:  # every file decoded as the pipeline will (a video's frames at test-time spacing)
                    loads = [lambda p=path: img.load_image(p) for path in record.images]
                    if record.video is not None:
                        loads.append(lambda v=record.video: img.load_video_frames(v, min_frames=cfg.min_frames,
                                                                                  max_frames=cfg.max_frames))
                    for load in loads:
                        try:
                            load()
                        except FileNotFoundError as e:
                            raise RecordError("missing_file", f"{record.source}: {e}") from None
                        except ValueError as e:
                            raise RecordError("unreadable_image", f"{record.source}: {e}") from None
            except RecordError as e:
                report.add(e, examples)
    return report
