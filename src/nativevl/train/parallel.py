"""Process groups under torchrun, FSDP2 per block, activation checkpointing, torch.compile.

One process trains the plain module. Several processes (one node or many: torchrun sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR) shard it with FSDP2: `fully_shard` on every ViT block, every
LLM block and the root (embeddings, projector, final norm, lm_head). Parameters are gathered in
bf16 and gradients reduced in fp32 on CUDA; on the CPU (gloo) everything stays fp32.

Gradients are *summed* over ranks (divide factor 1): the loss is already divided by the weight sum
over all ranks and micro-batches, so a sum is the gradient of the global loss.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from torch import nn

from nativevl.train.stages import MODULES, module_of


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device); starts the process group when torchrun set WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # Before the first CUDA allocation: packs change shape every step, and growable segments keep the
    # caching allocator from fragmenting into cudaFree-and-retry (torchtitan's default too). A user's
    # own PYTORCH_CUDA_ALLOC_CONF wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        value = value.clone()
        dist.all_reduce(value)
    return value


def all_reduce_max(value: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """rank src's picklable object on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks that get their own FSDP unit, checkpointing and compilation."""
    return [*model.vision_tower.encoder.layer, *model.language_model.layers]


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def parallelize(
    model: nn.Module,
    *,
    world: int,
    mixed_precision: bool,
    activation_checkpointing: bool,
    compile: bool,
    shard: bool | None = None,
) -> nn.Module:
    """In place, on a model already on its device and with its stage policy (LoRA) applied.

    shard: FSDP2 even when world == 1 (bf16 compute copies of fp32 master weights; needs a process
    group); default: only when world > 1.

    Order per block, as torchtitan applies it: checkpoint (innermost), compile, then shard, so the
    FSDP hooks (all-gather before, reduce-scatter after) stay outside the compiled graph.
    """
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # bf16 gathers halve the all-gather bytes; fp32 reduction keeps the summed gradients exact enough
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    shard = world > 1 if shard is None else shard
    for block in blocks(model):
        if activation_checkpointing:
            checkpoint(block)  # hook-based: parameter names (and checkpoint keys) stay unchanged
        if compile:
            block.compile()
        if shard:
            fully_shard(block, mp_policy=policy)
    if shard:
        # The root stays gathered after forward: the loss reads lm_head.weight outside the forward.
        fully_shard(model, mp_policy=policy, reshard_after_forward=False)
        # A packed forward returns its (1, T, D) hidden states' row 0, a view; torch >= 2.12 warns that an
        # in-place op on it would skip the pre-backward hook. Nothing here modifies a forward's output in
        # place (the losses read them; test_parallel checks 2 ranks' losses and gradients against 1).
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w*VisionLanguageModel\) returned a view",
                                category=UserWarning)
        model.vision_every_forward = True
        for module in model.modules():
            if is_sharded(module):
                module.set_gradient_divide_factor(1.0)
                if hasattr(module, "set_force_sum_reduction_for_comms"):  # gloo has no PREMUL_SUM
                    module.set_force_sum_reduction_for_comms(True)
    return model


def trainable_by_module(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The parameters that train, per stage module, as the (possibly sharded) model holds them now.

    Collected after `parallelize`, since fully_shard replaces every parameter by a sharded one.
    """
    out: dict[str, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name in MODULES:
        extra = [model.lm_head] if name == "llm" else []  # tied or not, the head belongs to the LLM
        out[name] = []
        for m in [module_of(model, name), *extra]:
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out[name].append(p)
    return out


def fill_missing_grads(params: list[nn.Parameter]) -> None:
    """Zero gradients for trainable parameters that no pack of this step reached (a ViT in an all-text
    step), so that AdamW steps them as it does on several ranks, where every unit gets a (zero) gradient."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """clip_grad_norm_ over (possibly sharded) parameters; returns the global norm before clipping."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, whole and on the CPU, on rank 0 (empty elsewhere); collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_sharded(model):
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
