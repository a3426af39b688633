"""QLoRA's frozen base (Dettmers et al., 2023): linear layers held in 4-bit NormalFloat (NF4), in blocks of
64 weights with one absmax each, the absmaxes themselves quantized to 8 bits in blocks of 256 ("double
quantization"), as bitsandbytes stores them (`quantize_4bit(quant_type="nf4", compress_statistics=True)`;
the scales' offset is a float64 mean, which bitsandbytes takes in float32): about 4.13 bits per weight
instead of 32 (fp32 masters) or 16 (bf16).

A layer's weight is dequantized in its forward and again in its backward (only the 4-bit codes are kept
between them), so a whole forward holds one layer's dequantized weight at a time. The base is frozen; LoRA
(train/lora.py) wraps these layers like nn.Linear ones. The codes are non-persistent buffers: checkpoints
hold the LoRA layers and what trains, and a resumed run re-quantizes its base, which is deterministic.
"""

from __future__ import annotations

import functools
import hashlib

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
    padded = torch.nn.functional.pad(flat, (0, -n % block)).view(-1, block)
    absmax = padded.abs().amax(dim=1)
    scaled = (padded * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)[:n]
    bounds = (levels[:-1] + levels[1:]) / 2
    return torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8), absmax


def _expand(values: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """values (flat) times their block's scale, without a per-value copy of the scales."""
    n = values.numel()
    full = n - n % block
    out = (values[:full].view(-1, block) * scales[: full // block, None]).view(-1)
    return out if full == n else torch.cat([out, values[full:] * scales[-1]])


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
        # the mean in float64, rounded once: the same on every device and thread count (a float32 sum's
        # order changes its last bits, and with them a few codes; bitsandbytes takes the float32 mean)
        offset = absmax.double().mean().float()
        state["scale_codes"], state["scale_absmax"] = _blockwise(absmax - offset, SCALE_BLOCK, _dynamic_levels(weight.device))
        state["scale_offset"] = offset.reshape(1)
    else:
        state["absmax"] = absmax
    return state


def _pair_table(levels: torch.Tensor) -> torch.Tensor:
    """The two levels each packed byte stands for, (256, 2): decoding is one lookup per byte."""
    byte = torch.arange(256, device=levels.device)
    return torch.stack([levels[byte >> 4], levels[byte & 0xF]], dim=1)


def _decode(codes: torch.Tensor, pairs: torch.Tensor, absmax: torch.Tensor | None, scale_codes: torch.Tensor | None,
            scale_absmax: torch.Tensor | None, scale_offset: torch.Tensor | None, scale_levels: torch.Tensor | None,
            rows: int, cols: int, block: int, dtype: torch.dtype) -> torch.Tensor:
    n = rows * cols
    if absmax is None:
        absmax = _expand(scale_levels.index_select(0, scale_codes.int()), scale_absmax, SCALE_BLOCK) + scale_offset
    values = pairs.index_select(0, codes.int()).reshape(-1)[:n]  # int32 indices: 2 B per weight, not int64's 8
    return _expand(values, absmax, block).view(rows, cols).to(dtype)


def dequantize_nf4(state: dict[str, torch.Tensor], shape: tuple[int, int], block: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight quantize_nf4 stored, computed in float32 (as bitsandbytes does), returned in `dtype`."""
    device = state["codes"].device
    dq = "scale_codes" in state
    return _decode(state["codes"], _pair_table(_levels(device)), state.get("absmax"), state.get("scale_codes"),
                   state.get("scale_absmax"), state.get("scale_offset"), _dynamic_levels(device) if dq else None,
                   shape[0], shape[1], block, dtype)


@torch.library.custom_op("nativevl::nf4_matmul", mutates_args=(), schema=(
    "(Tensor x, Tensor codes, Tensor pairs, Tensor? absmax, Tensor? scale_codes, Tensor? scale_absmax, "
    "Tensor? scale_offset, Tensor? scale_levels, int rows, int cols, int block, bool transpose) -> Tensor"))
def nf4_matmul(x: torch.Tensor, codes: torch.Tensor, pairs: torch.Tensor, absmax: torch.Tensor | None,
               scale_codes: torch.Tensor | None, scale_absmax: torch.Tensor | None, scale_offset: torch.Tensor | None,
               scale_levels: torch.Tensor | None, rows: int, cols: int, block: int, transpose: bool) -> torch.Tensor:
    """x @ W^T (transpose: x @ W) for the NF4 weight W (rows x cols), decoded in x's dtype. An opaque
    operator: torch.compile can neither keep the decoded weight for backward nor move the decode across it."""
    w = _decode(codes, pairs, absmax, scale_codes, scale_absmax, scale_offset, scale_levels, rows, cols, block, x.dtype)
    return x @ w if transpose else x @ w.t()


@nf4_matmul.register_fake
def _(x, codes, pairs, absmax, scale_codes, scale_absmax, scale_offset, scale_levels, rows, cols, block, transpose):
    return x.new_empty(*x.shape[:-1], cols if transpose else rows)


def _setup(ctx, inputs, output) -> None:  # the signature torch.library asks for
    _, *state, rows, cols, block, transpose = inputs
    ctx.save_for_backward(*state)  # the codes and scales (buffers, not copies): never the decoded weight
    ctx.shape = (rows, cols, block, transpose)


def _backward(ctx, grad):
    rows, cols, block, transpose = ctx.shape
    grad_x = nf4_matmul(grad, *ctx.saved_tensors, rows, cols, block, not transpose)  # decoded again
    return (grad_x,) + (None,) * 11


nf4_matmul.register_autograd(_backward, setup_context=_setup)

FLOAT_BUFFERS = ("pairs", "absmax", "scale_absmax", "scale_offset", "scale_levels")


class NF4Linear(nn.Module):
    """A frozen nn.Linear stored as NF4 (QLoRA's base layer); the bias, if any, is kept as it was.

    The float buffers (level tables, scales) are stored as their int32 bit patterns, so that casting the
    module (`.to(torch.bfloat16)`, `.half()`) leaves the quantized weight as it is."""

    def __init__(self, linear: nn.Linear, block: int = 64, double_quant: bool = True,
                 device: torch.device | str | None = None) -> None:
        """device: where to quantize and keep the codes (default: the layer's own device)."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.block, self.double_quant = block, double_quant
        self.dtype = linear.weight.dtype  # what the layer computed in: LoRA layers are made in it
        weight = linear.weight.detach().to(device) if device is not None else linear.weight.detach()
        state = quantize_nf4(weight, block, double_quant)
        state["pairs"] = _pair_table(_levels(weight.device))
        if double_quant:
            state["scale_levels"] = _dynamic_levels(weight.device)
        for name, value in state.items():
            self.register_buffer(name, value.clone().view(torch.int32) if name in FLOAT_BUFFERS else value,
                                 persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(weight.device).clone(),
                                                                  requires_grad=False)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def weight_numel(self) -> int:
        return self.in_features * self.out_features

    def _state(self) -> list[torch.Tensor | None]:
        """The operator's tensor arguments after x, in its order, the float ones as floats again."""
        get = lambda name: None if getattr(self, name, None) is None else (
            getattr(self, name).view(torch.float32) if name in FLOAT_BUFFERS else getattr(self, name))
        return [get(n) for n in ("codes", "pairs", "absmax", "scale_codes", "scale_absmax", "scale_offset", "scale_levels")]

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        codes, pairs, absmax, scale_codes, scale_absmax, scale_offset, scale_levels = self._state()
        return _decode(codes, pairs, absmax, scale_codes, scale_absmax, scale_offset, scale_levels,
                       self.out_features, self.in_features, self.block, dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the autocast dtype when autocast is on (as nn.Linear would compute), else x's own
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        out = nf4_matmul(x, *self._state(), self.out_features, self.in_features, self.block, False)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear holding the dequantized weight (and the bias), where the codes are."""
        dtype = dtype or self.dtype
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.device, dtype=dtype)
        with torch.no_grad():
            out.weight.copy_(self.dequantized(dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def fingerprint(self) -> str:
        """A digest of the stored codes and scales: a resumed run checks that its base quantized the same."""
        digest = hashlib.blake2b(digest_size=16)
        for t in self._state():
            if t is not None:
                digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 block={self.block}, double_quant={self.double_quant}")


def quantize_linears(module: nn.Module, targets: tuple[str, ...], block: int = 64, double_quant: bool = True,
                     device: torch.device | str | None = None) -> int:
    """Replace every nn.Linear child named in `targets` (recursively) by its NF4Linear, quantized and kept
    on `device` (default: where it is); returns how many target layers are NF4 now (those quantized before
    included: calling it twice changes nothing)."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, (nn.Linear, NF4Linear)) and name in targets:
            if isinstance(child, nn.Linear):
                setattr(module, name, NF4Linear(child, block, double_quant, device))
            count += 1
        else:
            count += quantize_linears(child, targets, block, double_quant, device)
    return count


def nf4_round_trip(weight: torch.Tensor, block: int = 64, double_quant: bool = True) -> torch.Tensor:
    """The float32 weight an NF4Linear of `weight` computes with (quantized, then decoded)."""
    return dequantize_nf4(quantize_nf4(weight.float(), block, double_quant), tuple(weight.shape), block)


def fingerprint(model: nn.Module) -> str:
    """One digest of every NF4 layer's codes and scales (QLoRA's base, which checkpoints do not hold)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, module in model.named_modules():
        if isinstance(module, NF4Linear):
            digest.update(f"{name}:{module.fingerprint()};".encode())
    return digest.hexdigest()


def nf4_bytes_per_weight(block: int = 64, double_quant: bool = True) -> float:
    """Bytes per weight of an NF4 layer: half a byte, plus its share of the absmaxes."""
    if double_quant:
        return 0.5 + 1 / block + 4 / (block * SCALE_BLOCK)
    return 0.5 + 4 / block
