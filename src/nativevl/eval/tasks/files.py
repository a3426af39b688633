"""Evaluation sets read from files: `nativevl eval --tasks PATH.tsv,PATH.jsonl`.

- `.tsv`: VLMEvalKit's benchmark format (MMBench, MMStar, AI2D, ScienceQA, SEED-Bench, ... and open-answer
  sets such as TextVQA or ChartQA): one row per question with `index`, `question`, an optional `hint`,
  option columns `A`, `B`, ... for multiple choice, `answer`, `image` (base64; a short value names the
  row whose image it shares; a JSON list of base64 strings for several images) or `image_path`, and an
  optional `category`.
- `.jsonl`: InternVL conversation records, a custom set: the first human turn is the question (with
  `<image>` placeholders), the gpt turn after it the answer; images relative to the file's folder. A
  video record (`"video": file`, `<video>` in the question) is asked as InternVL asks a video: `num_frames`
  frames (default 8) at the centres of equal segments, one tile each, "Frame1: <image>\n..." in place of
  `<video>` (before the question when it has none).

Multiple choice (option columns, or an answer that is one option letter of a question listing its
options as `A. ...` lines): the prediction's option letter must equal the answer's (a bare letter,
"(B)", "B. text", "The answer is B"; none when it names several, see `option_letter`, or the text of
exactly one option). Open answers: equal after
normalisation (case, punctuation, articles, spacing) to the answer or to any answer of a JSON / Python
list of answers, numbers within 5% for ChartQA files (relaxed accuracy); files named as VLMEvalKit
names DocVQA / InfoVQA are scored by ANLS, TextVQA / VQAv2 / OK-VQA by VQA accuracy (partial credit),
OCRBench by its answer-in-prediction rule and MMMU's questions without options by theirs, see
`FileTask.metric`. Prompts are those InternVL's VLMEvalKit model builds (`internvl_prompt`). Files
VLMEvalKit evaluates circularly (names holding MMBench, CCBench, "circular" or MMCR) are scored as it
scores them: the rows of one question with its options rotated (index i + k * 1,000,000 beside the
original row i) form a group, right only when every rotation is
answered right; `--n` counts such questions, each with all its rotations.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from nativevl.data.images import VideoClip, load_image, load_video_frames, tiles_per_image
from nativevl.data.template import IMAGE_PLACEHOLDER, video_prefix, with_video
from nativevl.eval.tasks.base import EvalTask

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
OPEN_INSTRUCTION = "Answer the question using a single word or phrase."
# InternVL's VLMEvalKit prompts: Chinese questions get Chinese instructions; an MMMU question without
# options is asked to be answered directly
MC_INSTRUCTION_CN = "请直接回答选项字母。"
DIRECT_INSTRUCTION, DIRECT_INSTRUCTION_CN = "Answer the question directly.", "请直接回答问题。"
CHINESE = re.compile("[\u4e00-\u9fff]")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
CIRCULAR_NAMES = ("mmbench", "ccbench", "circular", "mmcr")  # VLMEvalKit's rule for circular evaluation
ROTATION = 1_000_000  # a rotated copy of question i has index i + k * ROTATION
# InternVL's VLMEvalKit model: tiles per image by the set's name (else 6), 64 at most over a question
VLMEVALKIT_MAX_NUM = (
    (12, ("ChartQA_TEST", "MMMU_DEV_VAL", "MMMU_TEST", "MME-RealWorld", "VCR_EN", "VCR_ZH", "OCRVQA", "BMMR")),
    (18, ("DocVQA_VAL", "DocVQA_TEST", "DUDE", "MMLongBench_DOC", "SLIDEVQA")),
    (24, ("InfoVQA_VAL", "InfoVQA_TEST", "OCRBench", "HRBench4K", "HRBench8K")),
)
VLMEVALKIT_TOTAL_TILES = 64
DEFAULT_FRAMES = 8  # frames of a video question, as InternVL's chat examples take them
# what pandas (and so VLMEvalKit) reads as a missing value: an option spelled "None" is missing there too
_MISSING = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
            "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}


@dataclass
class FileItem:
    question: str  # the prompt text, <image> placeholders where the images go
    answer: str  # a letter for multiple choice, else the reference (or a list of them, as written)
    sources: list = field(default_factory=list)  # base64 strings, paths or PIL images: decoded when asked for
    kind: str = ""  # the category: chance is measured per category
    options: dict[str, str] = field(default_factory=dict)  # letter -> option text; {} for open answers
    index: str = ""
    where: str = ""  # file:line, for errors
    video: str | None = None  # a video question's file (its frames are read when it is asked)

    @property
    def images(self) -> list:
        """The pictures, decoded now (a rank decodes only the questions it asks; none are kept)."""
        return [_decode_image(s, self.where) if isinstance(s, str) else load_image(s) for s in self.sources]


def _present(value) -> bool:
    return value is not None and str(value).strip() not in _MISSING


def normalize_answer(text: str) -> str:
    text = text.strip().lower()
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,000 -> 1000
    text = re.sub(r"[^\w\s.%-]", " ", text)
    kept = re.sub(r"\b(a|an|the)\b", " ", text)
    text = kept if kept.strip(" .") else text  # "A" or "the" alone is the answer, not an article
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


def _first_line(prediction: str) -> str:
    """A prediction's answer as scored and voted on: its first line, normalised."""
    return normalize_answer(prediction.strip().splitlines()[0] if prediction.strip() else "")


