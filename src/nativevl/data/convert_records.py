"""One record of another trainer's fine-tuning data -> one InternVL jsonl record (`convert_record`).

Each record's kind is told by its keys (a LLaMA-Factory dataset named in its dataset_info.json is read
with the columns, tags and formatting that entry declares, as LLaMA-Factory reads it):

- conversations: ShareGPT / LLaVA / InternVL (`conversations`, from/value), OpenAI / ms-swift
  (`messages`, role/content; content may be a list of text and image parts), ms-swift's pair dicts
  (`conversation`: [{"human": q, "assistant": a}, ...]); roles user/human, assistant/gpt/bot, system;
- alpaca (LLaMA-Factory, ms-swift): `instruction` and `input` joined by a newline, `output`,
  `history` ([[question, answer], ...] before it), `system`;
- question / answer (ms-swift's query / response and its aliases), with `history` and `system`.

Preference pairs (LLaMA-Factory's `chosen` / `rejected`: strings for alpaca, one message each for
sharegpt; ms-swift's `rejected_response` or `rejected_messages`) become nativevl's preference records
(one question, an optional system message). Images are paths (relative ones are looked up under the
image root, then the current folder, as LLaMA-Factory and ms-swift do), data URLs, base64 strings or
{"bytes", "path"} dicts (parquet exports of Hugging Face datasets): embedded images are written once
each (by content hash) beside the output. Placeholders are made explicit: images with no `<image>` in
any user turn get `<image>\\n` each before the first one (InternVL's and ms-swift's rule), so the output
reads the same in InternVL's own trainer; any other count that differs from the images is an error.

ms-swift's grounding tags become InternVL's `<ref>` / `<box>` syntax. What nativevl cannot train on
is refused by record, never dropped silently: tool calls and tool results, KTO labels, per-turn loss
switches, audio, several videos, images beside a video, remote URLs, multi-turn preference pairs:
`convert_record` raises a `ConvertError` with the kind, which `convert.py` counts and keeps.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from nativevl.data.convert_files import ConvertError, Media
from nativevl.data.template import IMAGE_PLACEHOLDER, ROLES, VIDEO_PLACEHOLDER

USER, ASSISTANT, SYSTEM, TOOL = "user", "assistant", "system", "tool"
ROLE_ALIASES = {  # InternVL's role names (template.ROLES), ms-swift's "bot", and the tool roles refused
    **ROLES, "bot": ASSISTANT,
    **dict.fromkeys(("tool", "tool_call", "tool_response", "function_call", "function", "function_response",
                     "observation", "observations", "ipython"), TOOL),
}
QUESTION_KEYS = ("query", "question", "prompt", "problem")
ANSWER_KEYS = ("response", "answer", "output", "completion", "solution")
MESSAGE_KEYS = ("messages", "conversations", "conversation")


@dataclass(frozen=True)
class Layout:
    """Where a record keeps its parts. The defaults read every format above by its usual names;
    `from_dataset_info` gives LLaMA-Factory's declared columns and tags instead."""

    formatting: str = "auto"  # auto (by keys) | alpaca | sharegpt
    ranking: bool | None = None  # None: a record with chosen / rejected is a pair
    prompt: str = "instruction"
    query: str = "input"
    response: str = "output"
    history: str | None = "history"
    messages: tuple[str, ...] = MESSAGE_KEYS
    system: str | None = "system"
    tools: str | None = "tools"
    images: tuple[str, ...] = ("images", "image")
    videos: tuple[str, ...] = ("videos", "video")
    chosen: str = "chosen"
    rejected: str = "rejected"
    kto_tag: str | None = None
    role_tag: str | None = None  # None: "role" or "from"
    content_tag: str | None = None  # None: "content" or "value"
    roles: dict[str, str] | None = None  # role name -> user/assistant/system/tool; None: ROLE_ALIASES

    @classmethod
    def from_dataset_info(cls, path: str | Path, name: str) -> tuple[Layout, Path]:
        """LLaMA-Factory's entry `name` of dataset_info.json -> (its layout, its data file or folder)."""
        path = Path(path)
        try:
            info = json.loads(path.read_bytes())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: cannot read dataset_info.json ({e})") from None
        if not isinstance(info, dict) or name not in info:
            known = sorted(info) if isinstance(info, dict) else []
            raise ValueError(f"{path}: no dataset {name!r}; it lists {known[:20]}")
        entry = info[name]
        if not isinstance(entry, dict) or "file_name" not in entry:
            hub = [k for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name") if k in entry]
            raise ValueError(f"{path}: dataset {name!r} has no local file_name ({', '.join(hub) or 'no source'}); "
                             "nothing is downloaded: fetch it and convert the local file")
        formatting = entry.get("formatting", "alpaca")
        if formatting not in ("alpaca", "sharegpt"):
            raise ValueError(f"{path}: dataset {name!r} formatting {formatting!r} is not converted (alpaca, sharegpt); "
                             "its OpenAI-style messages convert without --dataset_info")
        columns, tags = entry.get("columns", {}), entry.get("tags", {})
        if not isinstance(columns, dict) or not isinstance(tags, dict):
            raise ValueError(f"{path}: dataset {name!r} columns and tags must be objects")
        tag = lambda key, default: tags.get(key, default)
        roles = {tag("user_tag", "human"): USER, tag("assistant_tag", "gpt"): ASSISTANT, tag("system_tag", "system"): SYSTEM,
                 tag("observation_tag", "observation"): TOOL, tag("function_tag", "function_call"): TOOL}
        one = lambda key: (columns[key],) if columns.get(key) else ()  # media columns count only when declared
        layout = cls(
            formatting=formatting,
            ranking=bool(entry.get("ranking", False)),
            prompt=columns.get("prompt", "instruction"),
            query=columns.get("query", "input"),
            response=columns.get("response", "output"),
            history=columns.get("history"),
            messages=(columns.get("messages", "conversations"),),
            system=columns.get("system"),
            tools=columns.get("tools"),
            images=one("images"),
            videos=one("videos"),
            chosen=columns.get("chosen", "chosen"),
            rejected=columns.get("rejected", "rejected"),
            kto_tag=columns.get("kto_tag"),
            role_tag=tag("role_tag", "from"),
            content_tag=tag("content_tag", "value"),
            roles=roles,
        )
        return layout, path.parent / entry["file_name"]


# ---------------------------------------------------------------- records


def _get(raw: dict, keys: tuple[str, ...]) -> Any:
    return next((raw[k] for k in keys if raw.get(k) not in (None, "", [])), None)


TRAIN_MARKS = ("loss", "weight", "train", "training", "train_detail")


def _flag(value: Any) -> bool | None:
    """A training mark as True / False (1, 0, "false", 0.0, ...); None when it reads as neither."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    return None


def _media(raw: dict, keys: tuple[str, ...]) -> list:
    """The images (or videos) of a record from the first of `keys` it fills; two keys filled
    differently (`images` and `image`) are an error, not one of them dropped."""
    filled = [(k, _media_list(raw[k])) for k in keys if raw.get(k) not in (None, "", [])]
    if any(media != filled[0][1] for _, media in filled[1:]):
        raise ConvertError("malformed", f"both {' and '.join(repr(k) for k, _ in filled)} are given, and differ")
    return filled[0][1] if filled else []


def _media_list(value: Any) -> list:
    if value is None or value == "" or value == []:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


class _Turns:
    """A record's conversation as (role, text) with roles user/assistant, its system message and the
    images that came inside message contents (OpenAI parts)."""

    def __init__(self) -> None:
        self.system: str | None = None
        self.turns: list[tuple[str, str]] = []
        self.content_images: list[Any] = []


def _message(m: Any, layout: Layout, i: int) -> list[tuple[str, Any]]:
    """One message -> [(role, content)] (a pair dict gives two)."""
    if not isinstance(m, dict):
        raise ConvertError("malformed", f"message {i} must be an object, got {type(m).__name__}")
    roles = layout.roles or ROLE_ALIASES
    role_keys = (layout.role_tag,) if layout.role_tag else ("role", "from")
    content_keys = (layout.content_tag,) if layout.content_tag else ("content", "value")
    role_key = next((k for k in role_keys if k in m), None)
    if role_key is None and layout.roles is None and not layout.role_tag:  # ms-swift's {"human": q, "assistant": a}
        pair = sorted(((ROLE_ALIASES[k], m[k]) for k in m if ROLE_ALIASES.get(k) in (USER, ASSISTANT)),
                      key=lambda turn: turn[0] != USER)  # the question first, whatever the key order
        if pair:
            return pair
    if role_key is None:
        raise ConvertError("malformed", f"message {i} has no role ({'/'.join(role_keys)}); keys {sorted(m)[:8]}")
    role = roles.get(m[role_key]) if isinstance(m[role_key], str) else None
    if role is None:
        raise ConvertError("malformed", f"message {i} has unknown role {m[role_key]!r}; known: {sorted(roles)}")
    if role == TOOL or m.get("tool_calls") or m.get("function_call"):
        what = f"role {m[role_key]!r}" if role == TOOL else "tool_calls"
        raise ConvertError("unsupported", f"message {i} is a tool call or result ({what}): the internvl2_5 template "
                                          "has no tool format")
    # per-message training marks (ms-swift's loss, axolotl's weight / train / training / train_detail):
    # InternVL's format trains every answer and no question, so any other choice is refused
    marks = {k: m[k] for k in TRAIN_MARKS if not _is_null(m.get(k))}
    if "train_detail" in marks:
        raise ConvertError("unsupported", f"message {i}: train_detail (training on part of a message)")
    wanted = {k: _flag(v) for k, v in marks.items()}
    if role == ASSISTANT and any(w is False for w in wanted.values()):
        raise ConvertError("unsupported", f"message {i}: an answer marked not to be trained on ({marks}); nativevl "
                                          "learns every answer")
    if role != ASSISTANT and any(w is True for w in wanted.values()):
        raise ConvertError("unsupported", f"message {i}: a {role} turn marked to be trained on ({marks}); nativevl "
                                          "learns answers only")
    if None in wanted.values():
        raise ConvertError("malformed", f"message {i}: cannot read the training mark {marks} as true or false")
    content = next((m[k] for k in content_keys if k in m), None)
    if content is None:
        raise ConvertError("malformed", f"message {i} has no content ({'/'.join(content_keys)})")
    return [(role, content)]


def _content(content: Any, role: str, images: list, i: int) -> str:
    """A message's content as text; OpenAI-style image parts become `<image>\n` (user turns only), as the
    InternVL -hf chat template renders them (and the server's prompts hold them)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ConvertError("malformed", f"message {i} content must be text or a list of parts, got {type(content).__name__}")
    text = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            text.append(part["text"])
            if role == USER:  # an <image> typed in the text: a slot the images column fills, in order
                images.extend([None] * part["text"].count(IMAGE_PLACEHOLDER))
        elif kind in ("image", "image_url") and role == USER:
            value = part.get(kind)
            # {"type": "image"} alone (transformers, TRL): a slot the images column fills, in order
            images.append(value.get("url") if kind == "image_url" and isinstance(value, dict) else value)
            text.append(IMAGE_PLACEHOLDER + "\n")
        elif kind in ("image", "image_url", "video", "video_url", "input_audio", "audio"):
            raise ConvertError("unsupported", f"message {i}: a {kind} part in a {role} turn")
        else:
            raise ConvertError("malformed", f"message {i}: content part {str(part)[:80]!r} is not text or an image")
    return "".join(text)


def _conversation(messages: Any, layout: Layout) -> _Turns:
    if not isinstance(messages, list) or not messages:
        raise ConvertError("malformed", "the messages / conversations must be a non-empty list")
    out = _Turns()
    for i, m in enumerate(messages):
        for role, content in _message(m, layout, i):
            text = _content(content, role, out.content_images, i)
            if role == SYSTEM:
                if out.turns or out.system is not None:
                    raise ConvertError("malformed", f"message {i}: a system message is only allowed first")
                out.system = text
            else:
                out.turns.append((role, text))
    return out


def _history(value: Any) -> list[tuple[str, str]]:
    if isinstance(value, str):  # ms-swift accepts a Python literal
        try:
            value = ast.literal_eval(value) if value.strip() else []
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise ConvertError("malformed", f"history {value[:80]!r} is not a list of [question, answer]") from None
    if value is None:
        return []
    if not isinstance(value, list) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(t, str) for t in p) for p in value):
        raise ConvertError("malformed", "history must be a list of [question, answer] string pairs")
    return [t for q, a in value for t in ((USER, q), (ASSISTANT, a))]


