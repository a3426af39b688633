"""Questions with (optional) ground truth for the pipelines, and sampling many responses to them."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from nativevl.data.images import VideoClip, frame_tiles, load_image, load_video_frames, pixel_digest
from nativevl.data.processor import chat_inputs
from nativevl.data.template import (  # noqa: F401 (has_image_markup: re-exported)
    IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
    has_image_markup,
    normalize_turns,
    video_prefix,
    with_video,
)
from nativevl.data.toyworld.tasks import example, final_answer, final_answer_text, normalize, verify
from nativevl.infer.generate import generate_texts

log = logging.getLogger(__name__)


@dataclass
class Question:
    question: str  # user text, with <image> placeholders where the images go
    images: list  # PIL images or arrays
    answer: str | None = None  # ground truth (a reference response or just the answer)
    family: str = ""  # a toy-world family: its verifier; "" = answer matching
    image_paths: list[str] = field(default_factory=list)  # where the images already live, if on disk
    video: str | None = None  # a video record's file (jsonl_questions with videos=True); its frames are read when asked

    def is_correct(self, response: str) -> bool:
        """Toy verifier; else, for a question listing its options (`A. ...` lines) with a letter for answer,
        the option `nativevl eval` reads in the response's final answer (or the whole response); else the
        final answer after normalisation, or for a bare reference answer the whole response or its first
        line (as `nativevl eval` scores it: "25" above its working counts)."""
        from nativevl.eval.tasks.files import open_answer_correct, option_letter, options_in_text

        if self.answer is None:
            raise ValueError("this question has no ground truth to verify against")
        if self.family:
            return verify(self.family, response, self.answer)
        options = options_in_text(self.question)
        letter = re.fullmatch(r"\(?([A-Z])\)?\.?", final_answer(self.answer) or self.answer.strip(), flags=re.IGNORECASE)
        if options and letter and letter.group(1).upper() in options:
            said = final_answer_text(response)
            return option_letter(said if said is not None else response, options) == letter.group(1).upper()
        want = final_answer(self.answer) or normalize(self.answer)
        if final_answer(self.answer) is not None:
            got = final_answer(response)
            return got is not None and got == want
        got = final_answer(response)  # a bare reference answer: a worked response's final answer, else its text
        if got is not None:
            return got == want
        return normalize(response) == want or open_answer_correct(response, self.answer)


def toyworld_questions(family: str, seed: int, n: int, size: int = 96) -> list[Question]:
    out = []
    for i in range(n):
        ex = example(family, seed, i, size)
        out.append(Question(ex.question, [Image.fromarray(im) for im in ex.images], ex.answer, family))
    return out


def jsonl_questions(path: str | Path, root: str | Path | None = None, limit: int | None = None,
                    max_bad_images: float = 0.05, videos: bool = False) -> list[Question]:
    """InternVL conversation records: the first human turn is the question, the gpt turn that answers it
    (if any) the ground truth; image paths are relative to `root` (default: the file's folder). Records are
    read (and their images loaded) until `limit` questions are kept.

    A question is asked without history (MMPR's format holds one question), so the later exchanges of a
    multi-turn record are not used, and a record's system turn gives way to the pipeline's system message;
    both are counted and logged. A record whose image is missing or unreadable is skipped, counted and
    named in the log; more than `max_bad_images` of the records read so is an error. A video record
    (`"video": file`, `<video>` in its question) is an error unless `videos` (`nativevl eval` asks them: the
    question keeps its `<video>`, Question.video names the file, checked to exist but decoded when asked)."""
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
        if rec.get("video") not in (None, "", []):
            video = rec["video"]
            if not videos:
                raise ValueError(f"{path}:{lineno}: a video record, read without videos=True (`nativevl eval` and "
                                 "the data pipelines ask video questions)")
            if names:
                raise ValueError(f"{path}:{lineno}: a record holds images or a video, not both")
            if not isinstance(video, str) or not video.strip():
                raise ValueError(f"{path}:{lineno}: 'video' must be a file name, got {video!r}")
            video = str((root / video).resolve())
            if not Path(video).is_file():
                bad_images.append(f"{path}:{lineno}: video file {video} does not exist")
                continue
            out.append(Question(question, [], reply, "", [], video=video))
            later_turns += more_turns
            with_system += has_system
            continue
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


class Progress:
    """The sampling a pipeline has finished, kept beside its output so that an interrupted run resumes.

    Each sampling phase (`desc`: responses, solutions, rollouts, ...) appends its finished groups of
    prompts to `.{out name}.{desc}.progress.jsonl`: a header line with the run's settings, then one line
    per group (its index, a fingerprint of its prompts, its texts), flushed to disk as it is written. A
    group samples from its own seed, so a resumed run writes exactly what an uninterrupted one would.
    `resume=False` refuses to start over progress that is there (nothing is lost silently); `clear()`
    removes the files once the output is written. `run` names the model (e.g. its folder and a
    fingerprint of its files): progress made by another model is refused."""

    def __init__(self, out: str | Path, run: str, resume: bool = False) -> None:
        self.out, self.run, self.resume = Path(out), run, resume

    def path(self, desc: str) -> Path:
        return self.out.with_name(f".{self.out.name}.{desc}.progress.jsonl")

    def files(self) -> list[Path]:
        """This output's progress files: a phase name holds no dot, so `--out pref` never claims the
        files of `--out pref.jsonl` (`.pref.jsonl.responses.progress.jsonl`)."""
        head, tail = f".{self.out.name}.", ".progress.jsonl"
        return sorted(p for p in self.out.parent.glob(f"{glob.escape(head)}*{tail}")
                      if "." not in p.name[len(head):-len(tail)])

    def check(self) -> None:
        """Before any sampling: progress there without resume is an error; with it, say what is reused."""
        found = self.files()
        if found and not self.resume:
            raise ValueError(f"{found[0]} holds the sampling of an earlier, unfinished run into {self.out}: pass "
                             "--resume to continue it, or delete it to start over")
        if self.resume:
            log.info("resuming %s from %s", self.out, ", ".join(map(str, found)) or "nothing (no progress files)")

    def load(self, desc: str, settings: dict) -> dict[int, tuple[str, list[list[str]]]]:
        """The finished groups of phase `desc` ({index: (fingerprint, texts)}); starts its file if new."""
        path = self.path(desc)
        header = {"run": self.run, "settings": settings}
        if not path.is_file():
            with open(path, "w", encoding="utf-8") as f:
                f.write(json.dumps(header) + "\n")
                f.flush()
                os.fsync(f.fileno())
            return {}
        text = path.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):  # a line cut short: cut it off, so the next append starts clean
            text = text[: text.rfind("\n") + 1]
            with open(path, "r+", encoding="utf-8") as f:
                f.truncate(len(text.encode("utf-8")))
        lines = text.split("\n")
        try:
            got = json.loads(lines[0])
        except json.JSONDecodeError:
            raise ValueError(f"{path}: not a progress file (its first line is not JSON); delete it to start over") from None
        if got != header:
            diff = {k: (got.get("settings", {}).get(k), v) for k, v in settings.items()
                    if got.get("settings", {}).get(k) != v}
            if got.get("run") != self.run:
                diff["model"] = (got.get("run"), self.run)
            raise ValueError(f"{path} was made with other settings (was, now): {diff}; delete it to start over")
        done, broken = {}, 0
        for line in lines[1:]:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                done[int(rec["group"])] = (rec["key"], rec["texts"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                broken += 1  # the line being written when the run stopped: that group is sampled again
        if broken:
            log.warning("%s: %d unreadable line(s) skipped (a write cut short); their groups are sampled again",
                        path, broken)
        return done

    def save(self, desc: str, group: int, key: str, texts: list[list[str]]) -> None:
        with open(self.path(desc), "a", encoding="utf-8") as f:
            f.write(json.dumps({"group": group, "key": key, "texts": texts}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def clear(self) -> None:
        for f in self.files():
            f.unlink()


def _image_fingerprint(images: list) -> str:
    h = hashlib.sha1()
    for im in images:
        if isinstance(im, VideoClip):  # its frames' pixels
            h.update(f"clip{pixel_digest(im)}".encode())
            continue
        arr = np.asarray(im)
        h.update(f"{arr.shape}{arr.dtype}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def visual_prompts(questions: list[Question], num_frames: int, image_size: int,
                   max_bad: float = 0.05) -> dict[int, tuple[str, list]]:
    """Each question's (text, images) as the model is asked it, by question index: a video question's
    `num_frames` frames (those `nativevl eval` and transformers' video processor pick), one tile each,
    standing for its `<video>` (or before its text). The frames are kept as their tiles (image_size
    square: what the model sees, not the decoded frames' size). A question whose video cannot be decoded
    (or is gone) is left out and named in the log; more than `max_bad` of the video questions so is an error."""
    out, bad = {}, []
    for qi, q in enumerate(questions):
        if q.video is None:
            out[qi] = (q.question, q.images)
            continue
        try:
            frames = load_video_frames(q.video, num_frames=num_frames)
        except (ValueError, OSError) as e:
            log.warning("question %d: %s; left out", qi, e)
            bad.append(qi)
            continue
        tiles = tuple(Image.fromarray(t.transpose(1, 2, 0)) for t in frame_tiles(frames, image_size))
        out[qi] = (with_video(q.question, video_prefix(len(tiles))), [VideoClip(tiles)])
    videos = sum(q.video is not None for q in questions)
    if len(bad) > max_bad * videos:
        raise ValueError(f"{len(bad)} of {videos} videos cannot be decoded (more than {max_bad:.0%}; questions "
                         f"{bad[:10]}); the log names each")
    return out


def group_seed(seed: int, group: int) -> int:
    """The sampling seed of one group of prompts: independent of which groups ran before it."""
    return int(np.random.SeedSequence([seed, group]).generate_state(1, dtype=np.uint64)[0] >> 1)


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
    progress: Progress | None = None,
) -> list[list[str]]:
    """n sampled continuations of each (question, images, assistant prefix) prompt.

    The assistant prefix (a partial response) is appended after the generation prompt; the returned
    texts are the continuations only. Prompts go in groups whose n rows each fill whole batches of
    `batch_rows`, each group sampled from its own seed (`group_seed`), its questions tiled for that
    group only. With `progress`, finished groups are kept on disk and an
    interrupted run's groups are reused (`Progress`).
    """
    cfg = model.config
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # prompts per group: enough that its rows fill whole batches (n = 40: 8 prompts, 5 batches of 64)
    per = math.lcm(n, batch_rows) // n
    if per > 16 * max(1, batch_rows // n):  # n and batch_rows almost coprime: one batch's worth instead
        per = max(1, batch_rows // n)
    groups = [list(range(i, min(i + per, len(prompts)))) for i in range(0, len(prompts), per)]
    fingerprints: dict[int, str] = {}  # id(images) -> fingerprint, once per image list

    def key(members: list[int]) -> str:
        h = hashlib.sha1()
        for i in members:
            question, images, prefix = prompts[i]
            if id(images) not in fingerprints:
                fingerprints[id(images)] = _image_fingerprint(images)
            h.update(json.dumps([question, prefix, fingerprints[id(images)]]).encode())
        return h.hexdigest()

    # the device and dtype too: the same seed draws other samples on another device
    settings = {"n": n, "temperature": temperature, "top_k": top_k, "max_new_tokens": max_new_tokens, "seed": seed,
                "batch_rows": batch_rows, "system_message": system_message, "device": model.device.type,
                "dtype": str(model.dtype)}
    done = progress.load(desc, settings) if progress is not None else {}
    texts: list[list[str]] = []
    reused = 0
    bar = tqdm(groups, desc=desc, unit="group")
    for g, members in enumerate(bar):
        k = key(members) if progress is not None else ""
        if g in done:
            if done[g][0] != k:
                raise ValueError(f"{progress.path(desc)}: group {g} was sampled for other prompts (the questions, "
                                 "their images or a video's frames, --num_frames, changed); delete it to start over")
            texts += done[g][1]
            reused += 1
            continue
        rows, tiled = [], {}  # one tiling per question in this group: its step prefixes share the tensor
        for i in members:
            question, images, prefix = prompts[i]
            if (question, id(images)) not in tiled:
                tiled[question, id(images)] = chat_inputs(tokenizer, messages(question), images,
                                                          image_size=cfg.vision.image_size,
                                                          image_seq_length=cfg.image_seq_length,
                                                          system_message=system_message)
            ids, tiles = tiled[question, id(images)]
            if prefix:
                ids = ids + tokenizer(prefix, add_special_tokens=False).input_ids
            rows += [(ids, tiles)] * n
        gen = torch.Generator(device=model.device).manual_seed(group_seed(seed, g))
        out = generate_texts(model, tokenizer, rows, batch_size=batch_rows, max_new_tokens=max_new_tokens,
                             progress=False, do_sample=temperature > 0, temperature=max(temperature, 1e-5),
                             top_k=top_k, eos_token_id=end, generator=gen)
        group_texts = [out[j * n : (j + 1) * n] for j in range(len(members))]
        if progress is not None:
            progress.save(desc, g, k, group_texts)
        texts += group_texts
    if reused:
        log.info("%s: %d of %d groups reused from %s", desc, reused, len(groups), progress.path(desc))
    return texts


def written_question(q: Question) -> str:
    """The question as a written record holds it: a video question with its `<video>` placeholder
    (put first when it had none, where the frames were asked), so that the loader puts the frames there
    and nowhere else."""
    return q.question if q.video is None else with_video(q.question, VIDEO_PLACEHOLDER + "\n")


def write_records(out: Path, questions: list[Question], records) -> None:
    """(question index, record) pairs as jsonl at `out`, each record given its question's images (saved
    once per question beside `out`, named after it). Written to a temporary sibling, then renamed over
    `out`: a failure part-way (a full disk) leaves the previous complete file, not a truncated one."""
    images: dict[int, list[str]] = {}

    def with_images(qi: int, rec: dict) -> dict:
        if questions[qi].video is not None:  # named where it is (under --out's folder: relative to it)
            video = Path(questions[qi].video)
            rec["video"] = str(video.relative_to(out.parent.resolve()) if video.is_relative_to(out.parent.resolve())
                               else video)
            return rec
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
