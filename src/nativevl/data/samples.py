"""One record -> its Samples: pictures or a video's frames loaded and tiled, the conversation through the
chat template, V2PE positions, a preference pair's two sides, a long text document's pack-sized parts.

Every record's randomness (JPEG quality, V2PE strides, video frames) comes from record_rng(seed, index),
so a record is processed the same way wherever and whenever it is processed. Anything wrong with a
record is a RecordError naming its kind (records.PROBLEMS).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from nativevl.data import images as img
from nativevl.data.packing import Sample
from nativevl.data.positions import document_positions
from nativevl.data.prm_targets import prm_placeholders, prm_step_targets
from nativevl.data.records import PreferenceRecord, Record, RecordError
from nativevl.data.template import IMAGE_PLACEHOLDER, ROLES, VIDEO_PLACEHOLDER, encode_conversation, video_prefix

if TYPE_CHECKING:
    from nativevl.data.pipeline import DataConfig

log = logging.getLogger(__name__)
_SAMPLE_SALT = 7_919


def record_rng(seed: int, index: int) -> np.random.Generator:
    """The randomness of stream item `index` (any int; -1 for a record outside a stream)."""
    return np.random.default_rng([seed, _SAMPLE_SALT, index % (1 << 63)])


def load_visuals(record: Record, cfg: DataConfig, rng: np.random.Generator) -> tuple[torch.Tensor | None, list[int], str | None]:
    """(pixel_values, tiles per image, prefix replacing <video>) of a record; RecordError for bad files."""
    if record.video is not None:
        try:
            frames = img.load_video_frames(
                record.video, rng=rng if cfg.training else None, min_frames=cfg.min_frames, max_frames=cfg.max_frames
            )
        except FileNotFoundError as e:
            raise RecordError("missing_file", f"{record.source}: {e}") from None
        except ValueError as e:
            raise RecordError("unreadable_image", f"{record.source}: {e}") from None
        tiles = img.frame_tiles(frames, cfg.image_size)
        prefix = video_prefix(len(tiles), training=True)
        return _pixels(tiles, cfg), [1] * len(tiles), prefix  # no JPEG augmentation for video
    if not record.images:
        return None, [], None
    cap = img.tiles_per_image(record.max_dynamic_patch, len(record.images))
    all_tiles, counts = [], []
    for path in record.images:
        try:
            image = img.load_image(path)
        except FileNotFoundError as e:
            raise RecordError("missing_file", f"{record.source}: {e}") from None
        except ValueError as e:
            raise RecordError("unreadable_image", f"{record.source}: {e}") from None
        if record.data_augment and cfg.training:  # JPEG re-encoding works on PIL tiles
            pil = img.jpeg_reencode(img.tile_image(image, image_size=cfg.image_size, max_num=cap), rng)
            tiles = np.stack([np.asarray(t) for t in pil]).transpose(0, 3, 1, 2)  # (n, 3, S, S) uint8
        else:
            tiles = img.tile_array(image, image_size=cfg.image_size, max_num=cap)  # (n, 3, S, S) uint8
        all_tiles.append(tiles)
        counts.append(len(tiles))
    return _pixels(np.concatenate(all_tiles), cfg), counts, None


def _pixels(tiles: np.ndarray, cfg: DataConfig) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> what the batch carries: normalised float32, or uint8 as is."""
    return torch.from_numpy(np.ascontiguousarray(tiles)) if cfg.uint8_pixels else img.normalize(tiles)


_TRUNCATION_TOLD: list[int] = []  # the record whose cut was told (a process tells it once)


def build_samples(record: Record | PreferenceRecord, tokenizer, cfg: DataConfig, index: int = -1) -> list[Sample]:
    """One record -> its Samples: one, or for a text document longer than a pack (DataConfig.long_text
    "split") its pack-sized parts in order (Sample.part 0, 1, ...); RecordError for a bad record."""
    if isinstance(record, PreferenceRecord) or record.text is None or cfg.long_text == "cut":
        return [build_sample(record, tokenizer, cfg, index)]
    ids = _text_ids(record, tokenizer)
    return [_text_sample(record, ids, cfg, index, part) for part in range(_text_parts(len(ids), cfg.max_tokens))]


