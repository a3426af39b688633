"""A conversation about images and videos on the engine: `nativevl chat`'s state and its session loop.

Every turn sends the whole conversation (the checkpoint's chat template over the history, every
image and video frame so far); the engine's vision cache keeps the features of the earlier ones, so
a follow-up question runs the ViT only on what it adds. A turn that fails (a bad or vanished file, a
conversation past the engine's length) leaves the conversation as it was before the turn.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import torch

from nativevl.data.images import (
    existing_file,
    frame_tiles,
    image_to_tiles,
    load_image,
    load_video_frames,
    normalize,
    read_file,
    tiles_per_image,
)
from nativevl.data.template import render_chat, video_prefix
from nativevl.infer.engine import Engine
from nativevl.infer.sampling import Completion, SamplingParams
from nativevl.infer.vision_cache import derived_key, file_key, image_key


class Conversation:
    def __init__(self, engine: Engine, tokenizer, params: SamplingParams, *, system_message: str | None,
                 max_num: int, num_frames: int) -> None:
        if num_frames < 1:
            raise ValueError(f"--num_frames must be >= 1, got {num_frames}")
        self.engine, self.tokenizer, self.params = engine, tokenizer, params
        self.system_message, self.max_num, self.num_frames = system_message, max_num, num_frames
        self.history: list[dict[str, str]] = []
        self.tiles: list[torch.Tensor] = []  # every image of the conversation, in order (a video: each frame)
        self.keys: list[str] = []  # their vision cache keys: later turns do not run the ViT on them again

    def reset(self) -> None:
        self.history.clear()
        self.tiles.clear()
        self.keys.clear()

    def _media(self, images: list[str], video: str | None) -> tuple[str, list[torch.Tensor], list[str]]:
        """The message's placeholder prefix for a video, its tiles (the video's frames, one tile each,
        then each image's) and their cache keys."""
        size = self.engine.model.config.vision.image_size
        max_num = tiles_per_image(self.max_num, len(images)) if len(images) > 1 else self.max_num
        new, keys, prefix = [], [], ""
        if video is not None:
            base = file_key(existing_file(video, "video"))  # before reading it: a file rewritten meanwhile gets its own key
            frames = frame_tiles(load_video_frames(video, num_frames=self.num_frames), size)
            new += [normalize(t[None]) for t in frames]
            keys += [derived_key(base, "video", self.num_frames, k, size) for k in range(len(frames))]
            prefix = video_prefix(len(frames))
        for path in images:
            data = read_file(path)  # keyed by its bytes: an image edited between turns is asked anew
            try:
                new.append(image_to_tiles(data, image_size=size, max_num=max_num))
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
            keys.append(image_key(data, "image", max_num, size))
        return prefix, new, keys

    def ask(self, text: str, images: list[str] = (), video: str | None = None,
            on_delta: Callable[[str], None] | None = None) -> tuple[Completion, dict]:
        """One turn: the answer (its text streamed to on_delta) and what it took (tiles the message
        added, prompt tokens, seconds)."""
        images = list(images)
        prefix, new, keys = self._media(images, video)
        start = time.perf_counter()
        cfg = self.engine.model.config
        self.history.append({"role": "user", "content": prefix + "<image>\n" * len(images) + text})
        n_tiles = len(self.tiles)
        self.tiles.extend(new)
        self.keys.extend(keys)
        req = None
        try:
            prompt = render_chat(self.history, tiles_per_image=[t.shape[0] for t in self.tiles],
                                 image_seq_length=cfg.image_seq_length, system_message=self.system_message)
            ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
            show = None if on_delta is None else (lambda kind, index, payload: on_delta(payload) if kind == "delta" else None)
            req = self.engine.submit(ids, self.params, torch.cat(self.tiles) if self.tiles else None, on_event=show,
                                     image_keys=self.keys or None,
                                     tiles_per_image=[t.shape[0] for t in self.tiles] or None)
            while not req.done:
                self.engine.step()
            done = req.result()[0]
        except BaseException:  # e.g. a conversation past the engine's length, or ^C: as if never asked
            if req is not None:
                self.engine.cancel(req)
            self.history.pop()
            del self.tiles[n_tiles:], self.keys[n_tiles:]
            raise
        self.history.append({"role": "assistant", "content": done.text})
        return done, {"tiles": sum(t.shape[0] for t in new), "prompt_tokens": len(ids),
                      "seconds": time.perf_counter() - start}


