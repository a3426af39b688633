"""An OpenAI-compatible HTTP API over the engine: /v1/chat/completions, /v1/models, /health.

Images (`image_url` parts) and videos (`video_url` parts, as vLLM takes them) come as base64 data URLs,
or as local files (file:// or a path) under the one folder the operator allows; the server never
fetches a URL. A video is asked as InternVL asks one: N frames at the centres of N equal segments, each
one tile, written "Frame1: <image>\nFrame2: <image>\n..." where the video part stands (N: the part's
"num_frames", or the server's). Every limit (body bytes, images, videos, frames, pixels, prompt tokens,
samples, waiting requests) answers with an OpenAI-style JSON error and the server goes on.
`logprobs` / `top_logprobs` give each token's log-probability under the model (before temperature and
penalties); streamed, a token's log-probabilities arrive in a chunk of their own, ahead of its text.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import logging
import math
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import NamedTuple

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from nativevl.data import images as img
from nativevl.data.template import DEFAULT_SYSTEM_MESSAGE, IMAGE, IMAGE_PLACEHOLDER, encode_prompt, video_prefix
from nativevl.infer.engine import MAX_LOGPROBS, Completion, Engine, QueueFull, SamplingParams
from nativevl.infer.vision_cache import derived_key, file_key, image_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    model_name: str = "nativevl"
    max_body_bytes: int = 32 * 2**20
    max_images: int = 8
    max_image_pixels: int = 4096 * 4096
    max_tiles: int = 12  # per request, shared between its images as InternVL does
    max_prompt_tokens: int = 8192
    max_n: int = 16
    default_max_tokens: int = 512
    allowed_local_media: str | None = None  # folder whose files requests may name; None: no local files
    max_videos: int = 1
    video_frames: int = 8  # frames of a video whose part does not say (InternVL's chat examples: 8 segments)
    max_video_frames: int = 32  # the most a video_url part's "num_frames" may ask
    system_message: str | None = DEFAULT_SYSTEM_MESSAGE


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, type: str = "invalid_request_error", param=None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.param = status, message, code, type, param

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}
        return JSONResponse(body, status_code=self.status)


def _bad(message: str, code: str = "invalid_value", param: str | None = None) -> APIError:
    return APIError(400, message, code, param=param)


# ---------------------------------------------------------------------- request -> prompt


def media_source(url: str, cfg: ServerConfig, kind: str = "image") -> bytes | str:
    """An image_url's or video_url's url -> raw bytes (data URL) or a checked local path."""
    code = f"invalid_{kind}_url"
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if not header.endswith(";base64"):
            raise _bad(f"{kind} data URLs must be base64 (data:{kind}/...;base64,...)", code, "messages")
        try:  # line-wrapped base64 (`base64 img.png`, encodebytes) is still base64
            return img.decode_base64(data)
        except (binascii.Error, ValueError):
            raise _bad(f"the {kind} data URL is not valid base64", code, "messages") from None
    if url.split(":", 1)[0].lower() in ("http", "https", "ftp"):
        raise _bad(f"this server does not fetch URLs; send the {kind} as a base64 data URL", code, "messages")
    if cfg.allowed_local_media is None:
        raise _bad(f"local {kind} files are disabled (start the server with --allowed-local-media DIR)", code,
                   "messages")
    try:  # a NUL byte, a broken IPv6 host or an over-long name is the client's mistake, not ours
        if url.lower().startswith("file:"):  # file:///a%20b.png, file://localhost/...
            parsed = urllib.parse.urlparse(url)
            if parsed.netloc not in ("", "localhost"):
                raise _bad(f"{kind} file URL {url[:200]!r} names another host", code, "messages")
            url = urllib.parse.unquote(parsed.path)
        path = Path(url).resolve()
        found = path.is_relative_to(Path(cfg.allowed_local_media).resolve()) and path.is_file()
    except (ValueError, OSError):
        found = False
    if not found:
        raise _bad(f"{kind} file {url[:200]!r} is not a file under the allowed folder", code, "messages")
    return str(path)


@dataclass(eq=False)
class Video:
    """A video_url part: where its bytes are and how many frames to take. The object itself stands where
    the video is in its message's content pieces, until `prepare` knows how many frames it gave."""

    source: bytes | str
    num_frames: int


