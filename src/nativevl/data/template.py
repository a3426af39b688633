"""The chat format: InternVL's internvl2_5 ChatML, defined once.

`<image>` in a user turn becomes `<img>` + `<IMG_CONTEXT>` x (image_seq_length * tiles) + `</img>`.
"""

from __future__ import annotations

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
IMAGE_MARKUP = ("<IMG_CONTEXT>", "<img>", "</img>", IMAGE_PLACEHOLDER)
IMAGE = object()  # where an image stands in a message's content pieces (encode_prompt); never text


def has_image_markup(text: str) -> bool:
    """A model's output that holds image (or video) markup cannot be fed back as text: its placeholders
    would ask for images that are not there."""
    return any(m in text for m in IMAGE_MARKUP) or VIDEO_PLACEHOLDER in text


# internvl2_5's default system message ("I am InternVL, developed by Shanghai AI Lab, Tsinghua University and partners").
DEFAULT_SYSTEM_MESSAGE = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def image_span(num_tiles: int, image_seq_length: int) -> str:
    return "<img>" + "<IMG_CONTEXT>" * (image_seq_length * num_tiles) + "</img>"


def video_prefix(n_frames: int, *, training: bool = False) -> str:
    """The text a video's frames stand for, each an `<image>` (one tile) on a line of its own, before the
    question. InternVL's two forms: "Frame-1: <image>\n..." as its fine-tuning loader writes a video
    record's frames (training), "Frame1: <image>\n..." as its chat examples and transformers'
    InternVLProcessor ask about a video (inference)."""
    label = "Frame-{}: " if training else "Frame{}: "
    return "".join(label.format(i + 1) + IMAGE_PLACEHOLDER + "\n" for i in range(n_frames))


def with_video(text: str, prefix: str) -> str:
    """`text` with its `<video>` (the first; with its newline) replaced by the frames' `prefix`
    (`video_prefix`), or the prefix before it when it holds none, as InternVL's chat puts a video first."""
    for mark in (VIDEO_PLACEHOLDER + "\n", VIDEO_PLACEHOLDER):
        if mark in text:
            return text.replace(mark, prefix, 1)
    return prefix + text


def expand_images(text: str, tiles_per_image: list[int], image_seq_length: int) -> str:
    """Replace each `<image>` with its token span; the counts must agree."""
    parts = text.split(IMAGE_PLACEHOLDER)
    if len(parts) - 1 != len(tiles_per_image):
        raise ValueError(
            f"text has {len(parts) - 1} {IMAGE_PLACEHOLDER} placeholder(s) but {len(tiles_per_image)} image(s) were given"
        )
    out = [parts[0]]
    for tiles, rest in zip(tiles_per_image, parts[1:]):
        out.append(image_span(tiles, image_seq_length) + rest)
    return "".join(out)


def render_chat(
    messages: list[dict[str, str]],
    *,
    tiles_per_image: list[int] | None = None,
    image_seq_length: int = 256,
    system_message: str | None = DEFAULT_SYSTEM_MESSAGE,
    add_generation_prompt: bool = True,
) -> str:
    """messages [{"role": "user"|"assistant"|"system" (or human/gpt), "content": str}] -> prompt text.

    A leading system message overrides `system_message` (an empty one still renders its turn, as the
    tokenizer's chat template and InternVL's preprocess do); `system_message` None or "" means no
    system turn. Images with no `<image>` placeholder in the text get `<image>\\n` before the first
    user turn.
    """
    tiles_per_image = tiles_per_image or []
    record_system, turns = normalize_turns(messages)
    if record_system is not None:
        system_message = record_system
    turns = attach_images(turns, len(tiles_per_image))
    explicit = record_system is not None  # an empty system turn of the messages is still a turn
    text = f"<|im_start|>system\n{system_message}<|im_end|>\n" if system_message or explicit else ""
    images = iter(tiles_per_image)
    for role, content in turns:
        if role == "user":
            n = content.count(IMAGE_PLACEHOLDER)
            content = expand_images(content, [next(images) for _ in range(n)], image_seq_length)
        text += f"<|im_start|>{role}\n{content}<|im_end|>\n"
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    return text


def encode_prompt(tokenizer, turns: list[dict], tiles_per_image: list[int], image_seq_length: int,
                  system_message: str | None) -> list[int]:
    """The internvl2_5 ChatML prompt of messages whose content is a list of text pieces and IMAGE
    markers (the server's parsed OpenAI messages), as token ids: the template's markup (turn
    delimiters, each image's <img> <IMG_CONTEXT>... </img>) as its special tokens, and every message's
    text as plain text, so that a client's "<|im_end|>" cannot close its turn and forge another. The
    ids equal tokenising the rendered template whole (render_chat) whenever the messages'
    text holds no special token's string: the tokenizer splits text at special tokens first, so each
    stretch between them is tokenised alone either way. A leading system message replaces the
    default one; a later one is rendered where it stands (ChatML allows it)."""
    special = lambda token: tokenizer.convert_tokens_to_ids(token)
    start, end = special("<|im_start|>"), special("<|im_end|>")
    # image_span(tiles) as ids: the markup's special tokens, never parsed from text
    span_ids = lambda tiles: tokenizer.convert_tokens_to_ids(["<img>"] + ["<IMG_CONTEXT>"] * (image_seq_length * tiles)
                                                             + ["</img>"])
    items: list = []  # str (text) or list[int] (markup ids)
    explicit = bool(turns) and turns[0]["role"] == "system"
    if explicit:  # even an empty one renders its turn, as render_chat
        system_message = "".join(p for p in turns[0]["content"] if isinstance(p, str))
        turns = turns[1:]
    if system_message or explicit:
        items += [[start], f"system\n{system_message}", [end], "\n"]
    images = iter(tiles_per_image)
    for turn in turns:
        items += [[start], f"{turn['role']}\n"]
        items += [span_ids(next(images)) if p is IMAGE else p for p in turn["content"]]
        items += [[end], "\n"]
    items += [[start], "assistant\n"]
    ids: list[int] = []
    text = ""
    for item in items + [[]]:
        if isinstance(item, str):
            text += item
            continue
        if text:
            ids += tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids
            text = ""
        ids += item
    return ids