def _text(raw: dict, key: str, what: str, required: bool = True) -> str:
    value = raw.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise ConvertError("malformed", f"{what} ({key!r}) must be a string, got {type(value).__name__}")
    return value


def _record_turns(raw: dict, layout: Layout) -> _Turns:
    formatting = layout.formatting
    if formatting == "auto":
        if _get(raw, layout.messages) is not None:
            formatting = "sharegpt"
        elif layout.prompt in raw:
            formatting = "alpaca"
        elif any(k in raw for k in QUESTION_KEYS):
            formatting = "qa"
        else:
            raise ConvertError("malformed", f"no conversation found (messages / conversations, instruction, or "
                                            f"query / question); keys: {sorted(raw)[:12]}")
    if formatting == "sharegpt":
        out = _conversation(_get(raw, layout.messages), layout)
    else:
        out = _Turns()
        if formatting == "alpaca":
            parts = [_text(raw, layout.prompt, "the instruction"), _text(raw, layout.query, "the input", required=False)]
            question = "\n".join(p for p in parts if p)
            answer_key = layout.response
            if answer_key not in raw and layout.formatting == "auto":  # Dolly's instruction + response, say
                answer_key = next((k for k in ANSWER_KEYS if raw.get(k) not in (None, "")), answer_key)
        else:  # the first of the aliases that holds something (an empty 'query' beside the 'question')
            question_key = next((k for k in QUESTION_KEYS if raw.get(k) not in (None, "")),
                                next(k for k in QUESTION_KEYS if k in raw))
            question = _text(raw, question_key, "the question")
            answer_key = next((k for k in ANSWER_KEYS if raw.get(k) not in (None, "", [])),
                              next((k for k in ANSWER_KEYS if k in raw), ANSWER_KEYS[0]))
        out.turns = _history(raw.get(layout.history)) if layout.history else []
        out.turns.append((USER, question))
        is_pair = layout.chosen in raw or layout.rejected in raw
        if not is_pair or answer_key in raw:
            answer = raw.get(answer_key)
            if isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer):
                answer = answer[0]  # ms-swift: a list of answers trains on the first
            if not isinstance(answer, str):
                raise ConvertError("malformed" if answer is not None else "no_assistant_turn",
                                   f"the answer ({answer_key!r}) must be a string, got {type(answer).__name__}")
            if not is_pair:
                out.turns.append((ASSISTANT, answer))
    out.system = _with_top_system(out.system, raw, layout)
    return out


