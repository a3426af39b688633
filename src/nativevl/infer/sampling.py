"""Requests, sampling and stopping state of the engine (`infer/engine.py`): what a caller submits
(`SamplingParams`), gets back (`Completion`, `Request`), the per-sample state the engine keeps
(`Sequence`), and the sampling of next tokens from a step's logits with each sample's own settings."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass

import torch

log = logging.getLogger("nativevl.infer.engine")  # the engine's log: one logger for request lines


MIN_TEMPERATURE = 1e-5  # a lower temperature decodes greedily
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 (or below MIN_TEMPERATURE) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k
    repetition_penalty: float = 1.0
    seed: int | None = None  # sample j of a request draws from its own generator seeded (seed, j)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1
    ignore_eos: bool = False  # benchmarks: do not stop at <|im_end|> / eos (explicit stop_token_ids still stop)
    logprobs: int | None = None  # each token's log-probability and this many most likely alternatives (0-20)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0 or self.temperature == float("inf"):  # NaN compares False
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.repetition_penalty < float("inf"):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")


@dataclass
class Completion:
    token_ids: list[int]  # generated tokens; a stop token is not included, the tokens of a stop string are
    text: str  # decoded without special tokens, cut before a stop string
    finish_reason: str  # "stop" | "length"
    # with SamplingParams.logprobs: per token {"token_id", "logprob", "top": [(token id, logprob), ...]},
    # log-probabilities of the model's distribution (before temperature, top-k/p and penalties)
    logprobs: list[dict] | None = None
    stop_token_id: int | None = None  # the stop token that ended it (generated, so counted in a server's usage)


class QueueFull(RuntimeError):
    """More requests are waiting than the engine's max_queue allows (the server answers 429)."""


class Request:
    """One submitted prompt: its n completions, events for streaming, and timings (seconds)."""

    _ids = itertools.count()

    def __init__(self, prompt: list[int], params: SamplingParams, pixel_values, on_event) -> None:
        self.id = next(Request._ids)
        self.prompt, self.params, self.pixel_values, self.on_event = prompt, params, pixel_values, on_event
        self.completions: list[Completion | None] = [None] * params.n
        self.error: BaseException | None = None
        self.cancelled = False
        self.callback_error: BaseException | None = None  # what on_event raised, if it did
        self.timings = {"submitted": time.perf_counter()}
        # the vision cache's keys of the prompt's images and their tile counts (Engine.submit), or None
        self.image_keys: list | None = None
        self.tiles_per_image: list[int] | None = None
        self.image_spans: list = []  # prefix_cache.ImageSpan of each image, set at admission (prefix reuse)
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> list[Completion]:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish in {timeout} s")
        if self.error is not None:
            raise self.error
        return list(self.completions)

    def _emit(self, kind: str, index: int, payload) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(kind, index, payload)
        except Exception as e:  # the consumer's failure: this request stops at the next step, the others go on
            log.exception("request %d: on_event(%r) failed", self.id, kind)
            if self.callback_error is None:
                self.callback_error = e
            self.cancelled = True

    def _cancelled_error(self) -> BaseException:
        return self.callback_error or RuntimeError(f"request {self.id} was cancelled")

    def _finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self.timings["finished"] = time.perf_counter()
        self._done.set()
        self._emit("error" if error is not None else "done", -1, error if error is not None else list(self.completions))

    def log_timings(self) -> None:
        t = self.timings
        now = time.perf_counter()
        n_out = sum(len(c.token_ids) for c in self.completions)
        steps = max(max(len(c.token_ids) for c in self.completions) - 1, 1)
        t.update(queue_s=t["admitted"] - t["submitted"], prefill_s=t["first_token"] - t["admitted"],
                 ttft_s=t["first_token"] - t["submitted"], decode_s=now - t["first_token"], output_tokens=n_out)
        t["tpot_s"] = t["decode_s"] / steps
        keys = self.image_keys
        cached = f" ({t.get('images_cached', 0)} of {len(keys)} images from the vision cache)" if keys else ""
        reused = f" ({t['prefix_reused']} reused)" if t.get("prefix_reused") else ""
        log.info(
            "request %d: preprocess %.1f ms, queue %.1f ms, vision %.1f ms%s, prefill %.1f ms (ttft %.1f ms), "
            "decode %.2f ms/token, %d prompt%s + %d output tokens",
            self.id, 1e3 * t.get("preprocess_s", 0.0), 1e3 * t["queue_s"], 1e3 * t.get("vision_s", 0.0), cached,
            1e3 * t["prefill_s"], 1e3 * t["ttft_s"], 1e3 * t["tpot_s"], len(self.prompt), reused, n_out,
        )


