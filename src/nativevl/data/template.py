"""The chat format: InternVL's internvl2_5 ChatML, defined once.

`<image>` in a user turn becomes `<img>` + `<IMG_CONTEXT>` x (image_seq_length * tiles) + `</img>`.
"""

from __future__ import annotations

IMAGE_PLACEHOLDER = "<image>"
# internvl2_5's default system message ("I am InternVL, developed by Shanghai AI Lab, Tsinghua University and partners").
DEFAULT_SYSTEM_MESSAGE = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def image_span(num_tiles: int, image_seq_length: int) -> str:
    return "<img>" + "<IMG_CONTEXT>" * (image_seq_length * num_tiles) + "</img>"


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

    A leading system message overrides `system_message`; None or "" means no system turn. Images
    with no `<image>` placeholder in the text get `<image>\\n` before the first user turn.
    """
    tiles_per_image = tiles_per_image or []
    turns = []
    for i, m in enumerate(messages):
        role = ROLES.get(m.get("role", m.get("from", "")))
        if role is None:
            raise ValueError(f"message {i} has unknown role {m.get('role', m.get('from'))!r}; known: {sorted(ROLES)}")
        content = m.get("content", m.get("value"))
        if not isinstance(content, str):
            raise ValueError(f"message {i} content must be a string, got {type(content).__name__}")
        turns.append((role, content))
    if turns and turns[0][0] == "system":
        system_message = turns.pop(0)[1]
    n_placeholders = sum(c.count(IMAGE_PLACEHOLDER) for _, c in turns)
    if tiles_per_image and n_placeholders == 0:
        first_user = next((i for i, (r, _) in enumerate(turns) if r == "user"), None)
        if first_user is None:
            raise ValueError("images were given but there is no user turn to attach them to")
        turns[first_user] = ("user", IMAGE_PLACEHOLDER * len(tiles_per_image) + "\n" + turns[first_user][1])
    text = f"<|im_start|>system\n{system_message}<|im_end|>\n" if system_message else ""
    for role, content in turns:
        text += f"<|im_start|>{role}\n{content}<|im_end|>\n"
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    return expand_images(text, tiles_per_image, image_seq_length)