def _with_top_system(system: str | None, raw: dict, layout: Layout) -> str | None:
    """A conversation's own system message, else the record's top-level one (LLaMA-Factory, ms-swift)."""
    if system is None and layout.system and isinstance(raw.get(layout.system), str) and raw[layout.system]:
        return raw[layout.system]
    return system


def _pair(raw: dict, layout: Layout, conv: _Turns) -> tuple[str, str] | None:
    """(chosen, rejected) of a preference record, None for a plain one; leaves the question last in conv."""
    if layout.ranking is False:
        return None
    single = lambda value, what: value if isinstance(value, str) else _message_text(value, layout, what)
    if layout.chosen in raw or layout.rejected in raw:  # LLaMA-Factory: the conversation ends with the question
        if not (layout.chosen in raw and layout.rejected in raw):
            raise ConvertError("malformed", f"a preference record needs both {layout.chosen!r} and {layout.rejected!r}")
        if not conv.turns or conv.turns[-1][0] != USER:
            raise ConvertError("malformed", f"a {layout.chosen!r} / {layout.rejected!r} record's conversation must end "
                                            "with the question")
        return _distinct(single(raw[layout.chosen], "chosen"), single(raw[layout.rejected], "rejected"))
    if "rejected_response" in raw or "rejected_messages" in raw:  # ms-swift: messages end with the chosen answer
        if not conv.turns or conv.turns[-1][0] != ASSISTANT:
            raise ConvertError("malformed", "a rejected_response record's messages must end with the chosen answer")
        chosen = conv.turns.pop()[1]
        if raw.get("rejected_messages") is not None:
            other = _conversation(raw["rejected_messages"], layout)
            other.system = _with_top_system(other.system, raw, layout)  # the top-level one applies to both sides
            if other.turns[:-1] != conv.turns or other.system != conv.system or not other.turns or other.turns[-1][0] != ASSISTANT:
                raise ConvertError("unsupported", "rejected_messages that differ from the chosen ones before the last answer")
            if any(raw.get(k) not in (None, [], raw.get(k.removeprefix("rejected_"))) for k in ("rejected_images", "rejected_videos")):
                raise ConvertError("unsupported", "rejected_images / rejected_videos other than the chosen side's")
            return _distinct(chosen, other.turns[-1][1])
        rejected = raw["rejected_response"]
        if isinstance(rejected, list) and len(rejected) == 1:
            rejected = rejected[0]
        return _distinct(chosen, single(rejected, "rejected_response"))
    if layout.ranking:
        raise ConvertError("malformed", f"a ranking dataset's record needs {layout.chosen!r} and {layout.rejected!r}")
    return None


