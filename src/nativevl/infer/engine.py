"""The inference engine: continuous batching over a static KV cache in slots.

Each running sequence owns one slot of a static cache (`slot_decoder.SlotDecoder`, which also runs
the decode step). A `step()` admits waiting requests (a prompt that starts with a prefix a free slot
kept is prefilled from there on in that slot, `infer/prefix_cache.py`; one left-padded prefill for
the others; a request for n samples is prefilled once and its cache rows copied into n slots), then runs one decode
call over slots [0, B) with B a power of two, attending to a key window [0, L) with L rounded up to
`length_quantum`: the call's shapes depend on (B, L, steps) only, so on CUDA each such bucket is
captured once as a CUDA graph (after torch.compile when available) and replayed. Free slots inside
the bucket compute garbage that no one reads, writing it at scratch positions past the cache. The
CPU runs the same static-shape step eagerly.

A decode call reads the tokens back once (one device->host sync per step; with decode_chunk N, up
to N greedy steps per call and one sync per call); this module then samples (when a request asks
for it), checks stop tokens, stop strings and budgets, streams text and finishes requests.

Threads: `submit()` may be called from any thread; `step()` from one thread only (the caller's, in
`generate()`, or the background loop started by `start()`, which the server uses).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

import torch

from nativevl.data.processor import pad_batch
from nativevl.infer.prefix_cache import PrefixCache, choose_slots, image_spans
from nativevl.infer.sampling import (  # re-exported: callers import the engine's types from here
    MAX_LOGPROBS,
    MIN_TEMPERATURE,
    Completion,
    QueueFull,
    Request,
    SamplingParams,
    Sequence,
    grow_text,
    sample_tokens,
    streamable,
    token_logprobs,
)
from nativevl.infer.slot_decoder import SlotDecoder
from nativevl.infer.vision_cache import VisionCache, prompt_embeddings
from nativevl.model import decode_kernel
from nativevl.model.text import KVCache, RotaryEmbedding
from nativevl.model.vlm import VisionLanguageModel

log = logging.getLogger(__name__)
__all__ = ["MAX_LOGPROBS", "MIN_TEMPERATURE", "Completion", "Engine", "QueueFull", "Request", "SamplingParams"]


def _bucket_batch(n: int, cap: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return min(b, cap)


def _first_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int:
    """Where the first of the stop strings begins in text[start:] (-1: none)."""
    return min((i for i in (text.find(s, start) for s in stops) if i >= 0), default=-1)


def check_options(decode_chunk: int, prefix_min_tokens: int, vision_cache_mb: float, name=lambda key: key) -> None:
    """The engine's numeric options, ValueError naming the bad one as `name(key)` (the command line checks
    its flags with them before loading a model)."""
    if decode_chunk < 1:
        raise ValueError(f"{name('decode_chunk')} must be >= 1, got {decode_chunk}")
    if prefix_min_tokens < 1:
        raise ValueError(f"{name('prefix_min_tokens')} must be >= 1, got {prefix_min_tokens}")
    if not vision_cache_mb >= 0 or vision_cache_mb == float("inf"):  # NaN fails the first test
        raise ValueError(f"{name('vision_cache_mb')} must be >= 0 (a finite number; 0: no cache), got {vision_cache_mb}")


class Engine:
    def __init__(
        self,
        model: VisionLanguageModel,
        tokenizer,
        *,
        max_batch_size: int = 32,
        max_seq_len: int = 4096,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        cuda_graphs: bool = True,
        compile: bool | None = None,
        max_queue: int = 256,
        prefill_tokens: int = 16384,
        length_quantum: int | None = None,
        fused_decode: bool = True,
        decode_chunk: int = 1,
        compile_mode: str | None = None,
        compile_options: dict | None = None,
        compile_prefill: bool = False,
        decode_attention: str = "sdpa",
        vision_cache_mb: float = 256,
        suppress_token_ids: tuple[int, ...] = (),
        prefix_cache: bool = True,
        prefix_min_tokens: int = 64,
    ) -> None:
        """`dtype`/`device` move the model (in place) when given. `compile` (default: with CUDA graphs
        on CUDA) compiles the decode step before capture. `length_quantum`: the key window grows in
        steps of this many positions (each step a new graph); `prefill_tokens` bounds one prefill's
        padded tokens. `fused_decode` (default) runs the decode step with q/k/v and gate/up projections
        fused into one matmul each (weights concatenated once here: call `refresh_weights()` after
        changing the model's weights), attention read in place from the cache without expanding GQA
        heads, one mask and one RoPE per step for all layers, and the greedy argmax inside the step;
        False runs the model's own decoder layers (the reference path).

        `decode_chunk` > 1: while every running sample is greedy (no sampling, no repetition penalty),
        one call runs up to this many decode steps back to back on the device, each step's argmax the
        next step's input token, and the host reads the tokens once per call (one graph replay and one
        device->host sync per chunk instead of per token). Chunks are powers of two no longer than the
        longest remaining budget (max_tokens); tokens past a sample's stop are discarded, so outputs are
        those of single steps. Streaming then arrives in bursts of up to this many tokens, and a request
        arriving meanwhile waits for the chunk to end. `compile_mode` is torch.compile's mode for the
        decode step (e.g. "max-autotune-no-cudagraphs"; this engine captures its own graphs);
        `compile_options` its Inductor options instead (torch.compile takes one or the other), e.g.
        `slot_decoder.GEMV_OPTIONS`: batch-1 matrix products as Triton reductions fused with the ops
        around them (`nativevl serve/chat --decode-gemv`). Both apply on CUDA only, where the step is compiled.
        `compile_prefill` compiles the prefill's decoder layer (on any device; one graph for all layers and
        prompt lengths, made at the first prompts): fewer kernels and no per-operation launch cost for
        prompts admitted together at one length (one prompt, or n samples of one); prompts of different
        lengths admitted together run the model's padded forward uncompiled.
        `decode_attention`: the fused step's attention kernel, "sdpa" or "split" (the Triton split-key
        kernel, CUDA only: see `model/decode_kernel.py`). `vision_cache_mb`: the budget of the image
        features kept for requests that name their images (`submit(image_keys=...)`; 0: none kept).
        `suppress_token_ids`: tokens never generated, greedy or sampled (as `generate`'s suppress_tokens:
        evaluation suppresses the image placeholder, which a small or badly trained model may emit).
        `prefix_cache` (with `fused_decode`): a finished sequence's slot keeps its keys and values, and a
        prompt that starts with at least `prefix_min_tokens` of its tokens (images included when they carry
        the same `image_keys`) is prefilled from there on in that slot (`infer/prefix_cache.py`): the next
        turn of a conversation runs its new tokens only."""
        if max_batch_size < 1 or max_seq_len < 2:
            raise ValueError(f"max_batch_size must be >= 1 and max_seq_len >= 2, got {max_batch_size}, {max_seq_len}")
        check_options(decode_chunk, prefix_min_tokens, vision_cache_mb)
        SlotDecoder.check(fused=fused_decode, attention=decode_attention, compile_mode=compile_mode,
                          compile_options=compile_options, compile_prefill=compile_prefill)
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device, self.dtype = model.device, model.dtype
        cfg = model.config.text
        self.max_batch_size, self.max_seq_len, self.max_queue = max_batch_size, max_seq_len, max_queue
        self.prefill_tokens = prefill_tokens
        if cfg.rope_type == "dynamic" and max_seq_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_seq_len {max_seq_len} is past max_position_embeddings {cfg.max_position_embeddings}: dynamic "
                "RoPE would rescale, which the static decode step does not do"
            )
        # below max_position_embeddings dynamic RoPE equals the default one, minus its host sync
        self.rope = RotaryEmbedding(dataclasses.replace(cfg, rope_type="default"))
        on_cuda = self.device.type == "cuda"
        if decode_attention == "split" and (why := decode_kernel.available(self.device)):
            raise ValueError(why)
        self.length_quantum = length_quantum or (256 if on_cuda else 16)
        eos = {cfg.eos_token_id}
        if tokenizer is not None:  # None (benchmarks): token ids only, completions have empty text
            tid = tokenizer.convert_tokens_to_ids("<|im_end|>")
            if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None):
                eos.add(tid)
            if tokenizer.eos_token_id is not None:
                eos.add(tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)
        self.slots: list[Sequence | None] = [None] * max_batch_size
        self.lengths = [0] * max_batch_size  # host copies: cached entries per slot
        self.positions = [0.0] * max_batch_size
        self.next_tokens = [0] * max_batch_size
        self._waiting: deque[Request] = deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._prefill_error: BaseException | None = None
        self.decode_chunk = int(decode_chunk)
        self.vision_cache = VisionCache(int(vision_cache_mb * 2**20)) if vision_cache_mb > 0 else None
        self.prefixes = PrefixCache(max_batch_size, prefix_min_tokens) if prefix_cache and fused_decode else None
        vocab = model.config.text.vocab_size
        if any(not 0 <= t < vocab for t in suppress_token_ids):
            raise ValueError(f"suppress_token_ids must be in [0, {vocab}), got {sorted(suppress_token_ids)}")
        suppress = (torch.tensor(sorted(set(suppress_token_ids)), device=self.device) if suppress_token_ids else None)
        self.stats: dict = {"prefills": 0, "prefill_batches": 0, "decode_steps": 0, "decode_calls": 0,
                            "decode_tokens": 0, "graph_captures": 0, "prefix_hits": 0, "prefix_tokens": 0}
        # the cache is a multiple of 16 positions long, so that every key window is too (sdpa's
        # memory-efficient kernel pads a mask whose length is not aligned, an extra copy per layer)
        self.decoder = SlotDecoder(
            model, self.rope, max_batch_size=max_batch_size, cache_len=-(-max_seq_len // 16) * 16,
            fused=fused_decode, attention=decode_attention, graphs=bool(cuda_graphs and on_cuda),
            compile=bool(cuda_graphs and on_cuda) if compile is None else bool(compile and on_cuda),
            compile_mode=compile_mode, compile_options=compile_options,
            compile_prefill=compile_prefill, length_quantum=self.length_quantum, chunk=self.decode_chunk,
            suppress=suppress, stats=self.stats)
        self.stats["decode_mode"] = self.decode_mode

    @property
    def decode_mode(self) -> str:
        return self.decoder.mode

    def refresh_weights(self) -> None:
        """Rebuild the fused decode weights from the model's (call it after changing them, while no request
        runs; captured CUDA graphs stay valid). The vision cache's features and the kept prefixes, made by
        the old weights, are dropped."""
        if self.vision_cache is not None:
            self.vision_cache.clear()
        if self.prefixes is not None:
            self.prefixes.clear()
        self.decoder.refresh_weights()

    # ------------------------------------------------------------------ public API

    def submit(
        self,
        input_ids: list[int],
        params: SamplingParams = SamplingParams(),
        pixel_values: torch.Tensor | None = None,
        *,
        on_event: Callable[[str, int, object], None] | None = None,
        preprocess_s: float = 0.0,
        image_keys: list | None = None,
        tiles_per_image: list[int] | None = None,
    ) -> Request:
        """Queue one tokenised prompt. on_event(kind, index, payload) is called from the engine's
        thread (or from cancel()'s caller for a request cancelled while waiting): ("delta", i, text), ("finish", i, Completion), then ("done", -1, completions) or
        ("error", -1, exception). preprocess_s (image decoding, tokenising) goes into the timing log.
        image_keys: one key per image of the prompt, naming its pixels (`vision_cache.image_key`: a hash of
        the image file and its tiling), with `tiles_per_image`: an image whose features the vision cache
        holds does not run through the ViT again."""
        prompt = [int(t) for t in input_ids]
        vocab = self.model.config.text.vocab_size
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; this engine holds at most {self.max_seq_len - 1}")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {min(prompt)}..{max(prompt)}")
        if params.n > self.max_batch_size:
            raise ValueError(f"n = {params.n} samples exceed max_batch_size {self.max_batch_size}")
        if image_keys is not None:
            tiles = 0 if pixel_values is None else pixel_values.shape[0]
            if tiles_per_image is None or len(tiles_per_image) != len(image_keys) or sum(tiles_per_image) != tiles:
                raise ValueError(f"{len(image_keys)} image keys with tiles per image {tiles_per_image} do not match "
                                 f"the {tiles} tiles given")
        req = Request(prompt, params, pixel_values, on_event)
        req.image_keys, req.tiles_per_image = image_keys, tiles_per_image
        req.timings["preprocess_s"] = preprocess_s
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (max_queue {self.max_queue})")
            self._waiting.append(req)
            self._lock.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        """Stop generating for `req` (a client went away): a waiting request leaves the queue now (its
        place counts no more against max_queue), a running one frees its slots at the next step."""
        req.cancelled = True
        with self._lock:
            try:
                self._waiting.remove(req)
            except ValueError:  # admitted already (or done): the step releases its slots
                return
        req._finish(req._cancelled_error())

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return sum(s is not None for s in self.slots)

    def generate(
        self,
        input_ids: list[list[int]],
        params: SamplingParams | list[SamplingParams] = SamplingParams(),
        pixel_values: list[torch.Tensor | None] | None = None,
        image_keys: list[list | None] | None = None,
        tiles_per_image: list[list[int] | None] | None = None,
    ) -> list[list[Completion]]:
        """One list of n completions per prompt; runs the steps itself unless `start()` was called.
        `image_keys` / `tiles_per_image`: each prompt's (or None), as `submit` takes them."""
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(input_ids)
        pvs = list(pixel_values) if pixel_values is not None else [None] * len(input_ids)
        keys = list(image_keys) if image_keys is not None else [None] * len(input_ids)
        counts = list(tiles_per_image) if tiles_per_image is not None else [None] * len(input_ids)
        if not len(plist) == len(pvs) == len(keys) == len(counts) == len(input_ids):
            raise ValueError(f"{len(input_ids)} prompts but {len(plist)} params, {len(pvs)} pixel_values, "
                             f"{len(keys)} image_keys and {len(counts)} tiles_per_image")
        reqs: list[Request] = []
        try:
            for ids, p, pv, k, c in zip(input_ids, plist, pvs, keys, counts):
                reqs.append(self.submit(ids, p, pv, image_keys=k, tiles_per_image=c))
            while self._thread is None and not all(r.done for r in reqs):
                self.step()
        except BaseException:  # a bad prompt, a full queue, a failed step or ^C: no one would read the others' results
            for r in reqs:
                self.cancel(r)
            raise
        return [r.result() for r in reqs]

    def stream(self, input_ids: list[int], params: SamplingParams = SamplingParams(),
               pixel_values: torch.Tensor | None = None) -> Iterator[str]:
        """Text deltas of sample 0 as they are generated (n must be 1)."""
        if params.n != 1:
            raise ValueError(f"stream() yields one sample; got n = {params.n}")
        events: queue.Queue = queue.Queue()
        req = self.submit(input_ids, params, pixel_values, on_event=lambda k, i, p: events.put((k, p)))
        try:
            while True:
                if self._thread is None:
                    while events.empty():
                        self.step()
                kind, payload = events.get()
                if kind == "delta":
                    yield payload
                elif kind == "error":
                    raise payload
                elif kind == "done":
                    return
        finally:  # the caller stopped reading (or a step failed): free the slot
            if not req.done:
                self.cancel(req)

    def start(self) -> None:
        """Run steps in a background thread (for servers); generate() then only submits and waits."""
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="nativevl-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the background loop. Requests still waiting or running fail (RuntimeError), so that no
        caller of result() / generate() / stream() waits on them forever."""
        if self._thread is None:
            return
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        self._thread.join()
        self._thread = None
        error = RuntimeError("the engine shut down before this request finished")
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for req in waiting:
            req._finish(error)
        for seq in [s for s in self.slots if s is not None]:
            if not seq.req.done:
                seq.req._finish(error)
            self._release(seq)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._waiting and self.num_running == 0:
                    self._lock.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception as e:  # a failed step fails its requests; the engine keeps serving
                log.exception("engine step failed")
                if e is not self._prefill_error:  # a failed prefill has failed its own requests already
                    self._fail_running(e)
                self._prefill_error = None

    def _fail_running(self, error: BaseException) -> None:
        for seq in self.slots:
            if seq is not None and not seq.req.done:
                seq.req._finish(error)
        self.slots = [None] * self.max_batch_size
        self.lengths = [0] * self.max_batch_size
        if self.prefixes is not None:  # what a failed step left in the cache is not to be trusted
            self.prefixes.clear()

    # ------------------------------------------------------------------ scheduling

    def step(self) -> bool:
        """Admit and prefill waiting requests, then one decode call (one step, or a chunk of greedy
        steps with decode_chunk > 1). True while work remains."""
        for seq in self.slots:
            if seq is not None and seq.req.cancelled:
                self._drop_cancelled(seq)
        admitted = self._admit()
        if admitted:
            try:
                self._prefill(admitted)
            except BaseException as e:  # e.g. out of memory: these requests hold no slot, so fail them here
                for req in admitted:
                    if not req.done:
                        for seq in self.slots:
                            if seq is not None and seq.req is req:
                                self._release(seq)
                        req._finish(e)
                self._prefill_error = e  # the running requests are untouched: _loop keeps them going
                raise
        active = [s for s in self.slots if s is not None]
        if active:
            self._decode(active)
        return bool(self._waiting) or self.num_running > 0

    def _admit(self) -> list[Request]:
        free = sum(s is None for s in self.slots)
        admitted: list[Request] = []
        longest = 0
        with self._lock:
            while self._waiting:
                req = self._waiting[0]
                if req.cancelled:
                    self._waiting.popleft()
                    req._finish(req._cancelled_error())
                    continue
                width = max(longest, len(req.prompt))
                if req.params.n > free or (admitted and width * (len(admitted) + 1) > self.prefill_tokens):
                    break
                self._waiting.popleft()
                admitted.append(req)
                free -= req.params.n
                longest = width
        return admitted

    def _drop_cancelled(self, seq: Sequence) -> None:
        """Free a cancelled request's slot and fail it (once) with its reason."""
        self._release(seq)
        if not seq.req.done:
            seq.req._finish(seq.req._cancelled_error())

    def _release(self, seq: Sequence) -> None:
        self.slots[seq.slot] = None
        self.lengths[seq.slot] = 0

    @torch.no_grad()
    def _prefill(self, reqs: list[Request]) -> None:
        """Prefill the admitted requests: those whose prompt starts with a prefix a free slot holds
        (prefix reuse) one by one on top of it, the others in one (left-padded) batch."""
        t0 = time.perf_counter()
        rest = []
        cfg = self.model.config
        for req in reqs:
            req.timings["admitted"] = t0
            if self.prefixes is None:
                rest.append(req)
                continue
            req.image_spans = image_spans(req.prompt, cfg.image_token_id, cfg.image_seq_length, req.tiles_per_image,
                                          req.image_keys)
            hit = self.prefixes.match(req.prompt, req.image_spans, [i for i, s in enumerate(self.slots) if s is None])
            if hit is None:
                rest.append(req)
                continue
            slot, reused = hit
            try:
                x = prompt_embeddings(self.model, self.vision_cache, req, reused)
            except ValueError as e:  # e.g. image tokens that do not match the tiles: this request only
                req._finish(e)
                continue
            slots = [slot, *self._take_slots(req.params.n - 1, claimed={slot})]
            logits = self.decoder.extend(x[None], slot, reused).float()  # (1, V)
            for other in slots[1:]:  # n samples: the prompt's keys copied into every sample's slot
                self.decoder.copy_slot(slot, other, len(req.prompt))
            self.stats["prefix_hits"] += 1
            self.stats["prefix_tokens"] += reused
            req.timings["prefix_reused"] = reused
            self._start([req], [slots], logits, [float(len(req.prompt))])
        if rest:
            self._prefill_batch(rest)

    def _take_slots(self, count: int, claimed: set[int] = frozenset()) -> list[int]:
        """`count` free slots, none of `claimed` (prefix_cache.choose_slots)."""
        return choose_slots(self.slots, count, claimed, self.prefixes, lambda n: _bucket_batch(n, self.max_batch_size))

    def _prefill_batch(self, reqs: list[Request]) -> None:
        """One prefill of whole prompts: left-padded, or unpadded with the fused layers when the lengths agree."""
        model = self.model
        embeds, ok = [], []
        for req in reqs:
            try:
                embeds.append(prompt_embeddings(self.model, self.vision_cache, req))
                ok.append(req)
            except ValueError as e:  # e.g. image tokens that do not match the tiles: this request only
                req._finish(e)
        if not ok:
            return
        lengths = [len(r.prompt) for r in ok]
        width = max(lengths)
        _, mask = pad_batch([r.prompt for r in ok], 0)
        batch = torch.zeros(len(ok), width, embeds[0].shape[-1], device=self.device, dtype=embeds[0].dtype)
        for row, e in enumerate(embeds):
            batch[row, width - e.shape[0]:] = e  # left padding
        slots: list[list[int]] = []
        for req in ok:  # one prefill per request, n slots
            slots.append(self._take_slots(req.params.n, claimed={s for row in slots for s in row}))
        if self.decoder.fused and min(lengths) == width:
            # no padding (one prompt, or equal lengths): the trimmed forward writes straight into the slots
            logits = self.decoder.prefill(batch, slots).float()  # (R, V)
            next_pos = [float(width)] * len(ok)
        else:
            mask = mask.to(self.device) if min(lengths) < width else None  # none needed without padding
            out = model(inputs_embeds=batch, attention_mask=mask, use_cache=True, logits_to_keep=1)
            cache: KVCache = out.cache
            next_pos = cache.next_position.tolist()
            logits = out.logits[:, -1].float()  # (R, V)
            self.decoder.write_prefill(cache, lengths, width, slots)  # one prefill, copied into every sample's slot
        self._start(ok, slots, logits, next_pos)

    def _start(self, ok: list[Request], slots: list[list[int]], logits: torch.Tensor, next_pos: list[float]) -> None:
        """Prefilled requests start running: their samples take their slots, and each its first token
        from the logits (R, V) of its request's row."""
        seqs, rows = [], []
        taken = [slot for row in slots for slot in row]
        if len(set(taken)) != len(taken) or any(self.slots[slot] is not None for slot in taken):
            raise RuntimeError(f"slots {taken} given to new samples are not all free and distinct")  # a scheduler bug
        for row, req in enumerate(ok):
            for j, slot in enumerate(slots[row]):
                stop_ids = frozenset(req.params.stop_token_ids) | (frozenset() if req.params.ignore_eos else self.eos_ids)
                seq = Sequence(req, j, slot, stop_ids)
                self.slots[slot], self.lengths[slot], self.positions[slot] = seq, len(req.prompt), next_pos[row]
                seqs.append(seq)
                rows.append(row)
        self.stats["prefills"] += len(ok)
        self.stats["prefill_batches"] += 1
        logits = self.decoder.suppressed(logits)
        tokens = sample_tokens(logits[rows], seqs)
        scored = [i for i, s in enumerate(seqs) if s.logprobs is not None]
        entries = (token_logprobs(logits[[rows[i] for i in scored]], [tokens[i] for i in scored],
                                  [seqs[i] for i in scored]) if scored else {})
        now = time.perf_counter()
        for req in ok:
            req.timings["first_token"] = now
        for seq, tok in zip(seqs, tokens):
            self._append(seq, tok, entries.get(id(seq)))

    def _chunk_steps(self, active: list[Sequence], batch: int) -> int:
        """Decode steps for this call: 1 unless decode_chunk > 1 and every active sample is greedy; then
        the largest power of two within decode_chunk, the longest remaining max_tokens budget, and the
        cache (every row of the bucket writes `steps` keys from its length on, free rows included)."""
        if self.decode_chunk == 1 or any(s.generator is not None or s.seen is not None or s.logprobs is not None
                                         for s in active):
            return 1
        # tokens each sample may still produce: its max_tokens, and what max_seq_len leaves it
        budget = max(min(s.req.params.max_tokens, self.max_seq_len + 1 - len(s.req.prompt)) - len(s.tokens)
                     for s in active)
        room = self.decoder.cache_len - max(self.lengths[:batch])
        limit = max(1, min(self.decode_chunk, budget, room))
        return 1 << (limit.bit_length() - 1)

    @torch.no_grad()
    def _decode(self, active: list[Sequence]) -> None:
        batch = _bucket_batch(max(s.slot for s in active) + 1, self.max_batch_size)
        steps = self._chunk_steps(active, batch)
        longest = max(self.lengths[s.slot] for s in active)
        q = self.length_quantum
        window = min(-(-(longest + steps) // q) * q, self.decoder.cache_len)
        # a free slot in the batch writes its garbage key at the scratch positions, not over a kept prefix
        lengths = [n if seq is not None else self.decoder.scratch for seq, n in zip(self.slots, self.lengths)]
        logits, greedy = self.decoder.run([self.next_tokens, self.positions, lengths], batch, window, steps)
        if steps == 1 and any(s.generator is not None or s.seen is not None for s in active):
            tokens = sample_tokens(logits[[s.slot for s in active]].float(), active)
            picked = [[0] * batch]  # one row indexed by slot, as the greedy path's
            for seq, tok in zip(active, tokens):
                picked[0][seq.slot] = tok
        else:
            picked = greedy.tolist()  # (steps, batch): the one device->host sync of the call
        scored = [s for s in active if s.logprobs is not None]  # a chunk is 1 step whenever one asks
        entries = (token_logprobs(logits[[s.slot for s in scored]], [picked[0][s.slot] for s in scored], scored)
                   if scored else {})
        self.stats["decode_steps"] += steps
        self.stats["decode_calls"] += 1
        for row in picked:
            for seq in active:
                if self.slots[seq.slot] is not seq:  # finished earlier in this chunk: the rest is discarded
                    continue
                if seq.req.cancelled:  # cancelled, or its consumer failed, earlier in this chunk
                    self._drop_cancelled(seq)
                    continue
                self.stats["decode_tokens"] += 1
                self.lengths[seq.slot] += 1
                self.positions[seq.slot] += 1.0
                self._append(seq, row[seq.slot], entries.get(id(seq)))

    # ------------------------------------------------------------------ sampling and stopping

    def _text(self, tokens: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _append(self, seq: Sequence, token: int, logprob: dict | None = None) -> None:
        p = seq.req.params
        if token in seq.stop_ids:
            return self._finish(seq, "stop", stop_token=token)
        seq.tokens.append(token)
        if seq.logprobs is not None:
            seq.logprobs.append(logprob)
            seq.req._emit("logprobs", seq.index, logprob)  # before the text it belongs to is released
        if seq.seen is not None:
            seq.seen.add(token)
        self.next_tokens[seq.slot] = token
        if p.stop and self.tokenizer is not None:
            searched = len(seq.text) + len(seq.pending)
            text = grow_text(self.tokenizer, seq) + seq.pending  # what the tokens say so far
            if len(text) > searched:  # a stop string ending in the new text starts at most this far back
                cut = _first_stop(text, p.stop, max(0, searched - max(len(s) for s in p.stop) + 1))
                if cut >= 0:
                    return self._finish(seq, "stop", text[:cut])
        if len(seq.tokens) >= p.max_tokens or len(seq.req.prompt) + len(seq.tokens) > self.max_seq_len:
            return self._finish(seq, "length")
        if seq.req.on_event is not None and self.tokenizer is not None:
            text = seq.text if p.stop else grow_text(self.tokenizer, seq)
            end = streamable(text, p.stop)
            if end > seq.sent:
                seq.req._emit("delta", seq.index, text[seq.sent:end])
                seq.sent = end

    def _finish(self, seq: Sequence, reason: str, text: str | None = None, stop_token: int | None = None) -> None:
        req = seq.req
        if text is None:
            text = self._text(seq.tokens)
            cut = _first_stop(text, req.params.stop) if req.params.stop else -1
            if cut >= 0:  # a stop string that only a character still incomplete would have shown
                text, reason, stop_token = text[:cut], "stop", None
        if len(text) > seq.sent:
            req._emit("delta", seq.index, text[seq.sent:])
        done = Completion(token_ids=list(seq.tokens), text=text, finish_reason=reason,
                          logprobs=list(seq.logprobs) if seq.logprobs is not None else None, stop_token_id=stop_token)
        req.completions[seq.index] = done
        req._emit("finish", seq.index, done)
        if self.prefixes is not None:  # the slot holds the keys of the prompt and of the tokens fed back
            self.prefixes.record(seq.slot, (req.prompt + seq.tokens)[: self.lengths[seq.slot]], req.image_spans)
        self._release(seq)
        if all(c is not None for c in req.completions):
            req.log_timings()
            req._finish(req.callback_error)  # a consumer that failed on the last events still fails
