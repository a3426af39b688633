"""Questions with (optional) ground truth for the pipelines, and sampling many responses to them."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nativevl.data.images import load_image
from nativevl.data.processor import chat_inputs
from nativevl.data.template import IMAGE_PLACEHOLDER, has_image_markup, normalize_turns  # noqa: F401 (re-export)
from nativevl.data.toyworld.tasks import example, final_answer, normalize, verify
from nativevl.infer.generate import generate_texts

log = logging.getLogger(__name__)


@dataclass
class Question:
    question: str  # user text, with <image> placeholders where the images go
    images: list  # PIL images or arrays
    answer: str | None = None  # ground truth (a reference response or just the answer)
    family: str = ""  # a toy-world family: its verifier; "" = answer matching
    image_paths: list[str] = field(default_factory=list)  # where the images already live, if on disk

    def is_correct(self, response: str) -> bool:
        """Toy verifier, else the final answer (or the whole text) after normalisation."""
        if self.answer is None:
            raise ValueError("this question has no ground truth to verify against")
        if self.family:
            return verify(self.family, response, self.answer)
        want = final_answer(self.answer) or normalize(self.answer)
        if final_answer(self.answer) is not None:
            got = final_answer(response)
        else:  # a bare reference answer: a worked response's final answer, else its whole text
            got = final_answer(response) or normalize(response)
        return got is not None and got == want


def toyworld_questions(family: str, seed: int, n: int, size: int = 96) -> list[Question]:
    out = []
    for i in range(n):
        ex = example(family, seed, i, size)
        out.append(Question(ex.question, [Image.fromarray(im) for im in ex.images], ex.answer, family))
    return out


def jsonl_questions(path: str | Path, root: str | Path | None = None, limit: int | None = None,
                    max_bad_images: float = 0.05) -> list[Question]:
    """InternVL conversation records: the first human turn is the question, the gpt turn that answers it
    (if any) the ground truth; image paths are relative to `root` (default: the file's folder). Records are
    read (and their images loaded) until `limit` questions are kept.

    A question is asked without history (MMPR's format holds one question), so the later exchanges of a
    multi-turn record are not used, and a record's system turn gives way to the pipeline's system message;
    both are counted and logged. A record whose image is missing or unreadable is skipped, counted and
    named in the log; more than `max_bad_images` of the records read so is an error."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    out = []
    later_turns = with_system = 0
    bad_images: list[str] = []
    # only "\n" ends a record: str.splitlines would also split at U+2028, U+0085 ... inside strings
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").split("\n"), 1):
        if not line.strip():
            continue
        if limit is not None and len(out) >= limit:
            break
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{lineno}: a record must be a JSON object, got {type(rec).__name__}")
        conversations = rec.get("conversations") or []
        try:  # the roles the training loader takes: human/user, gpt/assistant, from/value or role/content
            system, turns = normalize_turns(conversations if isinstance(conversations, list) else [conversations])
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: {e}") from None
        first = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
        if first is None:
            raise ValueError(f"{path}:{lineno}: no human turn to ask")
        question = turns[first][1]
        # the ground truth answers this question: the turn right after it, not the record's last answer
        reply = turns[first + 1][1] if first + 1 < len(turns) and turns[first + 1][0] == "assistant" else None
        more_turns, has_system = any(role == "user" for role, _ in turns[first + 1 :]), system is not None
        image, more = rec.get("image"), rec.get("images")  # either key, as the training loader reads them
        names = image if image not in (None, []) else (more or [])
        names = [names] if isinstance(names, str) else names
        # a number or an object (iterated: its keys) would become a path; "" would be the folder itself
        if not isinstance(names, list) or not all(isinstance(x, str) and x.strip() for x in names):
            raise ValueError(f"{path}:{lineno}: 'image'/'images' must be a file name or a list of file names, "
                             f"got {names!r}")
        n = question.count(IMAGE_PLACEHOLDER)
        if n and n != len(names):
            raise ValueError(f"{path}:{lineno}: {n} {IMAGE_PLACEHOLDER} placeholder(s) but {len(names)} image(s)")
        paths = [str((root / n).resolve()) for n in names]  # absolute: the output jsonl lives elsewhere
        try:
            images = [load_image(p) for p in paths]
        except (OSError, ValueError) as e:  # a missing or unreadable image: this record is skipped
            bad_images.append(f"{path}:{lineno}: {e}")
            continue
        out.append(Question(question, images, reply, "", paths))
        later_turns += more_turns
        with_system += has_system
    if bad_images:
        read = len(out) + len(bad_images)
        log.warning("%s: skipped %d of %d records whose images could not be read, e.g. %s", path, len(bad_images),
                    read, "; ".join(bad_images[:3]))
        if not out or len(bad_images) > max_bad_images * read:
            raise ValueError(f"{path}: {len(bad_images)} of {read} records name images that cannot be read (more "
                             f"than {max_bad_images:.0%}), e.g. {bad_images[0]}")
    if later_turns:
        log.warning("%s: %d of %d records have more than one question; only the first question and its answer "
                    "are used", path, later_turns, len(out))
    if with_system:
        log.warning("%s: %d of %d records carry a system turn; questions are asked with the pipeline's system "
                    "message (`data ... --system`) instead", path, with_system, len(out))
    return out


def messages(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


@torch.no_grad()
def sample_responses(
    model,
    tokenizer,
    prompts: list[tuple[str, list, str]],
    n: int,
    *,
    temperature: float = 0.7,
    top_k: int = 50,
    max_new_tokens: int = 256,
    seed: int = 0,
    batch_rows: int = 64,
    system_message: str | None = None,
    desc: str = "sampling",
) -> list[list[str]]:
    """n sampled continuations of each (question, images, assistant prefix) prompt.

    The assistant prefix (a partial response) is appended after the generation prompt; the returned
    texts are the continuations only. Rows of all prompts are batched together, `batch_rows` at a time.
    """
    cfg = model.config
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = []
    tiled: dict = {}  # one tiling per question: its many step prefixes share the tensor (not a copy each)
    for question, images, prefix in prompts:
        key = (question, id(images))
        if key not in tiled:
            tiled[key] = chat_inputs(tokenizer, messages(question), images, image_size=cfg.vision.image_size,
                                     image_seq_length=cfg.image_seq_length, system_message=system_message)
        ids, tiles = tiled[key]
        if prefix:
            ids = ids + tokenizer(prefix, add_special_tokens=False).input_ids
        rows += [(ids, tiles)] * n
    gen = torch.Generator(device=model.device).manual_seed(seed)
    texts = generate_texts(model, tokenizer, rows, batch_size=batch_rows, max_new_tokens=max_new_tokens, desc=desc,
                           do_sample=temperature > 0, temperature=max(temperature, 1e-5), top_k=top_k,
                           eos_token_id=end, generator=gen)
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


def write_records(out: Path, questions: list[Question], records) -> None:
    """(question index, record) pairs as jsonl at `out`, each record given its question's images (saved
    once per question beside `out`, named after it). Written to a temporary sibling, then renamed over
    `out`: a failure part-way (a full disk) leaves the previous complete file, not a truncated one."""
    images: dict[int, list[str]] = {}

    def with_images(qi: int, rec: dict) -> dict:
        if qi not in images:
            images[qi] = save_images(questions[qi], out.parent, f"{out.stem}-q{qi}")
        if images[qi]:
            rec["image"] = images[qi] if len(images[qi]) > 1 else images[qi][0]
        return rec

    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(with_images(qi, rec)) + "\n" for qi, rec in records)
    os.replace(tmp, out)


def save_images(q: Question, folder: Path, name: str) -> list[str]:
    """The question's images as PNG files under folder (paths relative to it); existing paths are kept.
    `name` should be unique to the output file (its stem) and question: two runs into one folder must
    not overwrite each other's images."""
    if q.image_paths:
        return q.image_paths
    names = []
    for k, im in enumerate(q.images):
        rel = f"images/{name}-{k}.png"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im))).save(folder / rel)
        names.append(rel)
    return names
