"""VisionLanguageModel: InternViT -> pixel shuffle -> mlp1 -> scatter at <IMG_CONTEXT> -> decoder.

The model computes tensors only: hidden states and logits, never a loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nativevl.config import ModelConfig
from nativevl.model.attention import positions_from_cu_seqlens
from nativevl.model.layers import RMSNorm
from nativevl.model.projector import Projector, pixel_shuffle
from nativevl.model.text import KVCache, TextModel
from nativevl.model.vision import VisionModel


@dataclass
class VLMOutput:
    logits: torch.Tensor | None  # (B, T, V), (T, V) for a packed 1-D input, or only the kept positions
    hidden_states: torch.Tensor  # final-norm hidden states, same leading shape as the input ids
    cache: KVCache | None = None

    @property
    def past_key_values(self) -> KVCache | None:  # the name transformers users look for
        return self.cache


class VisionLanguageModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = VisionModel(config.vision)
        self.multi_modal_projector = Projector(config)
        self.language_model = TextModel(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight
        self.attn_backend = "sdpa"
        # Sharded training sets this: a rank whose pack has no tile still runs the ViT (on a blank
        # tile, times zero) so that every rank takes part in every FSDP unit's collectives.
        self.vision_every_forward = False

    # ------------------------------------------------------------------ construction / io

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
        """Load a local checkpoint in the `-hf` layout or the original InternVLChatModel layout."""
        from nativevl.io.hf import load_model  # io depends on model, not the other way round

        return load_model(path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, *, layout: str = "hf", tokenizer=None, **kwargs) -> None:
        """Write config.json + safetensors (+ tokenizer / processor files) in layout "hf" or "internvl"."""
        from nativevl.io.hf import save_model

        save_model(self, path, layout=layout, tokenizer=tokenizer, **kwargs)

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random initialisation: normal(0, std) weights and embeddings, zero biases, unit norms,
        layer scale from the config."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.LayerNorm, RMSNorm)):
                    module.weight.fill_(1.0)
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
                elif isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                    module.weight.normal_(0.0, std, generator=generator)
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
            for layer in self.vision_tower.encoder.layer:
                layer.lambda_1.fill_(self.config.vision.layer_scale_init_value)
                layer.lambda_2.fill_(self.config.vision.layer_scale_init_value)
            emb = self.vision_tower.embeddings
            emb.cls_token.normal_(0.0, std, generator=generator)
            emb.position_embeddings.normal_(0.0, std, generator=generator)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    # ------------------------------------------------------------------ forward

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(tiles, 3, H, W) -> (tiles * image_seq_length, C_llm).

        Float input is taken as normalised; uint8 input (raw tiles) is normalised here, on the
        model's device, with the vision config's mean and std.
        """
        if pixel_values.dtype == torch.uint8:
            mean = torch.tensor(self.config.vision.image_mean, device=pixel_values.device).view(1, 3, 1, 1)
            std = torch.tensor(self.config.vision.image_std, device=pixel_values.device).view(1, 3, 1, 1)
            pixel_values = (pixel_values.float() / 255.0 - mean) / std
        feats = self.vision_tower(pixel_values.to(self.dtype), backend=self.attn_backend)[:, 1:]  # drop CLS
        n, t, c = feats.shape
        side = int(round(t**0.5))
        if side * side != t:
            raise ValueError(f"tile of {t} patches is not square; tiles must be square images")
        feats = pixel_shuffle(feats.reshape(n, side, side, c), self.config.downsample_ratio)  # (N, s/2, s/2, 4C)
        feats = self.multi_modal_projector(feats.reshape(n, -1, feats.shape[-1]))  # (N, s*s/4, C_llm)
        return feats.reshape(-1, feats.shape[-1])

    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, tile_index: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image features scattered, in order, at the <IMG_CONTEXT> slots.

        tile_index (K,): the tile filling each of the text's K tile slots, so that documents sharing
        an image (a preference pair) run the ViT on it once; None means tile k fills slot k.
        image_features: `encode_images`' output already at hand (the engine's vision cache), used
        instead of running the ViT on pixel_values.
        """
        embeds = self.language_model.embed_tokens(input_ids)  # (..., C)
        slots = input_ids == self.config.image_token_id
        n_slots = int(slots.sum())
        if image_features is not None:
            if n_slots != image_features.shape[0]:
                raise ValueError(f"input_ids hold {n_slots} image tokens but {image_features.shape[0]} image "
                                 "features were given")
            return embeds.masked_scatter(slots[..., None], image_features.to(embeds.dtype))
        if pixel_values is None or pixel_values.numel() == 0:
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots} image token(s) but no pixel_values were given")
            if self.vision_every_forward:
                size = self.config.vision.image_size
                blank = embeds.new_zeros(1, self.config.vision.num_channels, size, size)
                embeds = embeds + 0.0 * self.encode_images(blank).sum().to(embeds.dtype)
            return embeds
        feats = self.encode_images(pixel_values)
        if tile_index is not None:
            per_tile = feats.reshape(pixel_values.shape[0], -1, feats.shape[-1])  # (N, L, C)
            feats = per_tile[tile_index].reshape(-1, feats.shape[-1])  # (K * L, C)
        if n_slots != feats.shape[0]:
            size = self.config.vision.image_size
            odd = f"; tiles must be {size} x {size} pixels, got {tuple(pixel_values.shape[-2:])}" if tuple(
                pixel_values.shape[-2:]) != (size, size) else ""
            raise ValueError(
                f"input_ids hold {n_slots} image tokens but pixel_values give {feats.shape[0]} image features "
                f"({pixel_values.shape[0]} tiles x {feats.shape[0] // max(1, pixel_values.shape[0])}){odd}"
            )
        return embeds.masked_scatter(slots[..., None], feats.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        *,
        tile_index: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: KVCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int | torch.Tensor | None = None,
        compute_logits: bool = True,
    ) -> VLMOutput:
        """Padded form: input_ids (B, T), optional attention_mask (B, past+T) with 1 = real token.
        Packed form: input_ids (T,) with cu_seqlens (S+1,); positions restart in every document.

        position_ids (B, T) or (T,) may be float (V2PE). logits_to_keep: an int keeps the last n
        positions, a 1-D index tensor keeps those positions of the sequence dimension.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is not None and pixel_values is not None:
            raise ValueError("pixel_values go with input_ids (their image tokens say where the features go); with "
                             "inputs_embeds, scatter the features yourself (model.encode_images)")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, tile_index)
        packed_1d = inputs_embeds.dim() == 2
        if packed_1d:
            inputs_embeds = inputs_embeds[None]  # (1, T, C)
            if position_ids is not None and position_ids.dim() == 1:
                position_ids = position_ids[None]
        if cu_seqlens is not None and attention_mask is not None:
            raise ValueError("a packed batch (cu_seqlens) takes no attention_mask")
        if cu_seqlens is not None and inputs_embeds.shape[0] != 1:
            raise ValueError(f"a packed batch (cu_seqlens) is one row of documents: input_ids (T,) or (1, T), got "
                             f"{inputs_embeds.shape[0]} rows")
        if cu_seqlens is not None and isinstance(cu_seqlens, torch.Tensor):
            cu_seqlens = cu_seqlens.to(inputs_embeds.device)  # once, for every layer and the flex block mask
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be (batch, past + length), got shape {tuple(attention_mask.shape)}")
        if cu_seqlens is not None and (use_cache or cache is not None):
            raise ValueError("a packed batch (cu_seqlens) cannot use a KV cache: later steps would see every document")
        b, t, _ = inputs_embeds.shape
        if use_cache and cache is None:
            cache = KVCache(self.config.text.num_hidden_layers)
        if position_ids is None:
            position_ids = self.default_positions(b, t, attention_mask, cu_seqlens, cache, inputs_embeds.device)
        if position_ids.shape != (b, t):
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, expected {(b, t)}")
        hidden = self.language_model(
            inputs_embeds,
            position_ids,
            cu_seqlens=cu_seqlens,
            key_padding_mask=attention_mask,
            cache=cache,
            backend=self.attn_backend,
        )
        logits = None
        if compute_logits:
            kept = hidden
            if isinstance(logits_to_keep, int):
                kept = hidden[:, -logits_to_keep:]
            elif logits_to_keep is not None:
                kept = hidden[:, logits_to_keep]
            logits = self.lm_head(kept)
            if packed_1d:
                logits = logits[0]
        if packed_1d:
            hidden = hidden[0]
        return VLMOutput(logits=logits, hidden_states=hidden, cache=cache)

    @staticmethod
    def default_positions(
        batch: int,
        length: int,
        attention_mask: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        cache: KVCache | None,
        device: torch.device,
    ) -> torch.Tensor:
        """Integer positions as float32 (B, T): continue a cache, skip left padding, restart per document."""
        steps = torch.arange(length, device=device, dtype=torch.float32)
        if cache is not None and cache.next_position is not None:
            return cache.next_position.to(device)[:, None] + steps[None]
        if cu_seqlens is not None:
            return positions_from_cu_seqlens(cu_seqlens.to(device), length)[None]
        if attention_mask is not None:
            pos = attention_mask.long().cumsum(-1) - 1  # (B, past+T)
            return pos.clamp(min=0)[:, -length:].float()
        return steps[None].expand(batch, length)