IGNORE_INDEX = -100


def normalize_turns(conversations: list[dict[str, str]]) -> tuple[str | None, list[tuple[str, str]]]:
    """InternVL / OpenAI style turns -> (system message or None, [(role, text)]) with roles user/assistant."""
    turns = []
    for i, m in enumerate(conversations):
        if not isinstance(m, dict):
            raise ValueError(f"turn {i} must be an object with 'from'/'value' or 'role'/'content', got {type(m).__name__}")
        raw_role = m.get("from", m.get("role"))
        role = ROLES.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise ValueError(f"turn {i} has unknown role {raw_role!r}; known: {sorted(ROLES)}")
        content = m.get("value", m.get("content"))
        if not isinstance(content, str):
            raise ValueError(f"turn {i} text must be a string, got {type(content).__name__}")
        turns.append((role, content))
    system = None
    if turns and turns[0][0] == "system":
        system = turns.pop(0)[1]
    if any(role == "system" for role, _ in turns):
        raise ValueError("a system turn is only allowed first")
    return system, turns


def attach_images(turns: list[tuple[str, str]], n_images: int, prefix: str | None = None) -> list[tuple[str, str]]:
    """Images with no `<image>` in any turn go before the first user turn (`<image>\n` each by default);
    the placeholder count must then equal the image count."""
    turns = list(turns)
    # as InternVL: only user turns carry images; "<image>" in an answer stays text
    if n_images and not any(IMAGE_PLACEHOLDER in text for role, text in turns if role == "user"):
        first_user = next((i for i, (r, _) in enumerate(turns) if r == "user"), None)
        if first_user is None:
            raise ValueError("images were given but there is no user turn to attach them to")
        prefix = prefix if prefix is not None else (IMAGE_PLACEHOLDER + "\n") * n_images
        turns[first_user] = ("user", prefix + turns[first_user][1])
    n_placeholders = sum(text.count(IMAGE_PLACEHOLDER) for role, text in turns if role == "user")
    if n_placeholders != n_images:
        raise ValueError(f"conversation has {n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {n_images} image(s)")
    return turns


def encode_conversation(
    tokenizer,
    conversations: list[dict[str, str]],
    *,
    tiles_per_image: list[int] | None = None,
    image_seq_length: int = 256,
    system_message: str | None = DEFAULT_SYSTEM_MESSAGE,
    image_prefix: str | None = None,
) -> tuple[list[int], list[int]]:
    """internvl2_5 ChatML -> (input_ids, labels); labels are IGNORE_INDEX except assistant content + <|im_end|>.

    Each turn is tokenised on its own, as InternVL's preprocess does, and the assistant header
    `<|im_start|>assistant\\n` and the trailing newline are tokenised apart so that the label span is
    exact. A leading system turn overrides `system_message`; images with no `<image>` placeholder get
    `image_prefix` (default one `<image>\\n` per image) before the first user turn.
    """
    tiles_per_image = tiles_per_image or []
    record_system, turns = normalize_turns(conversations)
    if record_system is not None:
        system_message = record_system
    turns = attach_images(turns, len(tiles_per_image), image_prefix)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    input_ids: list[int] = []
    labels: list[int] = []
    if system_message or record_system is not None:  # an empty system turn of the record is still a turn
        piece = ids(f"<|im_start|>system\n{system_message}<|im_end|>\n")
        input_ids += piece
        labels += [IGNORE_INDEX] * len(piece)
    images = iter(tiles_per_image)
    header = "<|im_start|>assistant\n"
    for role, text in turns:
        if role == "user":
            n = text.count(IMAGE_PLACEHOLDER)
            text = expand_images(text, [next(images) for _ in range(n)], image_seq_length)
            piece = ids(f"<|im_start|>user\n{text}<|im_end|>\n")
            input_ids += piece
            labels += [IGNORE_INDEX] * len(piece)
        else:
            # the turn is tokenised whole, as InternVL and the chat template do (an answer starting
            # with whitespace may merge with the header's newline); labels start at the answer's
            # first character, found through the offsets
            enc = tokenizer(f"{header}{text}<|im_end|>", add_special_tokens=False, return_offsets_mapping=True)
            body = [tid if end > len(header) else IGNORE_INDEX for tid, (_, end) in zip(enc.input_ids, enc.offset_mapping)]
            tail = ids("\n")
            input_ids += enc.input_ids + tail
            labels += body + [IGNORE_INDEX] * len(tail)
    return input_ids, labels
