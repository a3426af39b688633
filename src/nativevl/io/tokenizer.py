"""Tokenizer loading (transformers' AutoTokenizer from a local folder) and InternVL's special tokens.

`train_tokenizer` builds a small byte-level BPE tokenizer with the same special tokens and chat
template as InternVL3; tests and CPU runs use it because nothing is downloaded at run time.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
VIDEO = "<video>"
# InternVL's added tokens, in the order the Qwen-based checkpoints number them (151665...151673).
INTERNVL_TOKENS = (IMG_START, IMG_END, IMG_CONTEXT, "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
CHATML_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
REQUIRED_TOKENS = (IMG_START, IMG_END, IMG_CONTEXT, "<|im_start|>", "<|im_end|>")
# files that hold a vocabulary (fast, BPE and sentencepiece tokenizers)
VOCAB_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt", "spiece.model")

# ChatML as InternVL3's -hf checkpoints ship it: no default system prompt, an image part becomes
# <IMG_CONTEXT> on its own line (the processor expands it), a video part <video>. This is the jinja
# copy that tokenizer files carry for transformers; data/template.py is the definition, and
# tests/test_data.py pins the two to the same text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif part['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def check_special_tokens(tokenizer, source: str = "tokenizer") -> None:
    vocab = tokenizer.get_vocab()
    missing = [t for t in REQUIRED_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"{source} lacks InternVL special token(s) {missing}; is this an InternVL tokenizer?")


def load_tokenizer(path: str | Path):
    """AutoTokenizer from a local folder, checked for InternVL's special tokens."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {path} does not exist")
    # without these, AutoTokenizer returns an empty tokenizer rather than failing
    if not any((path / name).is_file() for name in VOCAB_FILES):
        raise FileNotFoundError(
            f"{path} holds no tokenizer files (none of {', '.join(VOCAB_FILES)}); was it saved without a tokenizer?"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    check_special_tokens(tokenizer, str(path))
    return tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `texts` with ChatML + InternVL special tokens.

    Special tokens come first: <|endoftext|> = 0 (pad), <|im_start|> = 1, <|im_end|> = 2 (eos),
    then <img>, </img>, <IMG_CONTEXT>, ... so ids stay stable whatever the corpus.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(CHATML_TOKENS) + list(INTERNVL_TOKENS) + [VIDEO]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "start_image_token": IMG_START,
            "end_image_token": IMG_END,
            "context_image_token": IMG_CONTEXT,
            "video_token": VIDEO,
        },
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 8192
    check_special_tokens(fast)
    return fast
