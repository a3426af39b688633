"""The engine's device side: a static KV cache in slots, and the static-shape decode step over it.

Each running sequence owns one slot of the cache (slots, kv_heads, cache_len + chunk, head_dim) per
layer; the last `chunk` positions are scratch, where a decode call's free rows write. A
decode call runs over slots [0, B) and keys [0, L): its shapes depend on (B, L, steps) only, so on
CUDA it is compiled (when asked) and captured once per such bucket as a CUDA graph, then replayed; the
CPU runs the same step eagerly. The step reads its inputs (each slot's token, position and length)
from one static device buffer, uploaded in one copy per call.

The default step (`fused`) is trimmed for one token per row: q/k/v and gate/up matmuls fused (weights
concatenated once), the new key/value written into the cache and attention read from the cache window
in place with GQA heads unexpanded (`decode_attention`), the mask and RoPE computed once per step, the
greedy argmax inside the step. The reference step runs the model's own decoder layers over a
`_SlotView` of the cache. An unpadded prefill runs the fused layers and writes the slots directly
(compiled per layer with `compile_prefill`); `extend` prefills a prompt's rest on top of the prefix a
slot kept (`infer/prefix_cache.py`).

The scheduler that decides which slots run, and what their tokens mean, is `infer/engine.py`.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from nativevl.model.attention import DECODE_BACKENDS, attention, decode_attention
from nativevl.model.text import KVCache, RotaryEmbedding, rotate_half
from nativevl.model.vlm import VisionLanguageModel

log = logging.getLogger(__name__)

# Inductor's option that, for a matrix product with one row (batch-1 decoding), replaces cuBLAS's gemv
# with a Triton reduction it tunes by coordinate descent and can fuse with the ops around it (the
# RMSNorm before, the SiLU * up and the residual add after): gpt-fast's setting. CUDA only (Inductor
# keeps CPU matmuls as they are); compile time grows with the tuning.
GEMV_OPTION = "coordinate_descent_tuning"
GEMV_OPTIONS = {GEMV_OPTION: True}


class SlotDecoder:
    def __init__(
        self,
        model: VisionLanguageModel,
        rope: RotaryEmbedding,
        *,
        max_batch_size: int,
        cache_len: int,
        fused: bool,
        attention: str,
        graphs: bool,
        compile: bool,
        compile_mode: str | None,
        compile_options: dict | None,
        compile_prefill: bool,
        length_quantum: int,
        chunk: int,
        suppress: torch.Tensor | None,
        stats: dict,
    ) -> None:
        """`stats` (the engine's) gets "graph_captures" counted and "decode_mode" updated here when a
        compiled step falls back to the eager one."""
        self.model, self.rope, self.stats = model, rope, stats
        self.device, self.dtype = model.device, model.dtype
        cfg = model.config.text
        self.cache_len = cache_len
        # past cache_len, `chunk` scratch positions: a free slot inside a decode call's batch writes its
        # garbage keys there (its `lengths` entry is `scratch`), not over keys kept for prefix reuse
        self.scratch = cache_len
        shape = (max_batch_size, cfg.num_key_value_heads, cache_len + chunk, cfg.head_dim)
        self.k = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(cfg.num_hidden_layers)]
        # static input of the decode step (a CUDA graph reads it in place): rows tokens, positions,
        # lengths, float32 (exact for token ids and lengths below 2**24), uploaded in one copy per step
        self._state = torch.zeros(3, max_batch_size, dtype=torch.float32, device=self.device)
        self._rows = torch.arange(max_batch_size, device=self.device)
        self._key_index = torch.arange(cache_len, device=self.device)
        self.fused, self.decode_attention = bool(fused), attention
        self.use_graphs, self.use_compile = graphs, compile
        self.chunk = chunk  # the engine's decode_chunk (steps per call), named in `mode`
        self._suppress = suppress
        self._fused: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
        self.refresh_weights()
        self._graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._graph_pool = None
        # one decode step (compiled on CUDA); a call runs it `steps` times, all captured in one graph
        self._eager_body = self._fused_step if self.fused else self._layer_step
        self.compile_prefill = bool(compile_prefill and fused)
        self._prefill_layer = (torch.compile(self._prefill_layer_eager, dynamic=None) if self.compile_prefill
                               else self._prefill_layer_eager)
        self._body = self._eager_body
        self.compile_options = dict(compile_options or {})
        if self.use_compile:
            # one compiled graph per (batch, window) bucket: allow them all rather than fall back to
            # eager past dynamo's default limit of 8 recompiles
            n_buckets = (max_batch_size.bit_length() + 1) * (-(-cache_len // length_quantum))
            for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), n_buckets))
            self._body = torch.compile(self._eager_body, dynamic=False, mode=compile_mode, options=compile_options)

    @staticmethod
    def check(*, fused: bool, attention: str, compile_mode: str | None, compile_options: dict | None,
              compile_prefill: bool) -> None:
        """Refuse settings that do not go together (before the engine moves the model)."""
        if attention not in DECODE_BACKENDS:
            raise ValueError(f"unknown decode_attention {attention!r}; known: {', '.join(DECODE_BACKENDS)}")
        if compile_mode is not None and compile_options:
            raise ValueError(f"give compile_mode ({compile_mode!r}) or compile_options ({compile_options}), not both: "
                             "torch.compile takes one or the other")
        if compile_prefill and not fused:
            raise ValueError("compile_prefill needs fused_decode (the reference path runs the model's own forward)")
        if attention != "sdpa" and not fused:
            raise ValueError(f"decode_attention={attention!r} needs fused_decode (the reference path "
                             "runs the model's own layers)")

    @property
    def mode(self) -> str:
        return (("fused+" if self.fused else "") + ("compile+" if self.use_compile else "")
                + ("cuda_graph" if self.use_graphs else "eager")
                + (f"+chunk{self.chunk}" if self.chunk > 1 else "")
                + (f"+{self.decode_attention}" if self.decode_attention != "sdpa" else "")
                + ("+gemv" if self.use_compile and self.compile_options.get(GEMV_OPTION) else "")
                + ("+compiled_prefill" if self.compile_prefill else ""))

    @torch.no_grad()
    def refresh_weights(self) -> None:
        """(Re)build the fused decode weights from the model's: [q; k; v] (and bias) and [gate; up] per
        layer. Copied in place once built, so captured CUDA graphs stay valid."""
        if not self.fused:
            return
        fused = []
        for layer in self.model.language_model.layers:
            a, m = layer.self_attn, layer.mlp
            qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
            bias = None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
            gate_up = torch.cat([m.gate_proj.weight, m.up_proj.weight])
            fused.append((qkv, bias, gate_up))
        if not self._fused:
            self._fused = fused
            return
        for old, new in zip(self._fused, fused):
            for o, n in zip(old, new):
                if o is not None:
                    o.copy_(n)

    def write_prefill(self, cache: KVCache, lengths: list[int], width: int, slots: list[list[int]]) -> None:
        """Copy a left-padded prefill's cache rows (row r: its last lengths[r] of `width` positions) into
        every slot of that row: one prefill for n samples."""
        for row, n in enumerate(lengths):
            for slot in slots[row]:
                for layer in range(len(self.k)):
                    self.k[layer][slot, :, :n] = cache.keys[layer][row, :, width - n:]
                    self.v[layer][slot, :, :n] = cache.values[layer][row, :, width - n:]

    @torch.no_grad()
    def run(self, state: list[list[float]], batch: int, window: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`steps` decode steps over slots [0, batch) and keys [0, window); state: every slot's [tokens,
        positions, lengths] (host lists). The last step's logits (batch, V) and every step's argmax
        (steps, batch), on the device."""
        self._state.copy_(torch.tensor(state, dtype=torch.float32))  # one host->device copy
        return self._run(batch, window, steps)

    def prefill(self, x: torch.Tensor, slots: list[list[int]]) -> torch.Tensor:
        """Unpadded prompts x (R, T, C) at positions 0..T-1 through the decoder with the fused weights,
        each layer's keys/values written straight into the slots of their row; the last position's
        logits (R, V). The same computation as the model's forward without a mask (causal sdpa)."""
        lm = self.model.language_model
        rows, t = x.shape[:2]
        positions = torch.arange(t, device=self.device, dtype=torch.float32)[None].expand(rows, t)
        cos, sin = self.rope(positions, self.dtype)
        cos, sin = cos[:, None], sin[:, None]  # (R, 1, T, hd)
        if self.compile_prefill:  # one compiled graph for every prompt length (and row count past 1)
            for tensor, dims in ((x, (0, 1)), (cos, (0, 2)), (sin, (0, 2))):
                for dim in dims:
                    torch._dynamo.maybe_mark_dynamic(tensor, dim)
        for i, layer in enumerate(lm.layers):
            w_qkv, b_qkv, w_gate_up = self._fused[i]
            x, k, v = self._prefill_layer(layer, x, w_qkv, b_qkv, w_gate_up, cos, sin)
            for row, row_slots in enumerate(slots):
                for slot in row_slots:
                    self.k[i][slot, :, :t] = k[row]
                    self.v[i][slot, :, :t] = v[row]
        return self.model.lm_head(lm.norm(x[:, -1]))

    def _prefill_layer_eager(self, layer, x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor | None,
                             w_gate_up: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """One decoder layer of the prefill, x (R, T, C) -> (x, keys, values), keys/values (R, Hkv, T, hd)
        after RoPE. Compiled with `compile_prefill` (one graph shared by the layers: the weights are
        arguments)."""
        q, k, v = self._project(layer, x, w_qkv, b_qkv, cos, sin)
        groups = q.shape[1] // k.shape[1]  # GQA expanded here (flash kernels); the decode step reads the cache unexpanded
        keys, values = (k, v) if groups == 1 else (k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1))
        out = F.scaled_dot_product_attention(q, keys, values, is_causal=True)
        return self._feed_forward(layer, x, out, w_gate_up), k, v

    def _project(self, layer, x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor | None, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (R, T, C) -> q (R, H, T, hd), k and v (R, Hkv, T, hd), q and k rotated."""
        cfg = self.model.config.text
        n_q, n_kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        rows, t = x.shape[:2]
        qkv = F.linear(layer.input_layernorm(x), w_qkv, b_qkv).view(rows, t, n_q + 2 * n_kv, hd).transpose(1, 2)
        q, k, v = qkv.split((n_q, n_kv, n_kv), dim=1)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def _feed_forward(self, layer, x: torch.Tensor, out: torch.Tensor, w_gate_up: torch.Tensor) -> torch.Tensor:
        """The layer after attention: x + o_proj(out), then x + MLP(norm(x)); out (R, H, T, hd)."""
        rows, t = x.shape[:2]
        x = x + layer.self_attn.o_proj(out.transpose(1, 2).reshape(rows, t, -1))
        gate, up = F.linear(layer.post_attention_layernorm(x), w_gate_up).chunk(2, dim=-1)
        return x + layer.mlp.down_proj(layer.mlp.act(gate) * up)

    def extend(self, x: torch.Tensor, slot: int, start: int) -> torch.Tensor:
        """The prompt's tokens from position `start` on, x (1, S, C), on top of the keys/values slot `slot`
        holds for positions [0, start) (a reused prefix): each layer's new keys/values written into the
        slot at [start, start + S), attention over [0, start + S) (causal for the new tokens); the last
        position's logits (1, V)."""
        lm = self.model.language_model
        end = start + x.shape[1]
        positions = torch.arange(start, end, device=self.device, dtype=torch.float32)[None]
        cos, sin = self.rope(positions, self.dtype)
        cos, sin = cos[:, None], sin[:, None]  # (1, 1, S, hd)
        for i, layer in enumerate(lm.layers):
            w_qkv, b_qkv, w_gate_up = self._fused[i]
            q, k, v = self._project(layer, x, w_qkv, b_qkv, cos, sin)
            self.k[i][slot, :, start:end] = k[0]
            self.v[i][slot, :, start:end] = v[0]
            # the model's attention: GQA, and the causal mask of S queries at the end of `end` keys
            out = attention(q, self.k[i][slot:slot + 1, :, :end], self.v[i][slot:slot + 1, :, :end], causal=True)
            x = self._feed_forward(layer, x, out, w_gate_up)
        return self.model.lm_head(lm.norm(x[:, -1]))

    def copy_slot(self, source: int, target: int, length: int) -> None:
        """Slot `target` gets slot `source`'s keys/values for positions [0, length) (n samples of a prompt)."""
        for layer in range(len(self.k)):
            self.k[layer][target, :, :length] = self.k[layer][source, :, :length]
            self.v[layer][target, :, :length] = self.v[layer][source, :, :length]

    def suppressed(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (R, V) with the suppressed tokens at -inf (inside the decode step's graph too)."""
        return logits if self._suppress is None else logits.index_fill(-1, self._suppress, float("-inf"))

    def _steps(self, batch: int, window: int, steps: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """`steps` static-shape decode steps over slots [0, batch) and keys [0, window), the greedy token
        of each step the input of the next (positions and lengths advancing by one): the last step's
        logits (batch, V) and every step's argmax (steps, batch). Needs window >= length + steps."""
        state = self._state[:, :batch]
        tokens, positions, lengths = state[0].long(), state[1], state[2].long()
        picked = []
        for j in range(steps):
            logits, tokens = self._body(tokens, positions + j if j else positions, lengths + j if j else lengths, window)
            picked.append(tokens)
        return logits, torch.stack(picked)

    def _layer_step(self, tokens: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor,
                       window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of tokens (B,) at positions (B,) after lengths (B,) cached keys, keys [0, window),
        through the model's own decoder layers: logits (B, V) and their argmax (B,)."""
        lm = self.model.language_model
        batch = tokens.shape[0]
        valid = self._key_index[:window][None] < lengths[:, None]  # (B, L) cached keys of each slot
        mask = torch.cat([valid, valid.new_ones(batch, 1)], dim=1)  # (B, L+1): the new key comes last
        cache = _SlotView(self.k, self.v, self._rows[:batch], lengths, window)
        cos, sin = self.rope(positions[:, None], self.dtype)
        x = lm.embed_tokens(tokens[:, None])  # (B, 1, C)
        for layer in lm.layers:
            x = layer(x, cos, sin, cu_seqlens=None, key_padding_mask=mask, cache=cache, backend=self.model.attn_backend)
        logits = self.suppressed(self.model.lm_head(lm.norm(x)[:, 0]))  # (B, V)
        return logits, logits.argmax(-1)

    def _fused_step(self, tokens: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor,
                      window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The same step as `_decode_layers`, trimmed for one token per row: fused q/k/v and gate/up
        matmuls, the new key/value written into the cache first and attention read from the cache
        window in place (GQA unexpanded), one additive mask and one cos/sin for all layers, and the
        greedy argmax computed here (inside the CUDA graph) from the model-dtype logits."""
        lm = self.model.language_model
        cfg = self.model.config.text
        n_q, n_kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        split = (n_q * hd, n_kv * hd, n_kv * hd)
        batch = tokens.shape[0]
        rows = self._rows[:batch]
        # keys [0, length] of each slot: its cache and the new key, written at index `length` below
        valid = self._key_index[:window][None] <= lengths[:, None]  # (B, L)
        bias = torch.zeros(batch, window, device=self.device, dtype=self.dtype).masked_fill(~valid, float("-inf"))
        cos, sin = self.rope(positions[:, None], self.dtype)  # (B, 1, hd): broadcast over heads
        x = lm.embed_tokens(tokens)  # (B, C)
        for i, layer in enumerate(lm.layers):
            w_qkv, b_qkv, w_gate_up = self._fused[i]
            attn, mlp = layer.self_attn, layer.mlp
            # a matmul and an add rather than F.linear's addmm: Inductor's gemv decomposition (GEMV_OPTIONS)
            # takes aten.mm only
            qkv = layer.input_layernorm(x) @ w_qkv.t()
            q, k, v = (qkv if b_qkv is None else qkv + b_qkv).split(split, dim=-1)
            q, k, v = q.view(batch, n_q, hd), k.view(batch, n_kv, hd), v.view(batch, n_kv, hd)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            self.k[i][rows, :, lengths] = k
            self.v[i][rows, :, lengths] = v
            out = decode_attention(q, self.k[i][:batch, :, :window], self.v[i][:batch, :, :window], bias,
                                   backend=self.decode_attention)
            x = x + attn.o_proj(out.reshape(batch, n_q * hd))
            gate, up = F.linear(layer.post_attention_layernorm(x), w_gate_up).chunk(2, dim=-1)
            x = x + mlp.down_proj(mlp.act(gate) * up)
        logits = self.suppressed(self.model.lm_head(lm.norm(x)))  # (B, V)
        return logits, logits.argmax(-1)

    def _run(self, batch: int, window: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.use_graphs:
            return self._steps(batch, window, steps)
        key = (batch, window, steps)
        if key not in self._graphs:
            try:
                self._capture(key)
            except Exception:
                if not self.use_compile:
                    raise
                # compile failed or cannot be captured: keep CUDA graphs of the eager step
                log.exception("compiled decode step failed; falling back to the eager step in CUDA graphs")
                self.use_compile, self._body = False, self._eager_body
                self._graphs.clear()
                self.stats["decode_mode"] = self.mode
                self._capture(key)
        graph, out = self._graphs[key]
        graph.replay()
        return out

    def _capture(self, key: tuple[int, int, int]) -> None:
        # warm-up on a side stream (compiles, initialises cuBLAS workspaces); writes are idempotent:
        # each run stores the same tokens' keys at the same indices
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._steps(*key)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            out = self._steps(*key)
        self._graphs[key] = (graph, out)
        self.stats["graph_captures"] += 1


class _SlotView:
    """The KVCache interface over slots [0, B) of the static cache, for one decode step.

    update() writes the new key/value at each slot's length and returns the window [0, L) followed by
    the new key: the attention mask hides the window's unused entries, and a query always sees the
    last key (itself).
    """

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], rows: torch.Tensor, lengths: torch.Tensor,
                 window: int) -> None:
        self.k, self.v, self.rows, self.lengths, self.window = k, v, rows, lengths, window
        self.next_position = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k/v (B, Hkv, 1, hd) -> (B, Hkv, L+1, hd)."""
        batch = k.shape[0]
        self.k[layer][self.rows, :, self.lengths] = k[:, :, 0]
        self.v[layer][self.rows, :, self.lengths] = v[:, :, 0]
        keys = torch.cat([self.k[layer][:batch, :, : self.window], k], dim=2)
        values = torch.cat([self.v[layer][:batch, :, : self.window], v], dim=2)
        return keys, values
