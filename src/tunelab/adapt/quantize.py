"""Frozen base weights in 4-bit NF4 or int8, dequantized on the fly in forward (QLoRA's base).

Our own, in plain torch, rather than a library: torchao's NF4 tensor and bitsandbytes'
Linear4bit both ran forward and backward on CPU here (torch 2.13), but torchao has moved its
NF4 module between releases and bitsandbytes is a 43 MB wheel of CUDA builds; the whole
method is ~150 lines of torch that runs wherever torch runs. The NF4 code table, block size
(64) and nibble order equal bitsandbytes', so the codes are the ones QLoRA's paper describes.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.errors import ConfigError
from tunelab.model.transformer import autocast_dtype
from tunelab.runtime.dequant import BLOCK, dequantize_nf4, kept_buffer, pair_table, release_kept

# The 16 NF4 values (QLoRA paper, appendix E; bitsandbytes' get_4bit_type("nf4")).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
BLOCK2 = 256  # absmax values per second-level scale (double quantization)
# Weights quantized / dequantized at a time (multiples of BLOCK): small enough that a 7B
# model's 58M-weight layers need a few MB of temporaries, not a GB that fragments the heap.
CHUNK = 1 << 18


_PAIRS: dict[torch.device, torch.Tensor] = {}  # the byte-pair table, one per device


def _pairs(code: torch.Tensor) -> torch.Tensor:
    """pair_table(NF4_CODE) on code's device, made once: per call it was 6 small ops, ~2% of a
    GPT-2 large QLoRA step; shared, not a buffer per layer."""
    table = _PAIRS.get(code.device)
    if table is None:
        table = _PAIRS[code.device] = pair_table(code)
    return table


def _blocks(values: torch.Tensor) -> torch.Tensor:
    """float32 (n / BLOCK, BLOCK) rows of values, the last one zero-padded."""
    return F.pad(values.float(), (0, (-values.numel()) % BLOCK)).view(-1, BLOCK)


def scratch(module: QuantLinear, dtype: torch.dtype) -> torch.Tensor:
    """The module's float weight in a buffer every layer shares (one per thread, kept between
    calls: runtime/dequant.kept_buffer). Only for products that keep no reference to W;
    dequantize() gives a tensor of one's own."""
    device, n = module.scales_device(), module.in_features * module.out_features
    buf = kept_buffer("weight", n, dtype, device)
    return module.dequantize_into(buf.view(module.out_features, module.in_features))


def release_scratch() -> None:
    """Drop the shared buffers (after training, before a save that needs the memory)."""
    release_kept()


class _DequantLinear(torch.autograd.Function):
    """x @ W.T whose backward re-dequantizes W instead of keeping a float copy alive."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: QuantLinear) -> torch.Tensor:
        ctx.module, ctx.x_dtype = module, x.dtype
        # Autocast does not cast a Function's inputs: dequantize straight into its dtype, or
        # F.linear would get a float32 weight and cast it again (two extra passes over W).
        dtype = autocast_dtype(x.device.type) or x.dtype
        return F.linear(x.to(dtype), scratch(module, dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (grad @ scratch(ctx.module, grad.dtype)).to(ctx.x_dtype), None


class QuantLinear(nn.Module):
    """A frozen linear layer whose weight is stored quantized; subclasses define dequantize()."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = None
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight (out, in) this module stands for."""
        shape, device = (self.out_features, self.in_features), self.scales_device()
        return self.dequantize_into(torch.empty(shape, dtype=dtype, device=device))

    def dequantize_into(self, out: torch.Tensor) -> torch.Tensor:
        """The float weight written into out ((out, in), any float dtype); returns out."""
        raise NotImplementedError

    def scales_device(self) -> torch.device:
        return next(b for b in self.buffers() if b is not None).device

    def _apply(self, fn, recurse: bool = True):
        # model.to(bfloat16) must move the scales and code table, not round them
        floats = {n: b for n, b in self._buffers.items() if b is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        device = fn(torch.empty(0, device=next(iter(floats.values())).device)).device
        for n, b in floats.items():
            self._buffers[n] = b.to(device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DequantLinear.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def to_linear(self) -> nn.Linear:
        """A plain float nn.Linear with the dequantized weight."""
        w = self.dequantize(torch.float32)
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        out = out.to(w.device)
        with torch.no_grad():
            out.weight.copy_(w)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def storage_bytes(self) -> int:
        """Bytes of the quantized weight and its scales (bias excluded)."""
        skip = self._non_persistent_buffers_set  # the shared code table is not per-layer storage
        return sum(b.numel() * b.element_size() for n, b in self._buffers.items() if n not in skip)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _absmax_int8(values: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes and float32 scales for blocks of `block` values (zero-padded)."""
    pad = (-values.numel()) % block
    v = F.pad(values.float().flatten(), (0, pad)).view(-1, block)
    scale = v.abs().amax(1).clamp(min=1e-12) / 127
    return torch.round(v / scale[:, None]).to(torch.int8), scale


