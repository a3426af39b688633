"""GPTQ (Frantar et al., 2022) for `nativevl quantize --calib META`: each LLM linear layer's integer
weights chosen column by column to minimise the error of its outputs on calibration inputs,
||X W^T - X Q^T||^2, rather than of its weights (round to nearest).

The inputs' second moments H = X^T X are gathered with forward hooks, one decoder layer at a time with
every earlier layer already quantized: the model reads the calibration records (images and text,
through the training data pipeline) once, up to the first decoder layer, whose inputs are kept; each
layer then runs on its inputs (its hooks gathering H), is quantized, and runs again to give the next
layer's inputs (one pass of the model in all, not one per layer); layers whose inputs are the same
tensor (q/k/v, gate/up) share one H. Then, per layer: H + 1% of its mean
diagonal (damping), the upper Cholesky factor U of H^-1, and for each block of 128 columns, each
column quantized (a group's scale set from the current weights when the group starts) and its error
spread over the columns after it by U's row, the block's errors then over the rest (the paper's
lazy batch updates). Columns no input ever reached are zeroed, as in the reference implementation.
"""

from __future__ import annotations

import logging

import torch
from tqdm import tqdm

from nativevl.io.quantize import dequantize_weight, int_range, minmax_scale

log = logging.getLogger(__name__)

# our parameter name -> the name of the tensor it reads (layers reading one tensor share its H)
_SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


def input_key(weight_name: str) -> str:
    module = weight_name.removesuffix(".weight")
    prefix, leaf = module.rsplit(".", 1)
    return f"{prefix}.{_SHARED_INPUT.get(leaf, leaf)}"


class _RoundDone(Exception):
    """Raised by the hook of a round's last layer: the rest of the forward is not needed."""


@torch.no_grad()
def collect_hessians(model, batches: list, modules: list[str], device) -> dict[str, torch.Tensor]:
    """{module name: mean of x x^T over every calibration token} for the named nn.Linear modules (float32
    on a GPU, float64 on the CPU), from whole forwards of `model`, each stopped after the last of them."""
    return _second_moments(model, modules, [lambda b=b: model(**b.to(device).model_inputs()) for b in batches])


@torch.no_grad()
def _second_moments(model, modules: list[str], forwards: list) -> dict[str, torch.Tensor]:
    """collect_hessians' statistics over the calls in `forwards` (each stopped after the last module)."""
    named = dict(model.named_modules())
    order = {name: i for i, name in enumerate(named)}
    last = max(modules, key=order.__getitem__)
    hessians: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def accumulate(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            x = x.to(torch.float32 if x.is_cuda else torch.float64)
            if name not in hessians:
                hessians[name] = torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype, device=x.device)
                counts[name] = 0
            hessians[name].addmm_(x.t(), x)
            counts[name] += x.shape[0]
            if name == last:
                raise _RoundDone
        return accumulate

    handles = [named[name].register_forward_pre_hook(hook(name)) for name in modules]
    try:
        for forward in forwards:
            try:
                forward()
            except _RoundDone:
                pass
    finally:
        for h in handles:
            h.remove()
    missing = [m for m in modules if m not in hessians]
    if missing:
        raise ValueError(f"calibration never reached {missing[:3]}")
    return {name: (h / counts[name]) for name, h in hessians.items()}


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None,
                  block: int = 128, damp: float = 0.01, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight and its inputs' (in, in) second moment -> (int8 values, float32 scales (out,
    groups)), the same symmetric min-max grid as round to nearest (io/quantize.py). Computed on `device`
    (float32 on a GPU, as the reference; float64 on the CPU)."""
    device = torch.device(device or "cpu")
    dtype = torch.float32 if device.type == "cuda" else torch.float64
    w = weight.detach().to(device, dtype).clone()
    out_f, in_f = w.shape
    group = group_size or in_f
    if in_f % group:
        raise ValueError(f"in_features {in_f} is not a multiple of group_size {group}")
    q_min, q_max = int_range(bits)
    h = hessian.to(device, dtype).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(in_f, dtype=dtype, device=device)
    try:
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        raise ValueError("the calibration inputs' second moment is not positive definite even damped; "
                         "use more calibration records") from None

    q = torch.zeros(out_f, in_f, dtype=torch.int8, device=device)
    scales = torch.zeros(out_f, in_f // group, dtype=dtype, device=device)
    if group_size is None:
        scales[:, 0] = minmax_scale(w, bits)  # one scale per output channel, from the whole row
    block = max(block, group) if group_size else block
    block -= block % group if group_size else 0
    for start in range(0, in_f, block):
        end = min(start + block, in_f)
        w1 = w[:, start:end].clone()
        err = torch.zeros_like(w1)
        u1 = u[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if group_size and col % group == 0:
                scales[:, col // group] = minmax_scale(w1[:, i:i + group], bits)
            s = scales[:, col // group]
            qi = torch.clamp(torch.round(w1[:, i] / s), q_min, q_max)
            q[:, col] = qi.to(torch.int8)
            e = (w1[:, i] - qi * s) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err[:, i] = e
        w[:, end:] -= err @ u[start:end, end:]
    return q.cpu(), scales.to("cpu", torch.float32)


def layer_of(weight_name: str) -> int:
    """The decoder layer of an LLM weight name (language_model.layers.N....)."""
    return int(weight_name.split(".")[2])


class _Captured(Exception):
    """Raised once the first decoder layer's inputs are kept: the rest of the forward is not needed."""