def _text_ids(record: Record, tokenizer) -> list[int]:
    return tokenizer(record.text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def _text_parts(n: int, max_tokens: int) -> int:
    """Parts of an n-token document: part k starts at k * (max_tokens - 1) (one token shared with the
    part before, which it predicts from) and holds up to max_tokens tokens."""
    return 1 if n <= max_tokens else 1 + math.ceil((n - max_tokens) / (max_tokens - 1))


def _text_sample(record: Record, ids: list[int], cfg: DataConfig, index: int, part: int) -> Sample:
    start = part * (cfg.max_tokens - 1)
    chunk = np.asarray(ids[start: start + cfg.max_tokens], dtype=np.int64)
    positions = document_positions(chunk, cfg.image_token_id, v2pe="off")
    if (chunk == cfg.image_token_id).any():
        raise RecordError("placeholder_mismatch", f"{record.source}: a text document holds <IMG_CONTEXT> (the "
                          "image token id), which only images may fill")
    return _checked(Sample(chunk, chunk.copy(), positions, None, record.source, index, part=part), cfg)


def build_sample(record: Record | PreferenceRecord, tokenizer, cfg: DataConfig, index: int = -1,
                 visuals: tuple | None = None) -> Sample:
    """One record -> one Sample (document; a preference record gives a chosen/rejected pair), or RecordError.
    A text document longer than a pack gives its first max_tokens tokens (said once per process where
    DataConfig.long_text is "cut"; build_samples gives every part).
    visuals: (load_visuals' result, the record's rng after it), when already loaded (a pair's second side)."""
    if isinstance(record, PreferenceRecord):
        return _preference_sample(record, tokenizer, cfg, index)
    if visuals is not None:
        (pixel_values, counts, prefix), rng = visuals
    else:
        rng = record_rng(cfg.seed, index)
    if record.text is not None:
        ids = _text_ids(record, tokenizer)
        if len(ids) > cfg.max_tokens and cfg.long_text == "cut" and not _TRUNCATION_TOLD:
            _TRUNCATION_TOLD.append(index)  # once per process (each DataLoader worker tells once)
            log.warning("a text document (record %d, %d tokens) is longer than a pack: its first %d tokens are "
                        "trained, the rest dropped, as for any such document (data.long_text=cut; split, the "
                        "default, trains every part)", index, len(ids), cfg.max_tokens)
        return _text_sample(record, ids, cfg, index, 0)
    if visuals is None:
        pixel_values, counts, prefix = load_visuals(record, cfg, rng)
    conversations = record.conversations
    if prefix is not None:  # video: the frames replace <video> in a user turn (or lead the first one)
        conversations = [dict(t) for t in conversations]
        for turn in conversations:
            key = "value" if "value" in turn else "content"
            if ROLES.get(turn.get("from", turn.get("role"))) == "user" and VIDEO_PLACEHOLDER in turn[key]:
                turn[key] = turn[key].replace(VIDEO_PLACEHOLDER + "\n", prefix).replace(VIDEO_PLACEHOLDER, prefix)
                prefix = None
                break
    try:
        input_ids, labels = encode_conversation(
            tokenizer,
            conversations,
            tiles_per_image=counts,
            image_seq_length=cfg.image_seq_length,
            system_message=cfg.system_message,
            image_prefix=prefix,
        )
    except ValueError as e:
        kind = "placeholder_mismatch" if "placeholder" in str(e) else "malformed"
        raise RecordError(kind, f"{record.source}: {e}") from None
    input_ids = np.asarray(input_ids, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    label_weights = slots = None
    if cfg.prm_placeholder is not None:
        input_ids, slots = prm_placeholders(input_ids, labels, tokenizer, cfg.prm_placeholder)
        if cfg.prm_step_lm:
            labels, label_weights = prm_step_targets(input_ids, labels, tokenizer, cfg)
    n_slots = int((input_ids == cfg.image_token_id).sum())
    n_tiles = 0 if pixel_values is None else pixel_values.shape[0]
    if n_slots != n_tiles * cfg.image_seq_length:
        raise RecordError(
            "placeholder_mismatch",
            f"{record.source}: {n_slots} image tokens for {n_tiles} tiles x {cfg.image_seq_length} (text holds <IMG_CONTEXT>?)",
        )
    positions = document_positions(
        input_ids,
        cfg.image_token_id,
        v2pe=cfg.v2pe if cfg.training or cfg.v2pe != "random" else "fixed",
        rng=rng,
        delta=cfg.v2pe_delta,
    )
    sample = Sample(input_ids, labels, positions, pixel_values, record.source, index, label_weights=label_weights,
                    label_slots=slots)
    return _checked(sample, cfg)


def _checked(sample: Sample, cfg: DataConfig) -> Sample:
    if sample.num_tokens > cfg.max_tokens or sample.num_tiles > cfg.max_tiles:
        raise RecordError(
            "over_length",
            f"{sample.source}: {sample.num_tokens} tokens / {sample.num_tiles} tiles exceed the pack budget "
            f"({cfg.max_tokens} tokens, {cfg.max_tiles} tiles)",
        )
    if sample.num_targets == 0:
        raise RecordError("no_assistant_turn", f"{sample.source}: no token to learn")
    return sample


def _preference_sample(record: PreferenceRecord, tokenizer, cfg: DataConfig, index: int) -> Sample:
    """question + chosen and question + rejected as one pair sample sharing the image tiles (or a video's
    frames), loaded once; each side then draws from the same randomness (V2PE strides), as two records
    of the same index would."""
    question = record.question
    if record.images and IMAGE_PLACEHOLDER not in question:
        question = "\n".join([IMAGE_PLACEHOLDER] * len(record.images)) + "\n" + question
    system = [] if record.system is None else [{"from": "system", "value": record.system}]
    docs, loaded = [], None
    for response in (record.chosen, record.rejected):
        conv = Record([*system, {"from": "human", "value": question}, {"from": "gpt", "value": response}], record.images,
                      video=record.video, source=record.source, max_dynamic_patch=record.max_dynamic_patch,
                      data_augment=record.data_augment)
        if loaded is None:
            rng = record_rng(cfg.seed, index)
            loaded = (load_visuals(conv, cfg, rng), rng.bit_generator.state)
        visuals, state = loaded
        rng = np.random.default_rng()
        rng.bit_generator.state = state  # where the randomness stood after the visuals, for each side
        docs.append(build_sample(conv, tokenizer, cfg, index, visuals=(visuals, rng)))
    chosen, rejected = docs
    pair = Sample(chosen.input_ids, chosen.labels, chosen.position_ids, chosen.pixel_values, record.source, index,
                  rejected=(rejected.input_ids, rejected.labels, rejected.position_ids))
    return _checked(pair, cfg)
