"""Plain, correct autoregressive generation with a KV cache (the fast engine is infer/engine.py's job).

Greedy or sampled (temperature, top-k, top-p); prefill once with the images, then one token per
step; rows that emit an end token are padded from then on and generation stops when all are done.
Left-padded batches are supported through `attention_mask`.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from nativevl.data.processor import pad_batch
from nativevl.model.vlm import VisionLanguageModel


def sample_next(
    logits: torch.Tensor,
    *,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _all_done(done: torch.Tensor, synced: bool) -> bool:
    """Whether every row is done: this process's, or with `synced` every process's (one all-reduce)."""
    if not (synced and torch.distributed.is_available() and torch.distributed.is_initialized()):
        return bool(done.all())
    left = (~done).sum().to(torch.float32).reshape(1)
    torch.distributed.all_reduce(left)  # the rows still going, over all processes
    return left.item() == 0


@torch.no_grad()
def generate(
    model: VisionLanguageModel,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    *,
    tile_index: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    streamer=None,
    suppress_tokens: list[int] | None = None,
    synced: bool = False,
) -> torch.Tensor:
    """input_ids (B, T) -> (B, T + n) with n <= max_new_tokens new tokens.

    `tile_index` (K,): the tile of pixel_values filling each of the prompts' K tile slots (rows asking
    about the same image share its tiles: the ViT runs on them once); None: tile k fills slot k.
    `eos_token_id` defaults to the config's; `streamer(tokens (B,))` is called after every step.
    `suppress_tokens` are never generated (e.g. the image placeholder, which a small or badly trained
    model may emit and which cannot be fed back without an image).
    `synced`: every process of the process group calls this together (a model sharded by FSDP, whose
    every forward is collective): decoding goes on until every process's rows are done, so that all
    run the same number of forwards (the rows done early are padded, as within a batch).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    cfg = model.config.text
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else int(eos_ids[0]))
    batch = input_ids.shape[0]
    if attention_mask is not None and not bool(attention_mask[:, -1].all()):
        raise ValueError("generate needs left padding: attention_mask has a 0 in its last column (right-padded row)")
    out = model(
        input_ids,
        pixel_values,
        tile_index=tile_index,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,
    )
    cache = out.cache
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    logits = out.logits[:, -1]
    suppress = None if not suppress_tokens else torch.tensor(list(suppress_tokens), device=input_ids.device)
    for step in range(max_new_tokens):
        if suppress is not None:
            logits = logits.index_fill(-1, suppress, float("-inf"))
        token = sample_next(
            logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )
        token = torch.where(done, torch.full_like(token, pad), token)
        new_tokens.append(token)
        if streamer is not None:
            streamer(token)
        done = done | torch.isin(token, eos_ids)
        if step == max_new_tokens - 1 or _all_done(done, synced):
            break
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        # the token's embedding, as transformers feeds it: a generated <IMG_CONTEXT> is text here, not an
        # image slot asking for pixels
        out = model(inputs_embeds=model.language_model.embed_tokens(token[:, None]), attention_mask=attention_mask,
                    cache=cache, use_cache=True)
        logits = out.logits[:, -1]
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)


def batch_tiles(tiles: list) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Rows' tiles -> (the batch's tiles, each once; tile_index or None). A row's tiles are None, a tensor,
    or a list of tensors (one per image); the same tensor object in several rows (or twice in one) is
    kept once, and tile_index says which of the kept tiles fills each slot of the rows, in order."""
    kept: list[torch.Tensor] = []
    first: dict[int, int] = {}  # id(tensor) -> position of its first tile among the kept ones
    index: list[int] = []
    size = 0
    for row in tiles:
        for part in () if row is None else (row,) if isinstance(row, torch.Tensor) else row:
            if id(part) not in first:
                first[id(part)] = size
                kept.append(part)
                size += part.shape[0]
            index += range(first[id(part)], first[id(part)] + part.shape[0])
    if not kept:
        return None, None
    pixels = torch.cat(kept)
    return pixels, (None if len(index) == size else torch.tensor(index))


@torch.no_grad()
def generate_texts(
    model: VisionLanguageModel,
    tokenizer,
    rows: list[tuple[list[int], torch.Tensor | list[torch.Tensor] | None]],
    *,
    batch_size: int,
    max_new_tokens: int,
    desc: str = "",
    progress: bool = True,
    **sampling,
) -> list[str]:
    """Decoded new text for each (prompt ids, tiles) row, `batch_size` rows at a time, left padded. A row's
    tiles are None, a tensor, or a list of per-image tensors, of which a tensor given to several rows of a
    batch runs through the ViT once (`batch_tiles`). The image placeholder is never generated; `sampling`
    goes to `generate` (do_sample, temperature, top_k, eos_token_id, generator, ...). `progress`: a
    progress bar over the batches."""
    device = model.device
    texts: list[str] = []
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", leave=False, disable=not progress):
        chunk = rows[start : start + batch_size]
        input_ids, mask = pad_batch([ids for ids, _ in chunk], tokenizer.pad_token_id or 0, side="left")
        pixels, tile_index = batch_tiles([t for _, t in chunk])
        out = generate(model, input_ids.to(device), None if pixels is None else pixels.to(device),
                       tile_index=None if tile_index is None else tile_index.to(device),
                       attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                       suppress_tokens=[model.config.image_token_id], **sampling)
        width = input_ids.shape[1]
        texts += [tokenizer.decode(r[width:].tolist(), skip_special_tokens=True) for r in out]
    return texts