class NF4Linear(QuantLinear):
    """4-bit NormalFloat weights: blockwise absmax (64), two codes per byte, optional double quant.

    Double quantization (QLoRA section 3) stores the per-block absmax as int8 around their mean,
    with one float32 scale per 256 of them: 0.127 instead of 0.5 extra bits per weight.
    """

    dequant_threads: int | None = None  # set by prepare_runtime from the kernel table

    def __init__(self, linear: nn.Linear, double_quant: bool = True):
        super().__init__(linear)
        flat = linear.weight.detach().flatten()
        self.numel, self.double_quant = flat.numel(), double_quant
        self.register_buffer("code", torch.tensor(NF4_CODE, device=flat.device), persistent=False)
        absmax = torch.cat([_blocks(c).abs().amax(1) for c in flat.split(CHUNK)]).clamp(min=1e-12)
        if double_quant:
            self.register_buffer("absmax_offset", absmax.mean().reshape(1))
            q, scale = _absmax_int8(absmax - self.absmax_offset, BLOCK2)
            self.register_buffer("absmax_q", q.flatten()[: absmax.numel()])
            self.register_buffer("absmax_scale", scale)
            absmax = self._absmax()  # pick codes against the scale forward will use
        else:
            self.register_buffer("absmax", absmax)
        mids = (self.code[1:] + self.code[:-1]) / 2
        packed = torch.empty(absmax.numel() * BLOCK // 2, dtype=torch.uint8, device=flat.device)
        for start, chunk in zip(range(0, self.numel, CHUNK), flat.split(CHUNK)):
            blocks = _blocks(chunk)
            first = start // BLOCK
            normed = (blocks / absmax[first : first + len(blocks), None]).clamp(-1, 1).flatten()
            # nearest code: how many midpoints lie below (bucketize's answer, ~2x faster on CPU)
            idx = torch.zeros(normed.shape, dtype=torch.uint8, device=normed.device)
            for m in mids.tolist():
                idx += normed > m
            # bitsandbytes' order: the first weight of each pair in the high nibble
            packed[start // 2 : start // 2 + idx.numel() // 2] = (idx[0::2] << 4) | idx[1::2]
        self.register_buffer("packed", packed)

    def _absmax(self) -> torch.Tensor:
        if not self.double_quant:
            return self.absmax.float()
        n = self.absmax_q.numel()
        q = F.pad(self.absmax_q.float(), (0, (-n) % BLOCK2)).view(-1, BLOCK2)
        return (q * self.absmax_scale.float()[:, None]).flatten()[:n] + self.absmax_offset.float()

    def codes(self) -> torch.Tensor:
        """The 4-bit code (0..15) of every weight, padding included, as int64."""
        return torch.stack((self.packed >> 4, self.packed & 15), -1).flatten().long()

    def dequantize_into(self, out: torch.Tensor) -> torch.Tensor:
        return self.dequantize_rows(0, out)

    def dequantize_rows(
        self, start: int, out: torch.Tensor, threads: int | None = None
    ) -> torch.Tensor:
        """The float weight's rows from `start`, as many as out holds, written into out (any
        float dtype), with `threads` (default: the runtime's choice, dequant_threads)."""
        table, first = _pairs(self.code), start * self.in_features
        threads = threads or self.dequant_threads
        return dequantize_nf4(self.packed, self._absmax(), table, first, out, threads)


class Int8Linear(QuantLinear):
    """int8 weights with one float32 absmax scale per output row."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        w = linear.weight.detach().float()
        scale = w.abs().amax(1).clamp(min=1e-12) / 127
        self.register_buffer("qweight", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale)

    def dequantize_into(self, out: torch.Tensor) -> torch.Tensor:
        return torch.mul(self.qweight, self.scale.float()[:, None], out=out)


BITS = ("nf4", "int8")


def quantizer(bits: str = "nf4", double_quant: bool = True, skip: tuple[str, ...] = ("lm_head",)):
    """A function (name, linear) -> its quantized form (or the linear, when skipped): what
    quantize() applies to a loaded model, and what loading applies to each layer as it is read."""
    if bits not in BITS:
        raise ConfigError(f"quantization bits {bits!r}: expected one of {', '.join(BITS)}")

    def apply(name: str, linear: nn.Module) -> nn.Module:
        if not isinstance(linear, nn.Linear) or any(re.search(s, name) for s in skip):
            return linear
        if name.endswith((".lora_A", ".lora_B")):  # a LoRA base may be quantized, LoRA never
            return linear
        return NF4Linear(linear, double_quant) if bits == "nf4" else Int8Linear(linear)

    return apply


def quantize(
    model: nn.Module,
    bits: str = "nf4",
    double_quant: bool = True,
    skip: tuple[str, ...] = ("lm_head",),
) -> nn.Module:
    """Replace the blocks' nn.Linear layers by frozen NF4 or int8 ones, in place; returns model."""
    apply, layers = quantizer(bits, double_quant, skip), model.transformer.layers
    for name, module in list(layers.named_modules()):
        q = apply(f"transformer.layers.{name}", module)
        if q is not module:
            parent, _, leaf = name.rpartition(".")
            setattr(layers.get_submodule(parent) if parent else layers, leaf, q)
    return model


def storage_bytes(model: nn.Module) -> int:
    """Bytes held by the quantized weights of a model (for reports and the memory estimate)."""
    return sum(m.storage_bytes() for m in model.modules() if isinstance(m, QuantLinear))
