"""Qwen2-style decoder (and the llama-style InternLM3 variant) with RoPE from explicit float positions.

Positions are float32 everywhere so that V2PE's fractional steps for image tokens flow through
unchanged. Module names follow transformers' Qwen2Model / LlamaModel.
"""

from __future__ import annotations

import torch
from torch import nn

from nativevl.config import TextConfig
from nativevl.model.attention import attention, document_ids, documents
from nativevl.model.layers import RMSNorm, activation


class KVCache:
    """Keys and values per layer, grown by concatenation, plus the next position of every row.

    `next_position` (B,) float lets V2PE runs continue at last position + 1 rather than at the
    number of cached tokens. The fast inference engine replaces this with a static cache.
    """

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.next_position: torch.Tensor | None = None

    @property
    def seq_len(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k/v (B, Hkv, T, D) for one layer; return all keys and values so far."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class RotaryEmbedding(nn.Module):
    """cos/sin (B, T, head_dim) from float positions (B, T); dynamic NTK scaling past the trained length."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config

    def _inv_freq(self, base: float, device: torch.device) -> torch.Tensor:
        # Recomputed every call (head_dim/2 values) rather than kept as a buffer, so that a
        # model.to(bfloat16) never rounds the frequencies.
        dim = self.config.head_dim
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))

    def _base(self, seq_len: float) -> float:
        """The RoPE base for a sequence of seq_len positions (dynamic NTK past the trained length)."""
        cfg = self.config
        if cfg.rope_type != "dynamic" or seq_len <= cfg.max_position_embeddings:
            return cfg.rope_theta
        dim, factor = cfg.head_dim, cfg.rope_factor
        return cfg.rope_theta * ((factor * seq_len / cfg.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))

    def forward(
        self, position_ids: torch.Tensor, dtype: torch.dtype, cu_seqlens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cu_seqlens (a packed row): each document's dynamic base from its own length, as if alone."""
        cfg, device = self.config, position_ids.device
        seq_len = float(position_ids.max()) + 1 if cfg.rope_type == "dynamic" else 0.0
        if seq_len > cfg.max_position_embeddings and cu_seqlens is not None and position_ids.shape[0] == 1:
            doc = documents(cu_seqlens, position_ids.shape[1], "sdpa")
            ids = document_ids(doc.cu_seqlens.to(device), position_ids.shape[1])
            longest = torch.full((doc.cu_seqlens.numel() - 1,), -1.0, device=device).scatter_reduce(
                0, ids, position_ids[0].float(), "amax")
            inv_freq = torch.stack([self._inv_freq(self._base(m + 1), device) for m in longest.tolist()])[ids][None]
        else:  # (1, T, hd/2) above, (hd/2,) here
            inv_freq = self._inv_freq(self._base(seq_len), device)
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = position_ids.float()[..., None] * inv_freq.float()  # (B, T, hd/2)
            emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, hd)
            return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd), cos/sin (B, T, hd)."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


class TextAttention(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        bias = config.attention_bias
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        cu_seqlens: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        cache: KVCache | None,
        backend: str,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, hd)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, past+T, hd)
        out = attention(
            q, k, v, causal=True, cu_seqlens=cu_seqlens, key_padding_mask=key_padding_mask, backend=backend
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class TextMLP(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = TextAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = TextMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, **attn_kwargs)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    """inputs_embeds (B, T, C) + float positions (B, T) -> final-norm hidden states (B, T, C)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        *,
        cu_seqlens: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        backend: str = "sdpa",
    ) -> torch.Tensor:
        if cu_seqlens is not None:  # once per forward: longest document, flex BlockMask
            cu_seqlens = documents(cu_seqlens, inputs_embeds.shape[1], backend)
        cos, sin = self.rotary_emb(position_ids, inputs_embeds.dtype, cu_seqlens)
        x = inputs_embeds
        for layer in self.layers:
            x = layer(
                x, cos, sin, cu_seqlens=cu_seqlens, key_padding_mask=key_padding_mask, cache=cache, backend=backend
            )
        if cache is not None:
            cache.next_position = position_ids[:, -1].float() + 1
        return self.norm(x)