class Sequence:
    """One sample being generated in one slot."""

    def __init__(self, req: Request, index: int, slot: int, stop_ids: frozenset[int]) -> None:
        p = req.params
        self.req, self.index, self.slot, self.stop_ids = req, index, slot, stop_ids
        self.tokens: list[int] = []
        self.sent = 0  # characters of text already streamed
        # incremental detokenization (grow_text): the text of the tokens decoded so far, and the window
        # of tokens [start, read) it was last decoded from
        self.text = ""
        self.pending = ""  # the text of tokens after `read` while it ends inside a character, its whole ones
        self.start = self.read = 0
        self.generator = None
        if p.temperature >= MIN_TEMPERATURE:  # below it, dividing the logits overflows: greedy, as vLLM
            seed = int(torch.randint(0, 2**62, (1,)).item()) if p.seed is None else p.seed
            self.generator = torch.Generator().manual_seed((seed * 1_000_003 + index) % 2**63)
        self.seen = set(req.prompt) if p.repetition_penalty != 1.0 else None
        self.logprobs: list[dict] | None = [] if p.logprobs is not None else None


def sample_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits (R, V) float, one row per seq -> next token ids."""
    penalised = [i for i, s in enumerate(seqs) if s.seen is not None]
    if penalised:
        logits = logits.clone()
        for i in penalised:
            p = seqs[i].req.params.repetition_penalty
            ids = torch.tensor(sorted(seqs[i].seen), device=logits.device)
            score = logits[i, ids]
            logits[i, ids] = torch.where(score < 0, score * p, score / p)  # as transformers
    tokens = logits.argmax(-1)
    sampled = [i for i, s in enumerate(seqs) if s.generator is not None]
    if sampled:
        params = [seqs[i].req.params for i in sampled]
        sub = logits[sampled]
        temp = torch.tensor([p.temperature for p in params], device=sub.device)[:, None]
        probs, order = (sub / temp).softmax(-1).sort(dim=-1, descending=True)  # (S, V)
        rank = torch.arange(sub.shape[-1], device=sub.device)[None]
        vocab = sub.shape[-1]
        top_k = torch.tensor([min(p.top_k, vocab) or vocab for p in params], device=sub.device)[:, None]
        top_p = torch.tensor([p.top_p for p in params], device=sub.device)[:, None]
        # top-p on the distribution left by top-k (as generate, transformers and vLLM): the smallest set reaching it
        in_k = probs * (rank < top_k)
        in_k = torch.where(top_k < vocab, in_k / in_k.sum(-1, keepdim=True), probs)
        keep = (rank < top_k) & (in_k.cumsum(-1) - in_k < top_p)
        cdf = (probs * keep).cumsum(-1)
        # one uniform per row from that row's own CPU generator: reproducible whatever the batch
        u = torch.cat([torch.rand(1, generator=seqs[i].generator, dtype=torch.float64) for i in sampled])
        target = (u.to(cdf.device, torch.float32) * cdf[:, -1])[:, None]
        pick = torch.searchsorted(cdf, target).clamp(max=sub.shape[-1] - 1)
        tokens[sampled] = order.gather(-1, pick)[:, 0]
    return tokens.tolist()

def token_logprobs(logits: torch.Tensor, tokens: list[int], seqs: list[Sequence]) -> dict[int, dict]:
    """{id(seq): {"token_id", "logprob", "top"}} for the rows of `logits` (R, V), the model's own
    distribution (raw logits: no temperature or penalty)."""
    logp = logits.float().log_softmax(-1)  # (R, V)
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    k = max(s.req.params.logprobs for s in seqs)
    top_lp, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
    out = {}
    for i, seq in enumerate(seqs):
        n = seq.req.params.logprobs
        out[id(seq)] = {"token_id": tokens[i], "logprob": chosen[i],
                        "top": list(zip(top_ids[i][:n], top_lp[i][:n]))}
    return out


def grow_text(tokenizer, seq: Sequence) -> str:
    """`seq.text` extended by the text of the tokens added since the last call, and returned.

    Decoding the whole sample at every token (for streaming, stop strings) cost time growing with its
    length: ~0.3 ms a token at 2,000 tokens, as long as a GPU's decode step. This decodes a window of a
    few tokens instead, as vLLM and TGI do: the text of tokens [start, end) minus that of [start, read),
    `start` being where the previous window's new tokens began: a tokenizer that drops a leading space at
    the start of what it decodes (SentencePiece's), or merges bytes across tokens, then gives the new
    tokens the text they have in the whole. A window ending inside a character (U+FFFD) waits for the
    next token, the whole characters it already holds kept in `seq.pending` (a stop string may end
    there). The first window starts at the sample's first token, as the whole decode does (the final
    text, Engine._finish, is that whole decode)."""
    window = seq.tokens[seq.start:]
    before = tokenizer.decode(window[: seq.read - seq.start], skip_special_tokens=True)
    after = tokenizer.decode(window, skip_special_tokens=True)
    if len(after) > len(before) and not after.endswith("\ufffd"):
        seq.text += after[len(before):]
        seq.start, seq.read = seq.read, len(seq.tokens)
        seq.pending = ""
    else:  # what the held-back tokens already say (a stop string before the split character, say)
        seq.pending = after[len(before):].rstrip("\ufffd")
    return seq.text


def streamable(text: str, stops: tuple[str, ...]) -> int:
    """How much of a sample's text may be streamed now: not an incomplete UTF-8 character (it waits for
    its next byte), nor an end that may be the start of a stop string."""
    end = len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end -= k
                break
    return end
