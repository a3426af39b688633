"""`nativevl plan`: will a recipe fit, per GPU, and what to change when it does not.

Bytes per GPU under FSDP2 over N GPUs with bf16 compute (train/parallel.py):
- parameters: fp32 master shards (4 B / N per parameter) + the bf16 copies gathered at once: the root
  (embeddings, projector, lm_head; kept gathered through the step) and two blocks (the running one
  and the prefetched one); on one GPU (no FSDP: fp32 module, bf16 autocast) the autocast copies of
  all the weights backward goes through (2 B per parameter); frozen linear layers (a LoRA base, a
  frozen ViT, all of MPO's reference) kept in bf16 (--frozen_dtype=auto) take 2 B / N and no copy;
  QLoRA's NF4 weights instead take about 0.52 B each on every GPU (buffers: not sharded, never gathered;
  with several GPUs the two gathered blocks are still counted whole, which about offsets the one layer
  decoded at a time and a checkpointed block's recompute, not counted);
- gradients: fp32 shards of the trainable parameters (4 B / N) + one gathered block's bf16 gradients
  and their fp32 reduce-scatter copy (6 B per parameter of the block) + the root's bf16 gradients
  (it stays gathered, so they live through backward);
- optimiser: AdamW's two fp32 moments of the trainable parameters (8 B / N);
- activations: what backward keeps for one pack (micro-batches run one after another) at the
  recipe's tokens and tiles per pack, bf16, with flash/varlen attention (no T^2 score matrix);
  with activation checkpointing only each block's input is kept, plus one block recomputed;
- the loss: one chunk of `loss_chunk` labelled positions' logits (bf16 + fp32 + fp32 gradient);
- overhead: CUDA context, workspace and allocator slack, a flat 3 GiB + 5%.
Activations are an estimate (saved tensors counted per layer, within about 25% of measured peaks
for transformer blocks); the state terms are exact for the parameter counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nativevl.config import ModelConfig
from nativevl.model.vlm import VisionLanguageModel
from nativevl.train.lora import LoRALinear
from nativevl.train.parallel import trainable_by_module
from nativevl.train.qlora import NF4Linear, nf4_bytes_per_weight
from nativevl.train.stages import MODULE_ATTRS, apply_policy, frozen_linear_params, quantize_base

GiB = 1024**3


def vit_params(cfg: ModelConfig) -> dict[str, int]:
    v = cfg.vision
    d, i = v.hidden_size, v.intermediate_size
    norm = 2 * d if v.norm_type == "layer_norm" else d
    qkv_bias = 3 * d if v.attention_bias else 0
    block = 2 * norm + 3 * d * d + qkv_bias + d * d + d + (2 * d if v.use_qk_norm else 0) + 2 * d * i + i + d + 2 * d
    embed = d + v.num_channels * v.patch_size**2 * d + d + v.num_positions * d
    return {"block": block, "blocks": v.num_hidden_layers * block, "root": embed}


def mlp_params(cfg: ModelConfig) -> int:
    c_in, c_out = cfg.projector_in_features, cfg.text.hidden_size
    return 2 * c_in + c_in * c_out + c_out + c_out * c_out + c_out


def llm_params(cfg: ModelConfig) -> dict[str, int]:
    t = cfg.text
    d, hd = t.hidden_size, t.head_dim
    q, kv = t.num_attention_heads * hd, t.num_key_value_heads * hd
    bias = q + 2 * kv if t.attention_bias else 0
    block = 2 * d + d * q + 2 * d * kv + bias + q * d + 3 * d * t.intermediate_size
    embed = t.vocab_size * d
    head = 0 if cfg.tie_word_embeddings else t.vocab_size * d
    return {"block": block, "blocks": t.num_hidden_layers * block, "root": embed + d + head}


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters per stage module (the lm_head belongs to llm), as VisionLanguageModel holds them."""
    return {"vit": vit_params(cfg)["blocks"] + vit_params(cfg)["root"], "mlp": mlp_params(cfg),
            "llm": llm_params(cfg)["blocks"] + llm_params(cfg)["root"]}