def _distinct(chosen: str, rejected: str) -> tuple[str, str]:
    if chosen == rejected:
        raise ConvertError("malformed", "the chosen and rejected answers are the same text")
    return chosen, rejected


def _message_text(value: Any, layout: Layout, what: str) -> str:
    turns = _message(value, layout, 0)
    if len(turns) != 1 or turns[0][0] != ASSISTANT:
        raise ConvertError("malformed", f"{what} must be an assistant message or a string")
    if not isinstance(turns[0][1], str):
        raise ConvertError("malformed", f"{what} must be text")
    return turns[0][1]


GROUNDING_TAGS = ("<ref-object>", "<bbox>")


def _grounded(turns: list[tuple[str, str]], objects: Any, images: list[Path]) -> list[tuple[str, str]]:
    """ms-swift grounding in InternVL's syntax: each `<ref-object>` (in order, over every turn) becomes
    `<ref>name</ref>` and each `<bbox>` `<box>[[x1, y1, x2, y2]]</box>`, its coordinates scaled to
    0-1000 of its image (`objects.image_id`, default the first) from pixels (`bbox_type` "real", the
    default) or from 0-1 ("norm1"), as ms-swift's InternVL template writes them."""
    if not isinstance(objects, dict):
        raise ConvertError("malformed", "grounding tags need an 'objects' dict with 'ref' and 'bbox' lists")
    refs, boxes = objects.get("ref") or [], objects.get("bbox") or []
    kind = objects.get("bbox_type") or "real"
    ids = list(objects.get("image_id") or [])
    if not isinstance(refs, list) or not isinstance(boxes, list) or not isinstance(ids, list) or not all(
            isinstance(r, str) for r in refs):
        raise ConvertError("malformed", "objects' ref (strings), bbox and image_id must be lists")
    if kind not in ("real", "norm1"):
        raise ConvertError("unsupported", f"objects.bbox_type {kind!r} (real and norm1 are converted)")
    n_refs = sum(t.count("<ref-object>") for _, t in turns)
    n_boxes = sum(t.count("<bbox>") for _, t in turns)
    if n_refs > len(refs) or n_boxes > len(boxes):
        raise ConvertError("placeholder_mismatch", f"{n_refs} <ref-object> / {n_boxes} <bbox> tag(s) but "
                                                   f"{len(refs)} ref(s) / {len(boxes)} box(es)")
    ids += [0] * (len(boxes) - len(ids))
    sizes: dict[int, tuple[int, int]] = {}
    scaled = []
    for box, image_id in zip(boxes[:n_boxes], ids):
        if not isinstance(box, list) or not box or len(box) % 2 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
            raise ConvertError("malformed", f"a bbox must be a list of x, y numbers, got {box!r}")
        if kind == "norm1":
            width = height = 1
        else:
            if not isinstance(image_id, int) or not 0 <= image_id < len(images):
                raise ConvertError("malformed", f"bbox image_id {image_id!r} but the record has {len(images)} image(s)")
            if image_id not in sizes:
                with Image.open(images[image_id]) as im:  # the size the loader shows: EXIF orientation applied
                    turned = (im.getexif().get(0x0112) or 1) in (5, 6, 7, 8)
                    sizes[image_id] = im.size[::-1] if turned else im.size
            width, height = sizes[image_id]
        scaled.append([round(v / (width if i % 2 == 0 else height) * 1000) for i, v in enumerate(box)])
        if not all(0 <= v <= 1000 for v in scaled[-1]):
            raise ConvertError("malformed", f"bbox {box!r} lies outside its image ({width} x {height})")
    names = iter(refs)
    coords = iter(scaled)
    out = []
    for role, text in turns:
        pieces = re.split(r"(<ref-object>|<bbox>)", text)
        text = "".join(f"<ref>{next(names)}</ref>" if p == "<ref-object>" else f"<box>[{next(coords)}]</box>"
                       if p == "<bbox>" else p for p in pieces)
        out.append((role, text))
    return out


