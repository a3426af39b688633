"""Model configuration: frozen dataclasses, presets as functions, derived values as properties.

Field names follow the `-hf` config.json of InternVL3 (transformers' InternVLConfig), so one concept
keeps one name from the CLI flag to the checkpoint key (`downsample_ratio`, `image_token_id`, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

NORM_TYPES = ("layer_norm", "rms_norm")
TEXT_ARCHS = ("qwen2", "llama")  # llama: InternLM3 (InternVL3-9B's LLM), no q/k/v bias
ROPE_TYPES = ("default", "dynamic")


@dataclass(frozen=True)
class VisionConfig:
    """InternViT. Defaults are InternViT-300M-448px-V2.5."""

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    norm_type: str = "layer_norm"
    use_qk_norm: bool = False
    attention_bias: bool = True
    layer_norm_eps: float = 1e-6
    layer_scale_init_value: float = 0.1
    drop_path_rate: float = 0.0
    hidden_act: str = "gelu"
    # pixel statistics for raw uint8 tiles (ImageNet's, as every InternVL checkpoint uses)
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"vision norm_type must be one of {NORM_TYPES}, got {self.norm_type!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"vision hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid_size**2 + 1  # patches + CLS


@dataclass(frozen=True)
class TextConfig:
    """Qwen2-style decoder (or llama-style for InternLM3). Defaults are Qwen2.5-0.5B with InternVL's vocab."""

    model_type: str = "qwen2"
    vocab_size: int = 151674
    hidden_size: int = 896
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    intermediate_size: int = 4864
    head_dim_override: int | None = None
    attention_bias: bool = True  # q/k/v bias (Qwen2); o_proj never has one
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_type: str = "dynamic"
    rope_factor: float = 2.0
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    bos_token_id: int | None = 151643
    eos_token_id: int = 151645
    pad_token_id: int | None = 151643

    def __post_init__(self) -> None:
        if self.model_type not in TEXT_ARCHS:
            raise ValueError(f"text model_type must be one of {TEXT_ARCHS}, got {self.model_type!r}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} {value} is outside vocab_size {self.vocab_size}")
        if self.head_dim_override is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"text hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    downsample_ratio: float = 0.5
    image_token_id: int = 151667
    projector_hidden_act: str = "gelu"
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.downsample_ratio <= 1:
            raise ValueError(f"downsample_ratio must be in (0, 1], got {self.downsample_ratio}")
        inv = 1 / self.downsample_ratio
        if abs(inv - round(inv)) > 1e-9 or self.vision.grid_size % round(inv):
            raise ValueError(
                f"downsample_ratio {self.downsample_ratio} must be 1/k with k dividing the patch grid "
                f"{self.vision.grid_size}"
            )
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} is outside vocab_size {self.text.vocab_size}")

    @property
    def shuffle_factor(self) -> int:
        """Patches merged per side by pixel shuffle (2 for downsample_ratio 0.5)."""
        return round(1 / self.downsample_ratio)

    @property
    def image_seq_length(self) -> int:
        """LLM tokens per tile: (448/14)^2 * 0.5^2 = 256."""
        return (self.vision.grid_size // self.shuffle_factor) ** 2

    @property
    def projector_in_features(self) -> int:
        return self.vision.hidden_size * self.shuffle_factor**2


def replace(obj: Any, **overrides: Any) -> Any:
    """dataclasses.replace with a clear error for an unknown key."""
    names = {f.name for f in dataclasses.fields(obj)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown {type(obj).__name__} key(s) {unknown}; known: {sorted(names)}")
    return dataclasses.replace(obj, **overrides)


# ---------------------------------------------------------------- presets

VIT_300M = VisionConfig()
VIT_6B = VisionConfig(
    hidden_size=3200,
    num_hidden_layers=45,  # InternViT-6B-448px-V2.5 as used by InternVL3 (the last 3 of 48 layers dropped)
    num_attention_heads=25,
    intermediate_size=12800,
    norm_type="rms_norm",
    use_qk_norm=True,
    attention_bias=False,
)


def _qwen(hidden: int, layers: int, heads: int, kv: int, inter: int) -> TextConfig:
    return TextConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
    )


def tiny() -> ModelConfig:
    """A few-hundred-thousand-parameter model with every feature of the real ones, for tests and smoke runs."""
    vision = VisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=56
    )
    text = TextConfig(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=2,  # ids of `io.tokenizer.train_tokenizer`: <|endoftext|> 0, <|im_end|> 2, <IMG_CONTEXT> 5
        pad_token_id=0,
    )
    return ModelConfig(vision=vision, text=text, image_token_id=5)


def internvl3_1b() -> ModelConfig:
    # Untied lm_head, as the hub's InternVL3-1B-hf ships it (1.88 GB in bf16 = 0.94B parameters).
    return ModelConfig(vision=VIT_300M, text=_qwen(896, 24, 14, 2, 4864))


def internvl3_2b() -> ModelConfig:
    # Tied like Qwen2.5-1.5B: 1.86B parameters, the paper's 1.9B (untied would be 2.09B).
    return ModelConfig(vision=VIT_300M, text=_qwen(1536, 28, 12, 2, 8960), tie_word_embeddings=True)


def internvl3_8b() -> ModelConfig:
    return ModelConfig(vision=VIT_300M, text=_qwen(3584, 28, 28, 4, 18944))


def internvl3_9b() -> ModelConfig:
    """InternLM3-8B LLM (llama-style: no q/k/v bias, head_dim 128, 48 layers).

    TODO: vocab_size and the special-token ids assume InternVL's nine tokens appended after InternLM3's
    128,512; not checked against the hub's config.json (loading reads the real values from the file).
    """
    text = TextConfig(
        model_type="llama",
        vocab_size=128521,
        hidden_size=4096,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=2,
        intermediate_size=10240,
        attention_bias=False,
        rms_norm_eps=1e-5,
        rope_theta=50_000_000.0,
        rope_type="dynamic",
        rope_factor=2.0,
        max_position_embeddings=32768,
        bos_token_id=1,
        eos_token_id=128131,
        pad_token_id=2,
    )
    return ModelConfig(vision=VIT_300M, text=text, image_token_id=128514)


def internvl3_14b() -> ModelConfig:
    return ModelConfig(vision=VIT_300M, text=_qwen(5120, 48, 40, 8, 13824))


def internvl3_38b() -> ModelConfig:
    return ModelConfig(vision=VIT_6B, text=_qwen(5120, 64, 40, 8, 27648))


def internvl3_78b() -> ModelConfig:
    return ModelConfig(vision=VIT_6B, text=_qwen(8192, 80, 64, 8, 29568))


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": tiny,
    "internvl3_1b": internvl3_1b,
    "internvl3_2b": internvl3_2b,
    "internvl3_8b": internvl3_8b,
    "internvl3_9b": internvl3_9b,
    "internvl3_14b": internvl3_14b,
    "internvl3_38b": internvl3_38b,
    "internvl3_78b": internvl3_78b,
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()