def _video(part: dict, where: str, cfg: ServerConfig) -> Video:
    ref = part.get("video_url")
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str):
        raise _bad(f"{where}.video_url needs a url string", param="messages")
    frames = ref.get("num_frames", cfg.video_frames) if isinstance(ref, dict) else cfg.video_frames
    if not isinstance(frames, int) or isinstance(frames, bool) or not 1 <= frames <= cfg.max_video_frames:
        raise _bad(f"{where}.video_url.num_frames must be an integer in [1, {cfg.max_video_frames}], got {frames!r}",
                   param="messages")
    return Video(media_source(url, cfg, "video"), frames)


def parse_messages(messages, cfg: ServerConfig) -> tuple[list[dict], list[bytes | str | Video]]:
    """OpenAI messages -> ([{"role", "content": [str | IMAGE | Video, ...]}], image sources and videos in
    order). A message's text is only text: `<image>` or a special token's string typed by a client stays
    text (template.encode_prompt)."""

    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", param="messages")
    turns, sources = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object", param="messages")
        role = m.get("role")
        role = {"developer": "system"}.get(role, role) if isinstance(role, str) else None
        if role not in ("system", "user", "assistant"):
            raise _bad(f"messages[{i}].role {m.get('role')!r} is not system, user or assistant", param="messages")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, str):
            content = [content]
        elif isinstance(content, list):
            pieces: list = []
            last = None
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    if last == "text":  # consecutive text parts joined by a newline, as vLLM does
                        pieces.append("\n")
                    pieces.append(part["text"])
                elif kind in ("image_url", "video_url"):
                    if role != "user":
                        raise _bad(f"messages[{i}]: images and videos are only allowed in user messages",
                                   param="messages")
                    if kind == "video_url":
                        sources.append(_video(part, f"messages[{i}].content[{j}]", cfg))
                        pieces.append(sources[-1])  # becomes "Frame1: <image>\n..." once decoded
                        last = kind  # its prefix ends in a newline, as an image's "<image>\n" does
                        continue
                    ref = part.get("image_url")
                    url = ref.get("url") if isinstance(ref, dict) else ref
                    if not isinstance(url, str):
                        raise _bad(f"messages[{i}].content[{j}].image_url needs a url string", param="messages")
                    sources.append(media_source(url, cfg))
                    pieces += [IMAGE, "\n"]  # InternVL's "<image>\n" before the text it belongs to
                else:
                    raise _bad(f"messages[{i}].content[{j}] must be a text, image_url or video_url part",
                               param="messages")
                last = kind
            content = pieces
        else:
            raise _bad(f"messages[{i}].content must be a string or a list of parts", param="messages")
        if not all(_encodable(p) for p in content if isinstance(p, str)):
            raise _bad(f"messages[{i}] holds text that is not valid Unicode (a lone surrogate such as \\ud800)",
                       param="messages")
        n_videos = sum(isinstance(s, Video) for s in sources)
        if len(sources) - n_videos > cfg.max_images:
            raise _bad(f"a request may hold at most {cfg.max_images} images", "too_many_images", "messages")
        if n_videos > cfg.max_videos:
            raise _bad(f"a request may hold at most {cfg.max_videos} video(s)", "too_many_videos", "messages")
        turns.append({"role": role, "content": content})
    return turns, sources


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _value(body: dict, names: tuple[str, ...], default, kind, lo=None, hi=None):
    name = next((n for n in names if body.get(n) is not None), names[0])
    value = body.get(name, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _bad(f"'{name}' must be a {kind.__name__}, got {value!r}", param=name)
    if kind is float and not math.isfinite(value):  # json.loads reads NaN and Infinity, which compare False
        raise _bad(f"'{name}' must be a finite number, got {value!r}", param=name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _bad(f"'{name}' must be in [{lo}, {hi}], got {value}", param=name)
    return value


def sampling_params(body: dict, cfg: ServerConfig) -> SamplingParams:
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise _bad("'stop' must be a non-empty string or a list of at most 4 of them", param="stop")
    for name in ("frequency_penalty", "presence_penalty"):
        if _value(body, (name,), 0.0, float) != 0:
            raise _bad(f"'{name}' is not supported (use repetition_penalty)", "unsupported_parameter", name)
    want_logprobs = body.get("logprobs") or False
    if not isinstance(want_logprobs, bool):
        raise _bad(f"'logprobs' must be a boolean, got {want_logprobs!r}", param="logprobs")
    top_logprobs = _value(body, ("top_logprobs",), None, int, 0, MAX_LOGPROBS)
    if top_logprobs is not None and not want_logprobs:
        raise _bad("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    # parameters that would change the output: refused rather than silently ignored
    if body.get("tools") and body.get("tool_choice", "auto") != "none":
        raise _bad("'tools' (function calling) is not supported", "unsupported_parameter", "tools")
    if body.get("functions"):
        raise _bad("'functions' (function calling) is not supported", "unsupported_parameter", "functions")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise _bad("'response_format' other than text (JSON mode, schemas) is not supported", "unsupported_parameter",
                   "response_format")
    if body.get("logit_bias"):
        raise _bad("'logit_bias' is not supported", "unsupported_parameter", "logit_bias")
    return SamplingParams(
        max_tokens=_value(body, ("max_completion_tokens", "max_tokens"), cfg.default_max_tokens, int, 1),
        temperature=_value(body, ("temperature",), 1.0, float, 0.0, 2.0),
        top_p=max(_value(body, ("top_p",), 1.0, float, 0.0, 1.0), 1e-6),  # 0: the most likely token only
        top_k=_value(body, ("top_k",), 0, int, 0),
        repetition_penalty=_value(body, ("repetition_penalty",), 1.0, float, 1e-3),
        seed=_value(body, ("seed",), None, int),
        stop=tuple(stop),
        n=_value(body, ("n",), 1, int, 1, cfg.max_n),
        logprobs=(top_logprobs or 0) if want_logprobs else None,
    )


class Prepared(NamedTuple):
    ids: list[int]
    pixel_values: torch.Tensor | None
    params: SamplingParams
    image_keys: list[str]  # one per image (a video: one per frame), for the engine's vision cache
    tiles_per_image: list[int]


def prepare(body: dict, engine: Engine, cfg: ServerConfig) -> Prepared:
    """A parsed request body -> (prompt ids, pixel values or None, sampling params, image keys, tiles per
    image); runs in a worker thread."""
    turns, sources = parse_messages(body.get("messages"), cfg)
    params = sampling_params(body, cfg)
    if params.n > engine.max_batch_size:
        raise _bad(f"'n' = {params.n} is over this server's {engine.max_batch_size} sequences at a time "
                   "(--max-batch-size)", param="n")
    vision = engine.model.config.vision
    max_num = img.tiles_per_image(cfg.max_tiles, sum(not isinstance(s, Video) for s in sources))
    tiles, keys, frames = [], [], {}  # frames: each video's frame count
    for source in sources:
        data = source.source if isinstance(source, Video) else source  # bytes, or a checked local path
        try:
            if not isinstance(source, Video) and not isinstance(data, bytes):
                data = img.read_file(data)  # a local image: read whole anyway, keyed by its bytes
            # the vision cache's key: a hash of the bytes, or a local video's path, size and time (before reading it)
            base = image_key(data) if isinstance(data, bytes) else file_key(data)
            if isinstance(source, Video):
                clip = img.load_video_frames(data, num_frames=source.num_frames, max_pixels=cfg.max_image_pixels)
                frames[source] = len(clip)
                tiles += [img.normalize(t[None]) for t in img.frame_tiles(clip, vision.image_size)]
                keys += [derived_key(base, "video", source.num_frames, k, vision.image_size) for k in range(len(clip))]
            else:
                image = img.load_image(data, max_pixels=cfg.max_image_pixels)
                tiles.append(img.normalize(img.tile_array(image, image_size=vision.image_size, max_num=max_num)))
                keys.append(derived_key(base, "image", max_num, vision.image_size))
        except (OSError, ValueError) as e:
            kind = "video" if isinstance(source, Video) else "image"
            code = f"{kind}_too_large" if "over the limit" in str(e) else f"invalid_{kind}"
            raise _bad(str(e), code, "messages") from None
    for turn in turns:  # each video -> "Frame1: ", IMAGE, "\n", "Frame2: ", ... (template.video_prefix's form)
        turn["content"] = [q for p in turn["content"]
                           for q in (_frame_pieces(frames[p]) if isinstance(p, Video) else [p])]
    per_image = [t.shape[0] for t in tiles]
    ids = encode_prompt(engine.tokenizer, turns, per_image, engine.model.config.image_seq_length, cfg.system_message)
    limit = min(cfg.max_prompt_tokens, engine.max_seq_len - 1)
    if len(ids) > limit:
        raise _bad(f"the prompt has {len(ids)} tokens, over the limit of {limit}", "context_length_exceeded", "messages")
    room = engine.max_seq_len - len(ids)  # prompt + completion fit the context, as vLLM's max_model_len
    if params.max_tokens > room:
        if any(body.get(name) is not None for name in ("max_completion_tokens", "max_tokens")):
            raise _bad(f"this model's context is {engine.max_seq_len} tokens, but {len(ids) + params.max_tokens} were "
                       f"asked ({len(ids)} in the messages, {params.max_tokens} for the completion); reduce the length "
                       "of the messages or the completion", "context_length_exceeded", "max_tokens")
        params = replace(params, max_tokens=room)  # the default: what the context leaves
    return Prepared(ids, torch.cat(tiles) if tiles else None, params, keys, per_image)


def _frame_pieces(n_frames: int) -> list:
    """video_prefix(n) as content pieces: its text, and an IMAGE marker for each `<image>`."""
    texts = video_prefix(n_frames).split(IMAGE_PLACEHOLDER)
    return [texts[0]] + [q for text in texts[1:] for q in (IMAGE, text)]


# ---------------------------------------------------------------------- the app


def create_app(engine: Engine, cfg: ServerConfig = ServerConfig()) -> FastAPI:
    app = FastAPI(title="nativevl", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):
        return APIError(e.status_code, str(e.detail), "http_error").response()

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(e).__name__}", "internal_error", "server_error").response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.num_running, "waiting": engine.num_waiting}

    card = {"id": cfg.model_name, "object": "model", "created": 0, "owned_by": "nativevl"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != cfg.model_name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {cfg.model_name!r}",
                           "model_not_found", "invalid_request_error", "model")
        return card

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        t0 = time.perf_counter()
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cfg.max_body_bytes:
            raise APIError(413, f"request body of {declared} bytes is over the limit of {cfg.max_body_bytes}",
                           "request_too_large")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > cfg.max_body_bytes:
                raise APIError(413, f"request body is over the limit of {cfg.max_body_bytes} bytes", "request_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, a 5000-digit int, [[[...]]]
            raise _bad(f"the body is not valid JSON: {type(e).__name__}: {str(e)[:200]}", "invalid_json") from None
        if not isinstance(body, dict):
            raise _bad("the body must be a JSON object", "invalid_json")
        model = body.get("model")
        if model is not None and model != cfg.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {cfg.model_name!r}",
                           "model_not_found", "invalid_request_error", "model")
        stream = body.get("stream") or False
        options = body.get("stream_options") or {}
        if not isinstance(stream, bool) or not isinstance(options, dict):
            raise _bad("'stream' must be a boolean and 'stream_options' an object", "invalid_type", "stream")
        include_usage = bool(options.get("include_usage", False))
        ids, pixel_values, params, keys, per_image = await run_in_threadpool(prepare, body, engine, cfg)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(kind, index, payload):  # engine thread -> event loop
            loop.call_soon_threadsafe(events.put_nowait, (kind, index, payload))

        try:
            req = engine.submit(ids, params, pixel_values, on_event=on_event, preprocess_s=time.perf_counter() - t0,
                                image_keys=keys or None, tiles_per_image=per_image or None)
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}", "queue_full", "rate_limit_exceeded") from None
        except ValueError as e:
            raise _bad(str(e), param="messages") from None
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if stream:
            return StreamingResponse(_sse(engine, req, events, rid, created, cfg.model_name, len(ids), include_usage),
                                     media_type="text/event-stream")

        async def watch_disconnect() -> None:  # the body is read: the next message is the client leaving
            while (await request.receive())["type"] != "http.disconnect":
                pass
            engine.cancel(req)

        watcher = asyncio.create_task(watch_disconnect())
        try:
            while True:
                kind, _, payload = await events.get()
                if kind == "error" and req.cancelled:
                    raise APIError(499, "the client closed the request", "client_closed_request")
                if kind == "error":
                    if isinstance(payload, ValueError):
                        raise _bad(str(payload), param="messages")
                    raise payload
                if kind == "done":
                    break
        finally:
            watcher.cancel()
            if not req.done:
                engine.cancel(req)
        completions: list[Completion] = payload
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": None if c.logprobs is None else {
                        "content": [_logprob_json(engine.tokenizer, e) for e in c.logprobs], "refusal": None},
                    "finish_reason": c.finish_reason} for i, c in enumerate(completions)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": cfg.model_name,
                "choices": choices, "usage": _usage(len(ids), completions)}

    return app