def _write(stream: TextIO) -> Callable[[str], None]:
    def write(text: str) -> None:
        stream.write(text)
        stream.flush()

    return write


def answer(conversation: Conversation, text: str, images: list[str] = (), video: str | None = None) -> None:
    """Ask, the answer streamed to stdout, its figures to stderr."""
    done, took = conversation.ask(text, images, video, on_delta=_write(sys.stdout))
    sys.stdout.write("\n")  # each answer on its own lines, also when stdout is a file or a pipe
    sys.stdout.flush()
    print(f"[{len(done.token_ids)} tokens in {took['seconds']:.2f}s, {took['tiles']} tile(s), "
          f"prompt {took['prompt_tokens']} tokens]", file=sys.stderr)


def _unreadable(kind: str, path: str) -> str | None:
    """Why an image (its header) or a video (its first frame) cannot be read; None when it can."""
    try:
        if kind == "image":
            load_image(path)  # its own checks and messages (format, pixel limit, truncated data)
        else:
            import av

            try:
                with av.open(path) as container:  # the first frame only: a long video is not read through
                    next(container.decode(video=0))
            except (av.error.FFmpegError, StopIteration, IndexError) as e:
                return f"{path}: cannot decode the video: {str(e) or 'it has no frames'}"
    except (OSError, ValueError) as e:
        return f"{path}: {e}"
    return None


def session(conversation: Conversation, images: list[str] = (), video: str | None = None) -> int:
    """Multi-turn on stdin: /image PATH and /video PATH attach to the next message, /reset, /quit.
    `images` / `video` attach to the first message."""
    pending, pending_video = list(images), video
    interactive = sys.stdin.isatty()
    if interactive:
        print("multi-turn chat: /image PATH (or /video PATH) attaches an image (a video) to your next message, "
              "/reset, /quit", file=sys.stderr)
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:  # ^C at the prompt ends the chat
            sys.stderr.write("\n")
            return 0
        if not line:
            return 0
        line = line.strip()
        command, _, arg = line.partition(" ")
        arg = os.path.expanduser(arg.strip().strip("'\""))  # a dragged-in file arrives quoted
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            conversation.reset()
            pending, pending_video = [], None
        elif command in ("/image", "/video"):
            kind = command[1:]
            if not arg:
                print(f"usage: /{kind} PATH", file=sys.stderr)
            elif not Path(arg).is_file():
                print(f"no such {kind} file: {arg}", file=sys.stderr)
            elif (problem := _unreadable(kind, arg)) is not None:  # now, not when the next question is asked
                print(f"error: {problem} (not attached)", file=sys.stderr)
            elif kind == "image":
                pending.append(arg)
            else:
                pending_video = arg  # one video a message: a later /video replaces it
        elif line.startswith("/") and not line.startswith("//"):
            print(f"unknown command {command}: /image PATH, /video PATH, /reset, /quit (start a message with // "
                  "to send it as text)", file=sys.stderr)
        elif line:
            try:
                answer(conversation, line[1:] if line.startswith("//") else line, pending, pending_video)
            except KeyboardInterrupt:  # ^C while it answers: that answer stops, the chat goes on
                print("\n[interrupted]", file=sys.stderr)
            except (ValueError, OSError) as e:  # a bad or vanished file, an over-long conversation: keep chatting
                print(f"error: {e}", file=sys.stderr)
            pending, pending_video = [], None
