"""Which modules train, how, and at what learning rate: a small config per stage over the one loop."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from nativevl.train.lora import LLM_TARGETS, MLP_TARGETS, VIT_TARGETS, add_lora
from nativevl.train.qlora import BLOCK_SIZES, quantize_linears

MODES = ("frozen", "full", "lora", "qlora")  # qlora: LoRA over the layers' weights stored in NF4 (train/qlora.py)
MODULES = ("vit", "mlp", "llm")
TARGETS = {"vit": VIT_TARGETS, "mlp": MLP_TARGETS, "llm": LLM_TARGETS}
MODULE_ATTRS = {"vit": "vision_tower", "mlp": "multi_modal_projector", "llm": "language_model"}  # in the model


@dataclass(frozen=True)
class ModulePolicy:
    mode: str = "full"
    lr: float | None = None  # None: the run's learning rate
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    nf4_block: int = 64  # qlora: weights per NF4 absmax block
    double_quant: bool = True  # qlora: the absmaxes in 8 bits (QLoRA's double quantization)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"module mode must be one of {MODES}, got {self.mode!r}")
        if self.nf4_block not in BLOCK_SIZES:
            raise ValueError(f"nf4_block must be one of {BLOCK_SIZES}, got {self.nf4_block}")

    @property
    def adapted(self) -> bool:
        """LoRA layers train over a frozen base (lora, or qlora's 4-bit one)."""
        return self.mode in ("lora", "qlora")


@dataclass(frozen=True)
class StagePolicy:
    vit: ModulePolicy = field(default_factory=ModulePolicy)
    mlp: ModulePolicy = field(default_factory=ModulePolicy)
    llm: ModulePolicy = field(default_factory=ModulePolicy)
    drop_path_rate: float = 0.0  # ViT stochastic depth, rising linearly over the layers

    def get(self, name: str) -> ModulePolicy:
        return getattr(self, name)


def module_of(model: nn.Module, name: str) -> nn.Module:
    return getattr(model, MODULE_ATTRS[name])


def quantize_base(model: nn.Module, policy: StagePolicy, device: torch.device | str | None = None) -> dict[str, int]:
    """Store the LoRA target layers of every qlora module in NF4, in place, each quantized on `device` and
    kept there (default: where it is); returns the layers per module. Before the model moves to its device
    (only the 4-bit copies get there: one layer at a time in full precision), and before apply_policy."""
    out = {}
    for name in MODULES:
        pol = policy.get(name)
        if pol.mode == "qlora":
            out[name] = quantize_linears(module_of(model, name), TARGETS[name], pol.nf4_block, pol.double_quant, device)
            if out[name] == 0:
                raise ValueError(f"no layer of {name} matches the LoRA targets {TARGETS[name]}")
    return out


def apply_policy(model: nn.Module, policy: StagePolicy) -> dict[str, list[nn.Parameter]]:
    """Freeze / unfreeze / add LoRA per module; returns the trainable parameters per module.

    The lm_head belongs to "llm" (tied or not). LoRA modules keep their base weights frozen; qlora modules
    are LoRA over the NF4 layers quantize_base made (quantized here when it was not called).
    """
    quantize_base(model, policy)
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
        if pol.adapted and add_lora(mod, TARGETS[name], pol.lora_rank, pol.lora_alpha, pol.lora_dropout) == 0:
            raise ValueError(f"no layer of {name} matches the LoRA targets {TARGETS[name]}")
        seen: set[int] = set()
        params[name] = []
        for m in [mod, *extra]:
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params[name].append(p)
    return params


def frozen_linear_params(model: nn.Module) -> list[nn.Parameter]:
    """The frozen parameters that bf16 storage leaves exactly as bf16 autocast computes with them: the
    weights and biases of nn.Linear and nn.Conv2d layers none of whose parameters train (autocast casts
    those to bf16 at every use, so a bf16 copy kept instead gives the same products bit for bit), unless
    another kind of module holds them too (a tied lm_head is the embedding's table, which autocast does
    not cast). Norms, embeddings, position embeddings and layer scales keep their dtype."""
    elsewhere = {id(p) for m in model.modules() if not isinstance(m, (nn.Linear, nn.Conv2d))
                 for p in m.parameters(recurse=False)}
    out: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            own = list(m.parameters(recurse=False))
            if not any(p.requires_grad for p in own):
                out.update((id(p), p) for p in own if id(p) not in elsewhere and p.is_floating_point())
    return list(out.values())


def bf16_base(model: nn.Module, sample: int = 65536) -> bool:
    """Whether bf16 holds the model's linear layers' weights exactly, judged on the first `sample` values
    of each: a bf16 checkpoint (InternVL3's releases) loaded in float32. A model without values (meta
    device: `plan`'s shapes) counts as one."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not m.weight.is_meta:
            w = m.weight.detach().reshape(-1)[:sample]
            if not torch.equal(w.to(torch.bfloat16).to(w.dtype), w):
                return False
    return True


def store_frozen(model: nn.Module, dtype: torch.dtype, *, exact_only: bool) -> tuple[int, int]:
    """Keep the frozen linear layers' parameters (`frozen_linear_params`) in `dtype`, in place (the same
    Parameter objects). exact_only: only those whose values `dtype` holds exactly (a bf16 checkpoint
    loaded in float32, as InternVL3's releases are), so that nothing is rounded, not even in the exports;
    else all of them, rounding the others. Returns (bytes freed, parameters rounded or, with exact_only,
    left as they were for not fitting). For a LoRA run over a bf16 base the frozen base takes 2 bytes per
    weight instead of 4, and autocast makes no copy of it."""
    freed = inexact = 0
    size = torch.empty((), dtype=dtype).element_size()
    for p in frozen_linear_params(model):
        if p.dtype == dtype:
            continue
        cast = p.data.to(dtype)
        if not p.is_meta and not torch.equal(cast.to(p.dtype), p.data):  # (a meta model, for `plan`: shapes only)
            inexact += 1
            if exact_only:
                continue
        freed += p.numel() * (p.element_size() - size)
        p.data = cast
    return freed, inexact