def _llm_act_per_token_layer(cfg: ModelConfig) -> int:
    """bf16 bytes backward keeps per token per decoder layer: norm inputs/outputs, q/k/v, attention
    output, residuals, the SwiGLU's gate, up and product."""
    t = cfg.text
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    return 2 * (6 * t.hidden_size + 2 * q + 2 * kv + 4 * t.intermediate_size)


def _vit_act_per_token_layer(cfg: ModelConfig) -> int:
    v = cfg.vision
    return 2 * (10 * v.hidden_size + 3 * v.intermediate_size)


@dataclass(frozen=True)
class Plan:
    gpus: int
    gpu_bytes: int
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    loss: int
    overhead: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.loss + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_bytes

    @property
    def lower_bound(self) -> int:
        """The least this run can take: the exact terms, the activations with their estimate taken as 25%
        high (divided by 1.25), the overhead's flat 3 GiB."""
        return self.parameters + self.gradients + self.optimizer + self.loss + int(self.activations / 1.25) + 3 * GiB


def plan(
    cfg: ModelConfig,
    trainable: dict[str, int],
    *,
    gpus: int,
    tokens: int,
    tiles: int,
    activation_checkpointing: bool,
    loss_chunk: int = 4096,
    gpu_bytes: int = 80 * GiB,
    reference: bool = False,
    quantized: int = 0,
    nf4_bytes: float = 0.5,
    frozen_bf16: dict[str, int] | None = None,
    reference_bf16: int = 0,
    adapters: int = 0,
    trainable_roots: dict[str, int] | None = None,
    dropout: dict[str, int] | None = None,
) -> Plan:
    """trainable: trainable parameters per module ("vit", "mlp", "llm"), e.g. 0 for a frozen one.
    reference: MPO's frozen copy of the initial model, sharded like the policy (no gradients).
    quantized: weights stored in NF4 (QLoRA's base layers), `nf4_bytes` each, on every GPU.
    frozen_bf16: parameters per module kept in bf16 (frozen linear layers), reference_bf16: the
    reference's; the others are fp32. adapters: trainable LoRA parameters (fp32, beside the base model's);
    trainable_roots: trainable parameters outside each module's blocks (default: a module's trainable
    parameters fill its root first, as in full training). dropout: bytes LoRA dropout keeps for backward
    (each adapted layer's dropped bf16 input and its mask) per token per block of "vit" and "llm", per
    image token of "mlp" (stage_counts)."""
    if gpus < 1 or tokens < 1 or tiles < 0:
        raise ValueError(f"gpus and tokens must be >= 1 and tiles >= 0, got {gpus}, {tokens}, {tiles}")
    if loss_chunk < 1:
        raise ValueError(f"loss_chunk must be >= 1 labelled position, got {loss_chunk}")
    if gpu_bytes <= 0:
        raise ValueError(f"gpu_bytes (--gpu_memory) must be > 0, got {gpu_bytes}")
    vit, llm = vit_params(cfg), llm_params(cfg)
    total = sum(param_counts(cfg).values())
    n_train = sum(trainable.values())
    frozen_bf16 = frozen_bf16 or {}
    half = sum(frozen_bf16.values())
    if gpus > 1:
        bf16_copies = 2 * (vit["root"] + mlp_params(cfg) + llm["root"]) + 2 * 2 * max(vit["block"], llm["block"])
    else:
        # one process: the plain module under bf16 autocast, which caches a bf16 copy of each fp32
        # trainable weight for the whole forward (and backward keeps the copies of the frozen fp32 weights
        # it differentiates through; weights kept in bf16 need none); a frozen ViT runs without backward,
        # its casts are transient
        frozen_vit = param_counts(cfg)["vit"] - frozen_bf16.get("vit", 0) if trainable.get("vit", 0) == 0 else 0
        bf16_copies = 2 * (total - quantized - half - frozen_vit)
    nf4 = math.ceil(nf4_bytes * quantized)
    # LoRA's fp32 weights, and their bf16 copies: autocast's on one GPU, a gathered block's on several
    layers = cfg.text.num_hidden_layers + cfg.vision.num_hidden_layers
    bf16_copies += 2 * adapters if gpus == 1 else 2 * 2 * math.ceil(adapters / max(layers, 1))
    parameters = math.ceil((4 * (total - quantized - half + adapters) + 2 * half) / gpus) + nf4 + bf16_copies
    if reference:
        parameters += math.ceil((4 * (total - quantized - reference_bf16) + 2 * reference_bf16) / gpus) + nf4
    gradients = math.ceil(4 * n_train / gpus)
    if gpus > 1:
        # reduce_dtype=float32: a block's bf16 gradients are copied into an fp32 reduce-scatter input of
        # the whole block (2 + 4 B per parameter); the root stays gathered, so its bf16 gradients (lm_head
        # first) live through the whole backward. Trainable parameters beyond a module's root are in blocks.
        roots = {"vit": vit["root"], "mlp": mlp_params(cfg), "llm": llm["root"]}
        train_root = trainable_roots if trainable_roots is not None else {
            m: min(trainable.get(m, 0), r) for m, r in roots.items()}
        n_layers = {"vit": cfg.vision.num_hidden_layers, "llm": cfg.text.num_hidden_layers}
        block_trains = [math.ceil((trainable.get(m, 0) - train_root.get(m, 0)) / n_layers[m]) for m in n_layers
                        if trainable.get(m, 0) > train_root.get(m, 0)]  # one block's trainable parameters
        gradients += 2 * sum(train_root.values()) + 6 * max(block_trains, default=0)
    optimizer = math.ceil(8 * n_train / gpus)

    t, v = cfg.text, cfg.vision
    vit_tokens = tiles * v.num_positions
    per_llm = _llm_act_per_token_layer(cfg) * tokens
    per_vit = _vit_act_per_token_layer(cfg) * vit_tokens
    dropout = dropout or {}
    per_llm += dropout.get("llm", 0) * tokens  # a checkpointed block keeps them while it is recomputed
    per_vit += dropout.get("vit", 0) * vit_tokens
    if trainable.get("vit", 0) == 0:
        # a frozen ViT needs no backward (nothing upstream trains), so it keeps nothing, checkpointed or not
        per_vit, vit_tokens = 0, 0
    if activation_checkpointing:
        activations = (2 * t.hidden_size * tokens * t.num_hidden_layers + per_llm
                       + 2 * v.hidden_size * vit_tokens * v.num_hidden_layers + per_vit)
    else:
        activations = per_llm * t.num_hidden_layers + per_vit * v.num_hidden_layers
    activations += 2 * 2 * t.hidden_size * tokens  # embeddings in, final hidden states out
    activations += dropout.get("mlp", 0) * tiles * cfg.image_seq_length
    loss = min(loss_chunk, tokens) * t.vocab_size * (2 + 4 + 4)
    subtotal = parameters + gradients + optimizer + activations + loss
    overhead = 3 * GiB + subtotal // 20
    return Plan(gpus, gpu_bytes, parameters, gradients, optimizer, activations, loss, overhead)