def _fill_slots(parts: list, column: list) -> list:
    """The images of a record, in the order its placeholders stand: content parts with their image in
    place, bare image parts and `<image>` typed in text parts (None) filled from the images column in
    order, the column's remaining images after them."""
    column = iter(column)
    filled = [next(column, None) if p is None else p for p in parts]
    if any(p is None for p in filled):
        raise ConvertError("placeholder_mismatch", "more bare image parts and <image> in text parts than images in "
                                                   "the images column")
    return filled + list(column)


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))  # parquet nulls, pandas' NaN


def convert_record(raw: Any, layout: Layout, media: Media, out_dir: Path) -> dict:
    """One record of another format -> one InternVL jsonl record (conversation or preference pair).
    Its checks run before an embedded image is written (the loader's, after, remove them again)."""
    if not isinstance(raw, dict):
        raise ConvertError("malformed", f"a record must be a JSON object, got {type(raw).__name__}")
    raw = {k: v for k, v in raw.items() if not _is_null(v)}  # a null column is an absent one (parquet rows have all)
    for key in ([layout.kto_tag] if layout.kto_tag else []) + (["label"] if layout.roles is None else []):
        if isinstance(raw.get(key), bool):
            raise ConvertError("unsupported", f"a KTO record ({key!r}: {raw[key]}): nativevl has no KTO objective")
    if layout.tools and raw.get(layout.tools) not in (None, "", [], "[]"):
        raise ConvertError("unsupported", "tool definitions: the internvl2_5 template has no tool format")
    for key in ("audios", "audio"):  # nothing to read audio into
        if raw.get(key) not in (None, "", [], {}):
            raise ConvertError("unsupported", f"{key!r}: audio is not converted")
    if layout.system and layout.system in raw and not isinstance(raw[layout.system], str):
        raise ConvertError("malformed", f"the system message ({layout.system!r}) must be a string")
    conv = _record_turns(raw, layout)
    pair = _pair(raw, layout, conv)
    images = _fill_slots(conv.content_images, _media(raw, layout.images) if layout.images else [])
    videos = _media(raw, layout.videos) if layout.videos else []
    turns = conv.turns
    texts = [t for _, t in turns] + list(pair or ())
    if any("<audio>" in t for t in texts):
        raise ConvertError("unsupported", "<audio> tags: audio is not converted")
    objects = raw.get("objects")
    grounded = objects not in (None, "", [], {}) or any(tag in t for t in texts for tag in GROUNDING_TAGS)
    if grounded and (pair is not None or videos):
        raise ConvertError("unsupported", "grounding (objects, <ref-object>, <bbox>) in a preference pair or on a video")
    if len(videos) > 1 or (videos and images):
        raise ConvertError("unsupported", f"{len(videos)} video(s) and {len(images)} image(s): a record holds images or one video")
    if videos and not isinstance(videos[0], str):
        raise ConvertError("unsupported", "a video given as frames: nativevl reads video files")
    if any(IMAGE_PLACEHOLDER in t or VIDEO_PLACEHOLDER in t for r, t in turns if r == ASSISTANT) or (
            pair and any(IMAGE_PLACEHOLDER in t or VIDEO_PLACEHOLDER in t for t in pair)):
        raise ConvertError("placeholder_mismatch", "an answer holds <image> / <video>: only questions carry images")
    n_image = sum(t.count(IMAGE_PLACEHOLDER) for _, t in turns)
    n_video = sum(t.count(VIDEO_PLACEHOLDER) for _, t in turns)
    if n_image not in (0, len(images)):
        raise ConvertError("placeholder_mismatch", f"{n_image} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s)")
    if n_video > len(videos):
        raise ConvertError("placeholder_mismatch", f"{n_video} {VIDEO_PLACEHOLDER} placeholder(s) but {len(videos)} video(s)")
    first_user = next((i for i, (r, _) in enumerate(turns) if r == USER), None)
    if first_user is None:
        raise ConvertError("malformed", "no user turn")
    if pair is not None:
        if len(turns) != 1:
            raise ConvertError("unsupported", f"a preference pair after {len(turns) - 1} earlier turn(s): nativevl's "
                                              "pairs hold one question")
        if not (pair[0].strip() and pair[1].strip()):
            raise ConvertError("no_assistant_turn", "an empty chosen or rejected answer")
    elif not any(r == ASSISTANT and t.strip() for r, t in turns):
        raise ConvertError("no_assistant_turn", "no non-empty answer to learn")
    image_paths = [media.image(v, f"image {i + 1}") for i, v in enumerate(images)]
    video_paths = [media.path(v, "video") for v in videos]
    if grounded:
        turns = _grounded(turns, objects, image_paths)
    prefix = (IMAGE_PLACEHOLDER + "\n") * (len(image_paths) if not n_image else 0) + (
        VIDEO_PLACEHOLDER + "\n" if video_paths and not n_video else "")
    if prefix:
        turns = list(turns)
        turns[first_user] = (USER, prefix + turns[first_user][1])
    # between resolved folders: through a symlinked folder, out/../imgs is not where the unresolved text says
    # (the file's own name kept: a hub cache's links name blobs by hash)
    rel = lambda p: os.path.relpath(os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p)),
                                    os.path.realpath(out_dir))
    out: dict[str, Any] = {}
    if isinstance(raw.get("id"), (str, int)) and not isinstance(raw.get("id"), bool):
        out["id"] = raw["id"]
    if image_paths:
        out["image"] = rel(image_paths[0]) if len(image_paths) == 1 else [rel(p) for p in image_paths]
    if video_paths:
        out["video"] = rel(video_paths[0])
    if pair is not None:
        out.update(question=turns[0][1], chosen=pair[0], rejected=pair[1])
        if conv.system is not None:
            out["system"] = conv.system
        return out
    system = [{"from": "system", "value": conv.system}] if conv.system is not None else []
    out["conversations"] = system + [{"from": "human" if r == USER else "gpt", "value": t} for r, t in turns]
    return out