def open_answer_correct(prediction: str, answer: str, relaxed: bool = False) -> bool:
    """The prediction's first line equals one of the references after normalisation; with `relaxed`
    (ChartQA), numbers within 5% of a numeric reference count too. An empty prediction never does."""
    got = _first_line(prediction)
    if not got:
        return False
    for ref in reference_answers(answer):
        want = normalize_answer(ref)
        if got == want:
            return True
        a, b = _number(got), _number(want)
        if relaxed and a is not None and b is not None and (abs(a - b) <= 0.05 * abs(b) if b else a == 0):
            return True
    return False


# words that follow the letter A, never the article a ("A or B", "A is right")
_NOT_AFTER_ARTICLE = "or|and|nor|is|are|was|were|seems|looks|because|since|then|would|should|could|might|must|will|can|fits"


def option_letter(prediction: str, options: dict[str, str]) -> str | None:
    """The one option a prediction picks, or None when it picks none or several.

    In order: it starts with a letter ("B", "(B)", "B. A red car", "B) ...": an explicit choice, even
    when an option's text is itself a letter, as AI2D's diagram labels are); the whole first line is one
    option's text; once the options' own texts are taken out (an option may say "A red car" or
    "Vitamin C"), exactly one capital option letter stands alone in what is left (an "A" before a
    lower-case word is the article: "A cat sits"); with several ("B is wrong, the answer is C"), an
    explicit "answer is X" / "option X" that no other option letter follows ("The answer is A or B"
    picks none); with no letter at all, the one option whose text the prediction names."""
    text = prediction.strip()
    letters = "".join(options)
    lead = re.match(rf"\(?([{letters}])(?:[.):]|\s*$)", text)
    if lead:
        return lead.group(1)
    got = _first_line(text)
    named = [k for k, v in options.items() if normalize_answer(v) == got]
    if got and len(named) == 1:
        return named[0]
    said = r"(?i:answer|option)(?:\s+(?i:is))?\s*:?\s*\(?"
    # an A before a lower-case word is the article ("A cat sits"), unless it is what the answer is said to be
    rest = re.sub(rf"(?<![A-Za-z])A(?=\s+(?!(?:{_NOT_AFTER_ARTICLE})\b)[a-z])",
                  lambda m: m.group(0) if re.search(said + "$", text[: m.start()]) else "a", text)
    for value in sorted(options.values(), key=len, reverse=True):
        if len(value) > 1:
            rest = re.sub(re.escape(value), " ", rest, flags=re.IGNORECASE)
    words = f" {normalize_answer(text)} "
    mentioned = {k for k, v in options.items() if len(v) > 1 and normalize_answer(v)
                 and f" {normalize_answer(v)} " in words}

    def alone(s: str) -> list[str]:
        return re.findall(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", s)

    found = alone(rest)
    if len(set(found)) == 1:
        return found[0]
    stated = list(re.finditer(rf"{said}([{letters}])(?![A-Za-z])", rest))
    if found and stated and not alone(rest[stated[-1].end():]):
        return stated[-1].group(1)
    if not found and len(mentioned) == 1:
        return mentioned.pop()
    return None


_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"])}


def _vqa_normalize(text: str) -> str:
    """VQA's answer processing, in short: normalise_answer plus number words as digits."""
    return " ".join(_NUMBER_WORDS.get(w, w) for w in normalize_answer(text).split())


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy: with the annotators' answers (10 in VQAv2 / TextVQA), the mean over leaving each
    one out of min(1, matches among the others / 3); with fewer than 3 answers, a match with any."""
    got = _vqa_normalize(prediction.strip().splitlines()[0] if prediction.strip() else "")
    if not got:
        return 0.0
    refs = [_vqa_normalize(a) for a in answers]
    if len(refs) < 3:
        return float(got in refs)
    hits = [r == got for r in refs]
    return sum(min(1.0, (sum(hits) - h) / 3) for h in hits) / len(refs)


def ocrbench_correct(prediction: str, answers: list[str], category: str) -> bool:
    """OCRBench's rule: some answer occurs in the prediction, both lower-cased with newlines as spaces;
    for handwritten mathematical expressions case is kept and every space and newline removed."""
    if category == "Handwritten Mathematical Expression Recognition":
        squash = lambda t: t.strip().replace("\n", " ").replace(" ", "")
        return any(squash(a) in squash(prediction) for a in answers)
    squash = lambda t: t.lower().strip().replace("\n", " ")
    return any(squash(a) in squash(prediction) for a in answers)


def _levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """DocVQA's Average Normalized Levenshtein Similarity for one question: the best over the answers of
    1 - edit distance / longer length (case and outer spaces ignored), 0 below `threshold`."""
    got = " ".join(prediction.strip().lower().split())
    best = 0.0
    for ref in answers:
        want = " ".join(ref.strip().lower().split())
        if not got and not want:
            continue
        sim = 1 - _levenshtein(got, want) / max(len(got), len(want))
        best = max(best, sim if sim >= threshold else 0.0)
    return best


def options_in_text(question: str) -> dict[str, str]:
    """`A. text` lines of a question that lists its options."""
    found = dict(re.findall(r"^\(?([A-Z])[.)]\s+(.+)$", question, flags=re.MULTILINE))
    return found if len(found) >= 2 and "A" in found else {}


def _decode_image(value: str, where: str):
    try:
        return load_image(base64.b64decode(value, validate=False))
    except (binascii.Error, ValueError, OSError) as e:
        raise ValueError(f"{where}: the image is not a readable base64 picture ({e})") from None


def _check_image(value: str, where: str) -> None:
    """The picture's header read (not its pixels): a broken image fails when the file is read, not an
    hour into the evaluation."""
    try:
        with Image.open(io.BytesIO(base64.b64decode(value, validate=False))):
            pass
    except (binascii.Error, ValueError, OSError) as e:
        raise ValueError(f"{where}: the image is not a readable base64 picture ({e})") from None


def _image_list(raw: str, where: str) -> list:
    if not raw.lstrip().startswith("["):
        return [raw]
    try:
        values = json.loads(raw)
    except json.JSONDecodeError as e:
        try:  # VLMEvalKit reads the column with eval: TSVs written from pandas hold Python lists
            values = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise ValueError(f"{where}: the image list is neither JSON nor a Python list ({e})") from None
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{where}: the image list must be a list of strings")
    return values


def _names_row(image) -> bool:
    """A short `image` value is another row's index (VLMEvalKit writes a repeated image once)."""
    return _present(image) and len(image) <= 64 and not image.lstrip().startswith("[")


def _group(index: str, where: str) -> int:
    try:
        return int(float(index)) % ROTATION
    except ValueError:
        raise ValueError(f"{where}: circular evaluation needs integer indexes, got {index!r}") from None


def _is_question(index: str) -> bool:
    """A question's own row, not one of its rotations (index below 1,000,000)."""
    return int(float(index)) < ROTATION


def read_tsv(path: Path, limit: int | None, circular: bool = False) -> list[FileItem]:
    """The first `limit` rows (all with None), read in one pass that keeps those rows and, of the rows
    after them, only the images they share (`--n 100` of a 4 GB file holds 100 rows, not the file).
    `circular`: the first `limit` questions (rows with index < 1,000,000) and every rotated copy of
    them, wherever it is in the file (the whole file is read, its other rows dropped)."""
    csv.field_size_limit(sys.maxsize)  # base64 images are longer than csv's default field limit
    if circular and limit is not None:
        return _read_circular(path, limit)
    kept: list[tuple[int, dict]] = []
    shared: dict[str, str] = {}  # index -> image of every row read so far or needed later
    wanted: set[str] = set()
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = _tsv_reader(f, path)
        for lineno, row in enumerate(reader, 2):
            index, image = str(row.get("index")), row.get("image")
            if limit is None or len(kept) < limit:
                kept.append((lineno, row))
                if _names_row(image):
                    wanted.add(image)
                elif _present(image):
                    shared[index] = image
            elif index in wanted and index not in shared and _present(image):
                shared[index] = image
            if limit is not None and len(kept) >= limit and wanted <= shared.keys():
                break
    if not kept:
        raise ValueError(f"{path}: no rows")
    return [_tsv_item(path, lineno, row, shared) for lineno, row in kept]


def file_metric(path: Path) -> str:
    """How open answers are scored, by VLMEvalKit's file names: "anls" (DocVQA, InfoVQA), "vqa"
    (TextVQA, VQAv2, OK-VQA: partial credit from the annotators' answers), "relaxed" (ChartQA: numbers
    within 5%), "ocrbench" (OCRBench.tsv: an answer found in the prediction, see `ocrbench_correct`),
    "mmmu" (MMMU files' questions without options: `mmmu_open_correct`),
    else "exact" (normalised match with any listed answer). Multiple choice: right/wrong."""
    name = path.name.lower()
    if path.stem.lower() == "ocrbench":
        return "ocrbench"
    if "mmmu" in name:
        return "mmmu"
    for prefix, metric in (("docvqa", "anls"), ("infovqa", "anls"), ("textvqa", "vqa"), ("vqav2", "vqa"),
                           ("okvqa", "vqa"), ("ok-vqa", "vqa"), ("chartqa", "relaxed")):
        if name.startswith(prefix):
            return metric
    return "exact"


def _tsv_reader(f, path: Path) -> csv.DictReader:
    reader = csv.DictReader(f, delimiter="\t")
    columns = set(reader.fieldnames or ())
    missing = {"question", "answer"} - columns
    if missing:  # e.g. MMBench's TEST files, which keep their answers to themselves
        raise ValueError(f"{path}: a benchmark TSV needs the columns question and answer; missing "
                         f"{sorted(missing)} (has {sorted(columns)})")
    return reader


def _read_circular(path: Path, limit: int) -> list[FileItem]:
    mains: set[int] = set()
    kept: list[tuple[int, dict]] = []
    pending: dict[int, list[tuple[int, dict]]] = {}  # rotations read before their question's row
    shared: dict[str, str] = {}
    wanted: set[str] = set()
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = _tsv_reader(f, path)
        for lineno, row in enumerate(reader, 2):
            index, image = str(row.get("index")), row.get("image")
            group = _group(index, f"{path}:{lineno}")
            main = _is_question(index)
            keep = group in mains or (main and len(mains) < limit)
            if main and keep:
                mains.add(group)
                early = pending.pop(group, [])
                kept += [(lineno, row), *early]
                wanted.update(r["image"] for _, r in early if _names_row(r.get("image")))
            elif keep:
                kept.append((lineno, row))
            elif not main and len(mains) < limit:
                pending.setdefault(group, []).append((lineno, row))
            if _present(image) and not _names_row(image):
                if keep or index in wanted or (not main and len(mains) < limit):
                    shared[index] = image  # a kept row's image, or one a kept row may name
            if keep and _names_row(image):
                wanted.add(image)
    missing = wanted - shared.keys()
    if missing:  # a named image read before it was known to be needed: read the file once more for them
        with open(path, encoding="utf-8-sig", newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                if str(row.get("index")) in missing and _present(row.get("image")):
                    shared[str(row["index"])] = row["image"]
    if not kept:
        raise ValueError(f"{path}: no rows")
    kept.sort()  # file order
    return [_tsv_item(path, lineno, row, shared) for lineno, row in kept]


def _tsv_item(path: Path, lineno: int, row: dict, shared: dict[str, str]) -> FileItem:
    where = f"{path}:{lineno}"
    options = {k: str(row[k]).strip() for k in LETTERS if k in row and _present(row[k])}
    raw = row.get("image")
    sources: list = []
    if _present(raw):
        if _names_row(raw):  # VLMEvalKit: this row shares the image of the row with that index
            if raw not in shared:
                raise ValueError(f"{where}: the image names index {raw}, which is not a row with an image in the file")
            raw = shared[raw]
        sources = _image_list(raw, where)
        for value in sources:
            _check_image(value, where)
    elif _present(row.get("image_path")):
        sources = [path.parent / p for p in _image_list(row["image_path"], where)]
        for p in sources:
            if not p.is_file():
                raise FileNotFoundError(f"{where}: image file {p} does not exist")
    question = str(row["question"]).strip()
    if _present(row.get("hint")):
        question = f"{str(row['hint']).strip()}\n{question}"
    if not _present(row["answer"]):
        raise ValueError(f"{where}: no answer to score against")
    if options:
        question += "".join(f"\n{k}. {v}" for k, v in options.items())
        question += "\n" + (MC_INSTRUCTION_CN if CHINESE.search(question) else MC_INSTRUCTION)
        answer = str(row["answer"]).strip().upper()
        if answer not in options:
            raise ValueError(f"{where}: the answer {row['answer']!r} is not one of the options {sorted(options)}")
    else:
        if "mmmu" in path.name.lower():
            question += "\n" + (DIRECT_INSTRUCTION_CN if CHINESE.search(question) else DIRECT_INSTRUCTION)
        else:
            question += "\n" + OPEN_INSTRUCTION
        answer = str(row["answer"]).strip()
        if not any(normalize_answer(ref) for ref in reference_answers(answer)) and file_metric(path) not in ("anls", "ocrbench"):
            raise ValueError(f"{where}: the answer {row['answer']!r} is empty once normalised (punctuation only)")
    if IMAGE_PLACEHOLDER not in question:
        question = internvl_prompt(question, len(sources))
    elif question.count(IMAGE_PLACEHOLDER) != len(sources):
        raise ValueError(f"{where}: the question holds {question.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} "
                         f"mark(s) but the row has {len(sources)} image(s)")
    kind = next((str(row[c]) for c in ("category", "l2-category", "split") if _present(row.get(c))), "")
    return FileItem(question, answer, sources, kind, options, str(row.get("index", lineno - 2)), where)


def internvl_prompt(text: str, n_images: int) -> str:
    """The prompt InternVL's VLMEvalKit model builds (its own prompt for every multiple-choice and VQA
    set, then reorganize_prompt): one image, `<image>` and a newline before the text; several,
    `Image-1: <image>` ... one line per image, in the row's order, before the text, which is kept as
    written (MMMU's `<image k>` references included)."""
    if n_images == 0:
        return text
    if n_images == 1:
        return f"{IMAGE_PLACEHOLDER}\n{text}"
    return "".join(f"Image-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(n_images)) + text


# VLMEvalKit's rule-based answer matching (vlmeval/utils/matching_util.py can_infer, as of e8e78f0)
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")
_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def vlmevalkit_choice(prediction: str, choices: dict[str, str]) -> str | None:
    """The option VLMEvalKit reads from a prediction without a judge model: one option letter among the
    last words (punctuation as spaces; "Z" for a refusal), "answer is X", else the one option whose
    text the prediction holds, if the prediction is at most twice the options' total length."""
    if "Failed to obtain answer via API" not in prediction:
        if any(r in prediction for r in _REFUSALS):
            return "Z"
        words = prediction
        for c in ".()[],:;!*#{}":
            words = words.replace(c, " ")
        words = words.split()
        present = [c for c in choices if c in words]
        if len(present) == 1 and words.index(present[0]) > len(words) - 5:
            return present[0]
        if not present and "Z" in words:
            return "Z"
        m = _VERBOSE_ANSWER.search(prediction)
        if m and m.group(1).upper() in choices:
            return m.group(1).upper()
    low = prediction.lower()
    if len(low) > 2 * sum(len(v) for v in choices.values()):
        return None
    found = [k for k, v in choices.items() if v.lower() in low]
    return found[0] if len(found) == 1 else None


def mmmu_open_correct(prediction: str, answer: str) -> bool:
    """VLMEvalKit's MMMU rule for a question without options: the question becomes "A. <answer>,
    B. Other Answers" and is right when VLMEvalKit's matching reads A from the prediction (or reads
    the answer itself when that is one capital letter: its answer map keeps such answers)."""
    target = answer if len(answer) == 1 and answer in LETTERS else "A"
    return vlmevalkit_choice(prediction, {"A": answer, "B": "Other Answers"}) == target


def read_jsonl(path: Path, limit: int | None) -> list[FileItem]:
    from nativevl.pipelines.questions import jsonl_questions

    items = []
    # every question counts: an unreadable image is an error here, not a skipped question
    for i, q in enumerate(jsonl_questions(path, limit=limit, max_bad_images=0, videos=True)):
        if q.answer is None or not q.answer.strip():
            raise ValueError(f"{path}: question {i + 1} has no answer (a gpt turn after the human turn) to score against")
        options = options_in_text(q.question)
        answer = q.answer.strip()
        letter = re.fullmatch(r"\(?([A-Z])\)?\.?", answer)
        if options and letter and letter.group(1) in options:
            answer = letter.group(1)
        else:
            options = {}
        # the images again from their files when the question is asked (the ones read here are dropped)
        items.append(FileItem(q.question, answer, [Path(p) for p in q.image_paths], "", options, str(i),
                              f"{path}: question {i + 1}", q.video))
    return items


@dataclass(frozen=True)
class FileTask(EvalTask):
    """An evaluation set from a file, tiled as `tile_cap` says: up to `max_num` tiles per question
    shared by its images (as `nativevl chat` shares them), or, with max_num None, as InternVL's
    VLMEvalKit model tiles this file."""

    name: str
    max_num: int | None = None
    num_frames: int = DEFAULT_FRAMES  # a video question's frames

    @property
    def vlmevalkit_max_num(self) -> int:
        """InternVL's VLMEvalKit model's tiles per image for this file, by its name (its set_max_num)."""
        for tiles, names in VLMEVALKIT_MAX_NUM:
            if any(n in self.path.stem for n in names):
                return tiles
        return 6

    def tile_cap(self, n_images: int) -> int:
        """Tiles per image of a question with `n_images` images: `max_num` shared by them, or without
        it InternVL's VLMEvalKit setting for this file for each image, at most 64 over all of them."""
        if self.max_num is not None:
            return tiles_per_image(self.max_num, n_images)
        return max(1, min(self.vlmevalkit_max_num, VLMEVALKIT_TOTAL_TILES // max(n_images, 1)))

    @property
    def path(self) -> Path:
        return Path(self.name)

    @property
    def max_new_tokens(self) -> int:
        return 64

    default_n = None  # `nativevl eval` without --n: every question of the file

    def load(self, n: int | None, seed: int) -> list[FileItem]:
        """The file's first n questions, all with None (the seed does not apply: a file is its own order)."""
        if not self.path.is_file():
            raise FileNotFoundError(f"evaluation file {self.path} does not exist")
        items = read_tsv(self.path, n, self.circular) if self.path.suffix == ".tsv" else read_jsonl(self.path, n)
        if self.circular:  # as VLMEvalKit: only rotations of a question the file holds are scored
            questions = {_group(it.index, it.where) for it in items if _is_question(it.index)}
            items = [it for it in items if _group(it.index, it.where) in questions]
        if not items:
            raise ValueError(f"{self.path}: no questions")
        return items

    def prompt(self, item: FileItem) -> tuple[list[dict[str, str]], list]:
        if item.video is not None:
            try:
                frames = load_video_frames(item.video, num_frames=self.num_frames)
            except ValueError as e:
                raise ValueError(f"{item.where}: {e}") from None
            question = with_video(item.question, video_prefix(len(frames)))
            return [{"role": "user", "content": question}], [VideoClip(tuple(frames))]
        images = item.images
        if self.max_num is None and "mmmu" in self.path.name.lower() and images:
            # InternVL's VLMEvalKit model enlarges MMMU's first image twice (bilinear) before tiling it
            first = images[0]
            images = [first.resize((first.width * 2, first.height * 2), Image.BILINEAR), *images[1:]]
        return [{"role": "user", "content": item.question}], images

    @property
    def metric(self) -> str:
        return file_metric(self.path)

    @property
    def circular(self) -> bool:
        """VLMEvalKit evaluates files with these names circularly (its ImageMCQDataset.evaluate)."""
        return self.path.suffix == ".tsv" and any(k in self.path.name.lower() for k in CIRCULAR_NAMES)

    def groups(self, items: list[FileItem]) -> list[list[int]]:
        """Positions of the items of each question, in order of its first row: one item each, or a
        question and its rotations for a circular file."""
        if not self.circular:
            return [[i] for i in range(len(items))]
        by_group: dict[int, list[int]] = {}
        for i, it in enumerate(items):
            by_group.setdefault(_group(it.index, it.where), []).append(i)
        return list(by_group.values())

    def group_records(self, records: list[dict], items: list[FileItem], keys: tuple[str, ...] = ("correct",)) -> list[dict]:
        """Per-row records (in the order of `items`) -> one per question of a circular file: right (each of
        `keys`: a Best-of-N record's methods) only when every rotation is."""
        out = []
        for rows in self.groups(items):
            members = [records[i] for i in rows]
            main = next((records[i] for i in rows if _is_question(items[i].index)), members[0])
            record = {"index": len(out), "question": "+".join(r["question"] for r in members), "answer": main["answer"]}
            if "prediction" in main:
                record["prediction"] = main["prediction"]
            record.update({key: all(bool(r[key]) for r in members) for key in keys})
            out.append({**record, "rows": members})
        return out

    @property
    def binary(self) -> bool:
        """Scores are right / wrong (what paired tests and Best-of-N picks need), not partial credit."""
        return self.metric not in ("anls", "vqa")

    def score(self, prediction: str, item: FileItem) -> bool | float:
        if item.options:
            return option_letter(prediction, item.options) == item.answer
        if self.metric == "anls":
            return anls(prediction, reference_answers(item.answer))
        if self.metric == "vqa":
            return vqa_accuracy(prediction, reference_answers(item.answer))
        if self.metric == "ocrbench":
            return ocrbench_correct(prediction, reference_answers(item.answer), item.kind)
        if self.metric == "mmmu":
            return mmmu_open_correct(prediction, item.answer)
        return open_answer_correct(prediction, item.answer, self.metric == "relaxed")

    def vote_key(self, prediction: str, item: FileItem):
        """What Best-of-N's majority vote groups by: the option picked, or the normalised first line; None
        (no vote) when no option is read or the line is empty."""
        if item.options:
            letter = option_letter(prediction, item.options)
            return ("option", letter) if letter is not None else None
        line = _first_line(prediction)
        return ("text", line) if line else None

    def chance(self, items: list[FileItem], seed: int = 0) -> float:  # a file is its own questions: no seed
        """A uniform guess among the options for multiple choice; for open answers the most frequent
        answer of each category, as for the toy tasks."""
        if self.circular:  # every rotation right by chance
            return sum(math.prod(1 / len(items[i].options) if items[i].options else 0.0 for i in rows)
                       for rows in self.groups(items)) / max(1, len(self.groups(items)))
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
