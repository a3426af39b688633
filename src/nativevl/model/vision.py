"""InternViT: patch-14 ViT with CLS, learned absolute positions and layer scale.

Two variants share this code: InternViT-300M (LayerNorm, q/k/v bias) and InternViT-6B (RMSNorm and
RMS QK-norm over the full width, no q/k/v bias). Module names follow transformers' InternVL
(`embeddings.cls_token`, `encoder.layer.N.attention.q_proj`, `lambda_1`, ...) so checkpoints map 1:1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nativevl.config import VisionConfig
from nativevl.model.attention import attention
from nativevl.model.layers import RMSNorm, activation, make_norm


class PatchEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.projection(pixel_values)  # (N, D, h, w)
        h, w = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), h, w  # (N, h*w, D)


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.patch_embeddings = PatchEmbeddings(config)
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_positions, config.hidden_size))

    def position_embedding_for(self, h: int, w: int) -> torch.Tensor:
        """(1, 1 + h*w, D); the learned grid is bicubic-interpolated for other tile sizes."""
        grid = self.config.grid_size
        if (h, w) == (grid, grid):
            return self.position_embeddings
        cls_pos, patch_pos = self.position_embeddings[:, :1], self.position_embeddings[:, 1:]
        dim = patch_pos.shape[-1]
        patch_pos = patch_pos.float().reshape(1, grid, grid, dim).permute(0, 3, 1, 2)  # (1, D, G, G)
        patch_pos = F.interpolate(patch_pos, size=(h, w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(cls_pos.dtype)  # (1, h*w, D)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches, h, w = self.patch_embeddings(pixel_values.to(self.cls_token.dtype))  # (N, h*w, D)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding_for(h, w)  # (N, 1+h*w, D)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(d, d, bias=config.attention_bias)
        self.k_proj = nn.Linear(d, d, bias=config.attention_bias)
        self.v_proj = nn.Linear(d, d, bias=config.attention_bias)
        self.projection_layer = nn.Linear(d, d)
        self.use_qk_norm = config.use_qk_norm
        if config.use_qk_norm:
            self.q_norm = RMSNorm(d, eps=config.layer_norm_eps)
            self.k_norm = RMSNorm(d, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (y.view(n, t, self.num_heads, self.head_dim).transpose(1, 2) for y in (q, k, v))  # (N, H, T, hd)
        out = attention(q, k, v, causal=False, backend=backend)
        return self.projection_layer(out.transpose(1, 2).reshape(n, t, d))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample. `rate` is a 0-dim tensor rather
    than a Python float so that torch.compile neither guards on it nor recompiles for every layer
    (a rate rising over 24 layers would otherwise pass the recompile limit and leave the ViT eager)."""
    keep = 1.0 - rate.float()
    mask = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) < keep
    return x * (mask / keep).to(x.dtype)


class VisionLayer(nn.Module):
    def __init__(self, config: VisionConfig, drop_path_rate: float) -> None:
        super().__init__()
        self.layernorm_before = make_norm(config.norm_type, config.hidden_size, config.layer_norm_eps)
        self.attention = VisionAttention(config)
        self.layernorm_after = make_norm(config.norm_type, config.hidden_size, config.layer_norm_eps)
        self.mlp = VisionMLP(config)
        self.lambda_1 = nn.Parameter(torch.full((config.hidden_size,), config.layer_scale_init_value))
        self.lambda_2 = nn.Parameter(torch.full((config.hidden_size,), config.layer_scale_init_value))
        # not in checkpoints: the rate is a training setting (StagePolicy), kept as a tensor for torch.compile
        # (None while the rate is 0, so that a model built on the meta device loads without it)
        self.register_buffer("_drop_path_rate", None, persistent=False)
        self.drop_path_rate = drop_path_rate

    @property
    def drop_path_rate(self) -> float:
        return self._rate

    @drop_path_rate.setter
    def drop_path_rate(self, rate: float) -> None:
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {rate}")
        self._rate = float(rate)
        self._drop_path = rate > 0  # a bool: compiled layers guard on it, not on the rate
        device = self.lambda_1.device if self.lambda_1.device.type != "meta" else torch.device("cpu")
        self._drop_path_rate = torch.tensor(self._rate, device=device) if self._drop_path else None

    def _branch(self, y: torch.Tensor) -> torch.Tensor:
        return drop_path(y, self._drop_path_rate) if self.training and self._drop_path else y

    def forward(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        x = x + self._branch(self.lambda_1 * self.attention(self.layernorm_before(x), backend))
        return x + self._branch(self.lambda_2 * self.mlp(self.layernorm_after(x)))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        n = config.num_hidden_layers
        rates = [config.drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # linear over depth
        self.layer = nn.ModuleList(VisionLayer(config, rate) for rate in rates)


class VisionModel(nn.Module):
    """pixel_values (N, 3, H, W) -> last hidden states (N, 1 + (H/14)*(W/14), D), CLS first."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)

    def forward(self, pixel_values: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must be (tiles, {self.config.num_channels}, H, W), got {tuple(pixel_values.shape)}"
            )
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layer:
            x = layer(x, backend)
        return x
