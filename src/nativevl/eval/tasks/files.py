"""Evaluation sets read from files: `nativevl eval --tasks PATH.tsv,PATH.jsonl`.

- `.tsv`: VLMEvalKit's benchmark format (MMBench, MMStar, AI2D, ScienceQA, SEED-Bench, ... and open-answer
  sets such as TextVQA or ChartQA): one row per question with `index`, `question`, an optional `hint`,
  option columns `A`, `B`, ... for multiple choice, `answer`, `image` (base64; a short value names the
  row whose image it shares; a JSON list of base64 strings for several images) or `image_path`, and an
  optional `category`.
- `.jsonl`: InternVL conversation records, a custom set: the first human turn is the question (with
  `<image>` placeholders), the gpt turn after it the answer; images relative to the file's folder.

Multiple choice (option columns, or an answer that is one option letter of a question listing its
options as `A. ...` lines): the prediction's option letter must equal the answer's (a bare letter,
"(B)", "B. text", "The answer is B", or the text of exactly one option). Open answers: equal after
normalisation (case, punctuation, articles, spacing) to the answer or to any answer of a JSON / Python
list of answers, numbers within 5% (ChartQA's relaxed accuracy). MMBench's circular evaluation (every
rotation of the options) is not run: each row is asked once, as written.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from nativevl.data.images import load_image
from nativevl.data.template import IMAGE_PLACEHOLDER

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
OPEN_INSTRUCTION = "Answer the question using a single word or phrase."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_MISSING = {"", "nan", "NaN", "None", "none", "null"}


@dataclass
class FileItem:
    question: str  # the prompt text, <image> placeholders where the images go
    answer: str  # a letter for multiple choice, else the reference (or a list of them, as written)
    images: list = field(default_factory=list)
    kind: str = ""  # the category: chance is measured per category
    options: dict[str, str] = field(default_factory=dict)  # letter -> option text; {} for open answers
    index: str = ""


def _present(value) -> bool:
    return value is not None and str(value).strip() not in _MISSING


def normalize_answer(text: str) -> str:
    text = text.strip().lower()
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,000 -> 1000
    text = re.sub(r"[^\w\s.%-]", " ", text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split()).strip(" .")


def _number(text: str) -> float | None:
    m = re.fullmatch(r"-?\d+(?:\.\d+)?%?", text)
    if not m:
        return None
    return float(text.rstrip("%")) / (100 if text.endswith("%") else 1)


def reference_answers(answer: str) -> list[str]:
    """The acceptable answers: a JSON or Python list as written in the file, else the one answer."""
    text = answer.strip()
    if text.startswith("["):
        for parse in (json.loads, ast.literal_eval):
            try:
                value = parse(text)
            except (ValueError, SyntaxError):
                continue
            if isinstance(value, list) and value:
                return [str(v) for v in value]
    return [answer]


def open_answer_correct(prediction: str, answer: str) -> bool:
    got = normalize_answer(prediction.strip().splitlines()[0] if prediction.strip() else "")
    for ref in reference_answers(answer):
        want = normalize_answer(ref)
        if got == want:
            return True
        a, b = _number(got), _number(want)
        if a is not None and b is not None and (abs(a - b) <= 0.05 * abs(b) if b else a == 0):
            return True
    return False


def option_letter(prediction: str, options: dict[str, str]) -> str | None:
    """The option a prediction picks, or None when it names none (or several by text)."""
    text = prediction.strip()
    letters = "".join(options)
    # letters as capitals only: "a" in "a cat" is an article, not option A
    patterns = [rf"^\(?([{letters}])\)?(?:[.:)\s]|$)",  # "B", "(B)", "B.", "B) ...", "B text"
                rf"(?i:answer)(?: is|:)?\s*\(?([{letters}])\)?(?:[.:)\s]|$)",  # "The answer is B", "Answer: (B)"
                rf"^(?i:option)\s+\(?([{letters}])\)?(?:[.:)\s]|$)"]
    for pattern in patterns:
        m = re.search(pattern, text)
        if m:
            return m.group(1)
    got = normalize_answer(text)
    named = [k for k, v in options.items() if normalize_answer(v) == got]
    return named[0] if len(named) == 1 else None


def _options_in_text(question: str) -> dict[str, str]:
    """`A. text` lines of a question that lists its options."""
    found = dict(re.findall(r"^\(?([A-Z])[.)]\s+(.+)$", question, flags=re.MULTILINE))
    return found if len(found) >= 2 and "A" in found else {}


def _decode_image(value: str, where: str):
    try:
        return load_image(base64.b64decode(value, validate=False))
    except (binascii.Error, ValueError, OSError) as e:
        raise ValueError(f"{where}: the image is not a readable base64 picture ({e})") from None


def read_tsv(path: Path, limit: int) -> list[FileItem]:
    csv.field_size_limit(sys.maxsize)  # base64 images are longer than csv's default field limit
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        raise ValueError(f"{path}: no rows")
    columns = set(rows[0])
    missing = {"question", "answer"} - columns
    if missing:
        raise ValueError(f"{path}: a benchmark TSV needs the columns question and answer; missing {sorted(missing)} "
                         f"(has {sorted(columns)})")
    by_index = {str(r.get("index")): r for r in rows}
    items = []
    for lineno, row in enumerate(rows[:limit], 2):
        where = f"{path}:{lineno}"
        options = {k: str(row[k]).strip() for k in LETTERS if k in row and _present(row[k])}
        raw = row.get("image")
        images = []
        if _present(raw):
            if len(raw) <= 64 and raw in by_index:  # this row shares another row's image
                raw = by_index[raw].get("image")
            values = json.loads(raw) if raw.lstrip().startswith("[") else [raw]
            images = [_decode_image(v, where) for v in values]
        elif _present(row.get("image_path")):
            paths = row["image_path"]
            paths = json.loads(paths) if paths.lstrip().startswith("[") else [paths]
            images = [load_image(path.parent / p) for p in paths]
        question = str(row["question"]).strip()
        if _present(row.get("hint")):
            question = f"{str(row['hint']).strip()}\n{question}"
        if options:
            question += "".join(f"\n{k}. {v}" for k, v in options.items()) + "\n" + MC_INSTRUCTION
            answer = str(row["answer"]).strip().upper()
            if answer not in options:
                raise ValueError(f"{where}: the answer {row['answer']!r} is not one of the options {sorted(options)}")
        else:
            question += "\n" + OPEN_INSTRUCTION
            answer = str(row["answer"]).strip()
        if IMAGE_PLACEHOLDER not in question:
            question = f"{IMAGE_PLACEHOLDER}\n" * len(images) + question
        kind = next((str(row[c]) for c in ("category", "l2-category", "split") if _present(row.get(c))), "")
        items.append(FileItem(question, answer, images, kind, options, str(row.get("index", lineno - 2))))
    return items


def read_jsonl(path: Path, limit: int) -> list[FileItem]:
    from nativevl.pipelines.questions import jsonl_questions

    items = []
    for i, q in enumerate(jsonl_questions(path, limit=limit)):
        if q.answer is None:
            raise ValueError(f"{path}: question {i + 1} has no answer (a gpt turn after the human turn) to score against")
        options = _options_in_text(q.question)
        answer = q.answer.strip()
        letter = re.fullmatch(r"\(?([A-Z])\)?\.?", answer)
        if options and letter and letter.group(1) in options:
            answer = letter.group(1)
        else:
            options = {}
        items.append(FileItem(q.question, answer, q.images, "", options, str(i)))
    return items


@dataclass(frozen=True)
class FileTask:
    """An evaluation set from a file; `max_num` tiles per image (dynamic resolution, as InternVL's
    evaluations tile: 6 by default here)."""

    name: str
    max_num: int = 6

    @property
    def path(self) -> Path:
        return Path(self.name)

    @property
    def max_new_tokens(self) -> int:
        return 64

    def load(self, n: int, seed: int) -> list[FileItem]:
        """The file's first n questions (the seed does not apply: a file is its own order)."""
        if not self.path.is_file():
            raise FileNotFoundError(f"evaluation file {self.path} does not exist")
        items = read_tsv(self.path, n) if self.path.suffix == ".tsv" else read_jsonl(self.path, n)
        if not items:
            raise ValueError(f"{self.path}: no questions")
        return items

    def prompt(self, item: FileItem) -> tuple[list[dict[str, str]], list]:
        return [{"role": "user", "content": item.question}], item.images

    def score(self, prediction: str, item: FileItem) -> bool:
        if item.options:
            return option_letter(prediction, item.options) == item.answer
        return open_answer_correct(prediction, item.answer)

    def chance(self, items: list[FileItem]) -> float:
        """A uniform guess among the options for multiple choice; for open answers the most frequent
        answer of each category, as for the toy tasks."""
        by_kind: dict[str, dict[str, int]] = {}
        total = 0.0
        for it in items:
            if it.options:
                total += 1 / len(it.options)
            else:
                counts = by_kind.setdefault(it.kind, {})
                key = normalize_answer(reference_answers(it.answer)[0])
                counts[key] = counts.get(key, 0) + 1
        total += sum(max(c.values()) for c in by_kind.values())
        return total / max(1, len(items))