def advice(cfg: ModelConfig, trainable: dict[str, int], *, gpus: int, tokens: int, tiles: int,
           activation_checkpointing: bool, loss_chunk: int, gpu_bytes: int, reference: bool = False,
           quantized: int = 0, nf4_bytes: float = 0.5, frozen_bf16: dict[str, int] | None = None,
           reference_bf16: int = 0, adapters: int = 0, trainable_roots: dict[str, int] | None = None,
           dropout: dict[str, int] | None = None) -> list[str]:
    """What to change, cheapest first, when the plan does not fit; [] when it does."""
    kw = {"tiles": tiles, "loss_chunk": loss_chunk, "gpu_bytes": gpu_bytes, "reference": reference,
          "quantized": quantized, "nf4_bytes": nf4_bytes, "frozen_bf16": frozen_bf16, "reference_bf16": reference_bf16,
          "adapters": adapters, "trainable_roots": trainable_roots, "dropout": dropout}
    if plan(cfg, trainable, gpus=gpus, tokens=tokens, activation_checkpointing=activation_checkpointing, **kw).fits:
        return []
    out = []
    if not activation_checkpointing and plan(cfg, trainable, gpus=gpus, tokens=tokens, activation_checkpointing=True, **kw).fits:
        out.append("--activation_checkpointing=true (about 30% more compute)")
    for ac in ([activation_checkpointing] if activation_checkpointing or out else [False, True]):
        more = next((n for n in range(gpus + 1, 1025) if plan(cfg, trainable, gpus=n, tokens=tokens,
                                                             activation_checkpointing=ac, **kw).fits), None)
        if more:
            out.append(f"{more} GPUs" + (" with --activation_checkpointing=true" if ac else ""))
            break
    def fits_packs(n: int) -> bool:
        return plan(cfg, trainable, gpus=gpus, tokens=n, activation_checkpointing=True,
                    **{**kw, "tiles": min(tiles, n // max(cfg.image_seq_length, 1))}).fits

    smaller = tokens
    while not fits_packs(smaller) and smaller // 2 >= 256:  # halving down to 256-token packs, 256 included
        smaller //= 2
    if smaller < tokens and fits_packs(smaller):
        out.append(f"--max_tokens={smaller} --max_tiles={min(tiles, smaller // max(cfg.image_seq_length, 1))} "
                   "with --activation_checkpointing=true (raise --global_batch to keep the tokens per step)")
    if not out:
        out.append("does not fit even with checkpointing, 1024 GPUs or 256-token packs: freeze modules, or use LoRA "
                   "(--stage.llm.mode=lora) or QLoRA (--stage.llm.mode=qlora)")
    return out


def format_plan(p: Plan, title: str) -> str:
    rows = [("parameters (fp32 / bf16 shards, gathered bf16, NF4)", p.parameters), ("gradients (fp32 shards)", p.gradients),
            ("optimizer (AdamW moments, fp32 shards)", p.optimizer), ("activations (one pack)", p.activations),
            ("loss chunk (logits)", p.loss), ("overhead (context, slack)", p.overhead), ("total", p.total)]
    width = max(len(name) for name, _ in rows)
    lines = [title] + [f"  {name:{width}s} {b / GiB:8.2f} GiB" for name, b in rows]
    verdict = "fits" if p.fits else "does NOT fit"
    lines.append(f"  {verdict} in {p.gpu_bytes / GiB:.0f} GiB per GPU ({p.total / p.gpu_bytes:.0%})")
    return "\n".join(lines)


def stage_counts(cfg: ModelConfig, stage) -> tuple[dict[str, int], int, float, dict]:
    """(trainable parameters per module, weights stored in NF4, bytes per NF4 weight, {"adapters": LoRA
    parameters (not in the base model), "trainable_roots": trainable parameters outside the blocks, per
    module, "dropout": plan()'s LoRA dropout bytes})
    of a model of `cfg` under a StagePolicy, from a model built on the meta device (shapes only)."""
    with torch.device("meta"):
        model = VisionLanguageModel(cfg)
        apply_policy(model, stage)
        by_module = trainable_by_module(model)
        trainable = {m: sum(p.numel() for p in ps) for m, ps in by_module.items()}
        nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]  # QLoRA's base layers
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        adapters = sum(p.numel() for n, p in named if "lora_" in n)
        in_blocks = {id(p) for n, p in named if ".layers." in n}
        roots = {m: sum(p.numel() for p in ps if id(p) not in in_blocks) for m, ps in by_module.items()}
        # LoRA dropout's output (bf16) and mask (1 B) per input feature of each adapted layer, kept for backward
        dropout = {m: 3 * sum(layer.base.in_features for layer in getattr(model, attr).modules()
                              if isinstance(layer, LoRALinear) and isinstance(layer.dropout, torch.nn.Dropout))
                   for m, attr in MODULE_ATTRS.items()}
        dropout["vit"] //= max(cfg.vision.num_hidden_layers, 1)
        dropout["llm"] //= max(cfg.text.num_hidden_layers, 1)
    quantized = sum(m.weight_numel() for m in nf4)
    nf4_bytes = sum(nf4_bytes_per_weight(m.block, m.double_quant) * m.weight_numel() for m in nf4) / max(quantized, 1)
    return trainable, quantized, nf4_bytes, {"adapters": adapters, "trainable_roots": roots, "dropout": dropout}


def bf16_counts(cfg: ModelConfig, stage) -> tuple[dict[str, int], int]:
    """(parameters per module, MPO reference's parameters) that --frozen_dtype=auto keeps in bf16 under a
    StagePolicy: `stages.frozen_linear_params` of a meta-device model (the reference: of the model as it
    is before LoRA, every layer frozen; QLoRA's NF4 layers are neither)."""
    with torch.device("meta"):
        model = VisionLanguageModel(cfg)
        quantize_base(model, stage)
        model.requires_grad_(False)
        reference = sum(p.numel() for p in frozen_linear_params(model))
        apply_policy(model, stage)
        ids = {id(p) for p in frozen_linear_params(model)}
        per_module = {m: sum(p.numel() for p in getattr(model, attr).parameters() if id(p) in ids)
                      for m, attr in MODULE_ATTRS.items()}
        per_module["llm"] += model.lm_head.weight.numel() if id(model.lm_head.weight) in ids else 0
    return per_module, reference


def keeps_frozen_bf16(train, base_is_bf16) -> bool:
    """Whether a run of TrainConfig `train` keeps its frozen linear layers in bf16: a bf16 run (`plan`
    assumes bf16 compute unless --dtype=float32) with --frozen_dtype=bfloat16, or auto over a base bf16
    holds exactly (`base_is_bf16()`, asked only then)."""
    if train.dtype == "float32" or train.frozen_dtype == "float32":
        return False
    return train.frozen_dtype == "bfloat16" or base_is_bf16()


def frozen_in_bf16(run) -> bool:
    """`keeps_frozen_bf16` for a run (recipes.Run): its --init_from checkpoint's stored dtypes tell whether
    the base is bf16; a preset's shape stands for a released checkpoint, which is."""
    from nativevl.io.hf import stored_dtypes

    return keeps_frozen_bf16(run.train, lambda: not run.model.init_from or stored_dtypes(run.model.init_from) <= {"BF16"})


def run_inputs(cfg: ModelConfig, stage, *, tokens: int, tiles: int, loss_chunk: int, gpu_bytes: int,
               reference: bool, frozen_bf16: bool = True) -> tuple[dict[str, int], dict]:
    """(trainable parameters per module, the keyword arguments of plan() and advice() but gpus and
    checkpointing) of a run: its module policies, packs, loss chunk, GPU memory, MPO's reference, and
    whether its frozen linear layers are kept in bf16."""
    trainable, quantized, nf4_bytes, layout = stage_counts(cfg, stage)
    half, ref_half = bf16_counts(cfg, stage) if frozen_bf16 else ({}, 0)
    return trainable, {"tokens": tokens, "tiles": tiles, "loss_chunk": loss_chunk, "gpu_bytes": gpu_bytes,
                       "reference": reference, "quantized": quantized, "nf4_bytes": nf4_bytes,
                       "frozen_bf16": half, "reference_bf16": ref_half if reference else 0, **layout}


def preflight(cfg: ModelConfig, stage, *, gpus: int, tokens: int, tiles: int, activation_checkpointing: bool,
              loss_chunk: int, gpu_bytes: int, reference: bool, frozen_bf16: bool = True) -> tuple[Plan, str]:
    """Before a training run touches its GPUs: (the plan, a report of it and, when it does not fit, of what
    would: advice)."""
    trainable, kw = run_inputs(cfg, stage, tokens=tokens, tiles=tiles, loss_chunk=loss_chunk, gpu_bytes=gpu_bytes,
                               reference=reference, frozen_bf16=frozen_bf16)
    p = plan(cfg, trainable, gpus=gpus, activation_checkpointing=activation_checkpointing, **kw)
    report = format_plan(p, f"memory per GPU ({gpus} GPU(s), packs of {tokens} tokens and {tiles} tiles, "
                            f"activation checkpointing {'on' if activation_checkpointing else 'off'}):")
    if not p.fits:
        hints = advice(cfg, trainable, gpus=gpus, activation_checkpointing=activation_checkpointing, **kw)
        report += "".join(f"\nto fit: {h}" for h in hints)
    return p, report