@cache
def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's, Qwen2's): every byte is written as a printable character,
    itself where it is printable, else one from 256 on; this maps the characters back to the bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars = {b: chr(b) for b in printable}
    for extra, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + extra)
    return {c: b for b, c in chars.items()}


def _token_bytes(tokenizer, token_id: int) -> bytes:
    """A token's own bytes (part of a UTF-8 character, say), as OpenAI's `bytes` field gives them."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    table = _byte_decoder()
    if isinstance(piece, str) and all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    return tokenizer.decode([token_id]).encode("utf-8")


def _logprob_json(tokenizer, entry: dict) -> dict:
    """An engine logprob entry as OpenAI's {token, logprob, bytes, top_logprobs}."""
    def one(token_id: int, logprob: float) -> dict:
        raw = _token_bytes(tokenizer, token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return {**one(entry["token_id"], entry["logprob"]), "top_logprobs": [one(t, lp) for t, lp in entry["top"]]}


def _usage(prompt_tokens: int, completions: list[Completion]) -> dict:
    out = sum(len(c.token_ids) + (c.stop_token_id is not None) for c in completions)  # as vLLM: the EOS counts
    return {"prompt_tokens": prompt_tokens, "completion_tokens": out, "total_tokens": prompt_tokens + out}


async def _sse(engine, req, events, rid, created, model, prompt_tokens, include_usage):
    def chunk(choices, usage=None) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    # a token's log-probabilities wait for the text they belong to and go in its chunk, as OpenAI's and
    # vLLM's streams carry them (the text of a token may be held back: part of a character, of a stop string)
    pending: dict[int, list[dict]] = {}

    def choice(index: int, delta: dict, finish_reason=None) -> dict:
        out = {"index": index, "delta": delta, "finish_reason": finish_reason}
        if pending.get(index):
            out["logprobs"] = {"content": pending.pop(index), "refusal": None}
        return out

    try:
        for i in range(req.params.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        while True:
            kind, index, payload = await events.get()
            if kind == "delta":
                yield chunk([choice(index, {"content": payload})])
            elif kind == "logprobs":
                pending.setdefault(index, []).append(_logprob_json(engine.tokenizer, payload))
            elif kind == "finish":  # with the entries of tokens whose text never came (a stop string's)
                yield chunk([choice(index, {}, payload.finish_reason)])
            elif kind == "error":
                err = {"message": str(payload), "type": "server_error", "code": "generation_failed"}
                yield f"data: {json.dumps({'error': err})}\n\n"
                break
            elif kind == "done":
                if include_usage:
                    yield chunk([], _usage(prompt_tokens, payload))
                break
        yield "data: [DONE]\n\n"
    finally:  # the client went away, or we are done
        if not req.done:
            engine.cancel(req)


# ---------------------------------------------------------------------- running it


def run(engine: Engine, cfg: ServerConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (the engine steps in its own thread)."""
    import uvicorn

    engine.start()
    try:
        uvicorn.run(create_app(engine, cfg), host=host, port=port, log_level="info")
    finally:
        engine.shutdown()


def start_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0):
    """Start uvicorn in a daemon thread (tests, notebooks); returns (server, base_url). Stop with
    server.should_exit = True."""
    import socket

    import uvicorn

    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="nativevl-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port} within {timeout} s")
        time.sleep(0.02)
    return server, f"http://{host}:{port}"
