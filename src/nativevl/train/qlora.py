"""QLoRA's frozen base (Dettmers et al., 2023): linear layers held in 4-bit NormalFloat (NF4), in blocks of
64 weights with one absmax each, the absmaxes themselves quantized to 8 bits in blocks of 256 ("double
quantization"), exactly as bitsandbytes stores them (`quantize_4bit(quant_type="nf4",
compress_statistics=True)`): about 4.13 bits per weight instead of 32 (fp32 masters) or 16 (bf16).

A layer's weight is dequantized in its forward and again in its backward (only the 4-bit codes are kept
between them), so a whole forward holds one layer's dequantized weight at a time. The base is frozen; LoRA
(train/lora.py) wraps these layers like nn.Linear ones. The codes are non-persistent buffers: checkpoints
hold the LoRA layers and what trains, and a resumed run re-quantizes its base, which is deterministic.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

# The 16 NF4 levels: quantiles of N(0, 1) scaled to [-1, 1], with an exact 0 (QLoRA paper, appendix E),
# as float32 (the values bitsandbytes uses).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts
SCALE_BLOCK = 256  # absmaxes per block of the double quantization


@functools.cache
def _levels(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


@functools.cache
def _dynamic_levels(device: torch.device) -> torch.Tensor:
    """The signed 8-bit "dynamic" data type of 8-bit optimizers (Dettmers et al., 2022) that double
    quantization stores the absmaxes in: for exponents 10^-6 .. 10^0, 2^i evenly spaced fractions in
    [0.1, 1] (the midpoints of i-th linspace), both signs, plus 0 and 1; 256 levels, sorted."""
    values = []
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0 * 10.0 ** (i - 6)  # float32 arithmetic throughout
        values += [mids, -mids]
    values.append(torch.tensor([0.0, 1.0]))
    return torch.cat(values).sort().values.to(device)


def _blockwise(flat: torch.Tensor, block: int, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest level (ties to the lower one) of each value over its block's absmax; returns (level
    indices as uint8, absmax per block as float32). A last partial block has its own absmax."""
    flat = flat.float()
    n = flat.numel()
    starts = torch.arange(0, n, block, device=flat.device)
    padded = torch.nn.functional.pad(flat, (0, len(starts) * block - n)).view(-1, block)
    absmax = padded.abs().amax(dim=1)
    scaled = (padded * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)[:n]
    bounds = (levels[:-1] + levels[1:]) / 2
    return torch.bucketize(scaled, bounds).to(torch.uint8), absmax


def _expand(values: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    n = values.numel()
    return values * scales.repeat_interleave(block)[:n]


def quantize_nf4(weight: torch.Tensor, block: int = 64, double_quant: bool = True) -> dict[str, torch.Tensor]:
    """A weight as NF4 codes, two per byte (the first of each pair in the high nibble), in row-major blocks of
    `block`; with double_quant the absmaxes as 8-bit codes over blocks of 256 around their mean."""
    if block not in BLOCK_SIZES:
        raise ValueError(f"NF4 block size must be one of {BLOCK_SIZES}, got {block}")
    if weight.dim() != 2:
        raise ValueError(f"NF4 quantizes 2-D weights, got shape {tuple(weight.shape)}")
    codes, absmax = _blockwise(weight.detach().reshape(-1), block, _levels(weight.device))
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), NF4_LEVELS.index(0.0))])  # a 0 pads the last byte
    state = {"codes": (codes[0::2] << 4) | codes[1::2]}
    if double_quant:
        offset = absmax.mean()
        state["scale_codes"], state["scale_absmax"] = _blockwise(absmax - offset, SCALE_BLOCK, _dynamic_levels(weight.device))
        state["scale_offset"] = offset.reshape(1)
    else:
        state["absmax"] = absmax
    return state


def dequantize_nf4(state: dict[str, torch.Tensor], shape: tuple[int, int], block: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight quantize_nf4 stored, computed in float32 (as bitsandbytes does), returned in `dtype`.
    The level tables come from the state when it holds them (NF4Linear's buffers: no cache lookup for
    torch.compile to trace), else from a per-device cache."""
    packed = state["codes"]
    levels = state["levels"] if "levels" in state else _levels(packed.device)
    n = shape[0] * shape[1]
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n].long()
    if "scale_codes" in state:
        scale_levels = state["scale_levels"] if "scale_levels" in state else _dynamic_levels(packed.device)
        absmax = _expand(scale_levels[state["scale_codes"].long()], state["scale_absmax"], SCALE_BLOCK) + state["scale_offset"]
    else:
        absmax = state["absmax"]
    return _expand(levels[codes], absmax, block).view(shape).to(dtype)


class _NF4Matmul(torch.autograd.Function):
    """x @ W^T with W dequantized in forward and again in backward: autograd keeps no weight copy.
    Runs in the autocast dtype when autocast is on (as nn.Linear would), else in x's dtype."""

    @staticmethod
    def forward(ctx, x, layer):
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        ctx.layer, ctx.dtype, ctx.in_dtype = layer, dtype, x.dtype
        with torch.autocast(x.device.type, enabled=False):
            return x.to(dtype) @ layer.dequantized(dtype).t()

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None
        with torch.autocast(grad_out.device.type, enabled=False):
            grad_in = grad_out.to(ctx.dtype) @ ctx.layer.dequantized(ctx.dtype)
        return grad_in.to(ctx.in_dtype), None


class NF4Linear(nn.Module):
    """A frozen nn.Linear stored as NF4 (QLoRA's base layer); the bias, if any, is kept as it was."""

    def __init__(self, linear: nn.Linear, block: int = 64, double_quant: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.block, self.double_quant = block, double_quant
        self.dtype = linear.weight.dtype  # what the layer computed in: LoRA layers are made in it
        for name, value in quantize_nf4(linear.weight, block, double_quant).items():
            self.register_buffer(name, value, persistent=False)
        device = linear.weight.device
        self.register_buffer("levels", _levels(device).clone(), persistent=False)
        if double_quant:
            self.register_buffer("scale_levels", _dynamic_levels(device).clone(), persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def weight_numel(self) -> int:
        return self.in_features * self.out_features

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        state = {name: buf for name, buf in self.named_buffers(recurse=False)}
        return dequantize_nf4(state, (self.out_features, self.in_features), self.block, dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _NF4Matmul.apply(x, self)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear holding the dequantized weight (and the bias)."""
        dtype = dtype or self.dtype
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.device, dtype=dtype)
        with torch.no_grad():
            out.weight.copy_(self.dequantized(dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 block={self.block}, double_quant={self.double_quant}")


def quantize_linears(module: nn.Module, targets: tuple[str, ...], block: int = 64, double_quant: bool = True) -> int:
    """Replace every nn.Linear child named in `targets` (recursively) by its NF4Linear; returns how many
    target layers are NF4 now (those quantized before included: calling it twice changes nothing)."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, (nn.Linear, NF4Linear)) and name in targets:
            if isinstance(child, nn.Linear):
                setattr(module, name, NF4Linear(child, block, double_quant))
            count += 1
        else:
            count += quantize_linears(child, targets, block, double_quant)
    return count


def nf4_bytes_per_weight(block: int = 64, double_quant: bool = True) -> float:
    """Bytes per weight of an NF4 layer: half a byte, plus its share of the absmaxes."""
    if double_quant:
        return 0.5 + 1 / block + 4 / (block * SCALE_BLOCK)
    return 0.5 + 4 / block
