"""Which modules train, how, and at what learning rate: a small config per stage over the one loop."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from nativevl.train.lora import LLM_TARGETS, MLP_TARGETS, VIT_TARGETS, add_lora

MODES = ("frozen", "full", "lora")
MODULES = ("vit", "mlp", "llm")


@dataclass(frozen=True)
class ModulePolicy:
    mode: str = "full"
    lr: float | None = None  # None: the run's learning rate
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"module mode must be one of {MODES}, got {self.mode!r}")


@dataclass(frozen=True)
class StagePolicy:
    vit: ModulePolicy = field(default_factory=ModulePolicy)
    mlp: ModulePolicy = field(default_factory=ModulePolicy)
    llm: ModulePolicy = field(default_factory=ModulePolicy)
    drop_path_rate: float = 0.0  # ViT stochastic depth, rising linearly over the layers

    def get(self, name: str) -> ModulePolicy:
        return getattr(self, name)


def module_of(model: nn.Module, name: str) -> nn.Module:
    return {"vit": model.vision_tower, "mlp": model.multi_modal_projector, "llm": model.language_model}[name]


def apply_policy(model: nn.Module, policy: StagePolicy) -> dict[str, list[nn.Parameter]]:
    """Freeze / unfreeze / add LoRA per module; returns the trainable parameters per module.

    The lm_head belongs to "llm" (tied or not). LoRA modules keep their base weights frozen.
    """
    layers = model.vision_tower.encoder.layer
    n = len(layers)
    for i, layer in enumerate(layers):
        layer.drop_path_rate = policy.drop_path_rate * i / max(n - 1, 1)
    params: dict[str, list[nn.Parameter]] = {}
    for name in MODULES:
        pol = policy.get(name)
        mod = module_of(model, name)
        extra = [model.lm_head] if name == "llm" else []
        for m in [mod, *extra]:
            for p in m.parameters():
                p.requires_grad_(pol.mode == "full")
        if pol.mode == "lora":
            targets = {"vit": VIT_TARGETS, "mlp": MLP_TARGETS, "llm": LLM_TARGETS}[name]
            if add_lora(mod, targets, pol.lora_rank, pol.lora_alpha, pol.lora_dropout) == 0:
                raise ValueError(f"no layer of {name} matches the LoRA targets {targets}")
        seen: set[int] = set()
        params[name] = []
        for m in [mod, *extra]:
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params[name].append(p)
    return params