@torch.no_grad()
def first_layer_inputs(model, batches: list, device) -> list[tuple[tuple, dict]]:
    """Each calibration batch's inputs to the first decoder layer (hidden states, rotary cos / sin, and
    the attention's keyword arguments: document boundaries, padding mask, kernel), from one forward
    of the model per batch, stopped there."""
    kept: list[tuple[tuple, dict]] = []

    def keep(_module, args, kwargs):
        kept.append((args, kwargs))
        raise _Captured

    handle = model.language_model.layers[0].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**batch.to(device).model_inputs())
            except _Captured:
                pass
    finally:
        handle.remove()
    return kept


def gptq_model_weights(model, batches: list, weights: dict[str, torch.Tensor], bits: int, group_size: int | None,
                       device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{our weight name: (int8 values, scales)} for `weights` (our names -> float weights, in the model's
    order), by GPTQ, decoder layer after decoder layer: each layer's inputs are its input from the model
    with every earlier layer already quantized (their weights replaced, in place, by their dequantized
    values), as the reference implementation feeds each layer the quantized model's activations; they
    are carried from layer to layer (first_layer_inputs, then each quantized layer's outputs)."""
    params = dict(model.named_parameters())
    by_layer: dict[int, list[str]] = {}
    for name in weights:
        by_layer.setdefault(layer_of(name), []).append(name)
    out = {}
    bar = tqdm(total=len(weights), desc="GPTQ", unit="layer")
    inputs = first_layer_inputs(model, batches, device)
    for i, block in enumerate(model.language_model.layers[: max(by_layer, default=-1) + 1]):
        names = by_layer.get(i, [])
        if names:
            forwards = [lambda a=args, k=kwargs, b=block: b(*a, **k) for args, kwargs in inputs]
            hessians = _second_moments(model, sorted({input_key(n) for n in names}), forwards)
            chosen = {n: gptq_quantize(weights[n], hessians[input_key(n)], bits, group_size, device=device) for n in names}
            with torch.no_grad():
                for name, (q, scale) in chosen.items():
                    params[name].copy_(dequantize_weight(q, scale).to(params[name].device, params[name].dtype))
                    bar.update(1)
            out.update(chosen)
            del hessians
        with torch.no_grad():  # the quantized layer's outputs: the next layer's inputs
            inputs = [((block(*args, **kwargs), *args[1:]), kwargs) for args, kwargs in inputs]
    bar.close()
    return out


def calibration_batches(model, tokenizer, meta: str, records: int, max_tokens: int = 4096) -> list:
    """`records` records of an InternVL meta json, each at most once (all of them when it holds no more;
    a seeded sample otherwise), packed as at test time (no augmentation), with the model's image
    settings; bad records counted and skipped as in training."""
    from nativevl.data.pipeline import DataConfig, PackedDataset, read_all
    from nativevl.data.records import load_meta

    cfg = model.config
    data = DataConfig(max_tokens=max_tokens, image_size=cfg.vision.image_size, image_seq_length=cfg.image_seq_length,
                      image_token_id=cfg.image_token_id, training=False, max_records=records, read_once=True)
    batches = read_all(PackedDataset(load_meta(meta), tokenizer, data), "calibration")
    if not batches:
        raise ValueError(f"{meta}: no calibration record could be read")
    return batches
