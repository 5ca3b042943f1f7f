"""Linear layers on oneDNN for CPU: a `FastLinear` module that holds its kernel choice.

PyTorch runs a CPU nn.Linear through MKL's sgemm, which takes a generic code path on AMD CPUs:
on the 2-vCPU AMD EPYC (Zen 5) tunelab is measured on, ~190 GFLOP/s, while oneDNN, which torch
ships for its compiler, reaches ~400-440 GFLOP/s on the same products, and with a few rows
(decoding) its reordered weights stream 1.8-3.4x faster (bench/gemm.py, docs/BENCHMARKS.md).
On an Intel Xeon with AMX the same path decodes slower than torch's own: which kernel runs is
measured per machine (runtime/choose.py) and chosen per layer when the model is prepared
(`prepare_linears`, called by runtime.prepare_runtime). Results equal F.linear to rounding.
"""

from __future__ import annotations

import functools
import os
import weakref
from collections.abc import Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from tunelab.model.transformer import autocast_dtype

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
# Sibling layers that read the same input: decoding may run each group as one product.
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b by oneDNN; w may be a plain (out, in) tensor, a strided view or reordered."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def reorder(w: torch.Tensor, rows: int) -> torch.Tensor:
    """w in oneDNN's blocked layout for products with `rows` rows (decoding)."""
    return torch.ops.mkldnn._reorder_linear_weight(w, rows)


@functools.cache
def onednn_works(dtype: torch.dtype) -> bool:
    """Every private op used here (the linear, its transposed views for backward, the weight
    reorder) exists in this torch build, runs here and agrees with F.linear."""
    if dtype not in DTYPE_NAMES or not torch.backends.mkldnn.is_available():
        return False
    try:
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        gen = torch.Generator().manual_seed(0)  # not torch's global one: runs stay reproducible
        x, w, g, b = (
            torch.randn(*s, generator=gen).to(dtype) for s in ((3, 8), (5, 8), (3, 5), (5,))
        )
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        pairs = [
            (onednn_linear(x, w, None), F.linear(x, w)),  # and the transposed views backward passes
            (onednn_linear(g, w.t(), None), g @ w),
            (onednn_linear(g.t(), x.t(), None), g.t() @ x),
            (onednn_linear(x, reorder(w, 3), b), F.linear(x, w, b)),
        ]
        return all(torch.allclose(a.float(), b.float(), atol=tol) for a, b in pairs)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with the forward and input-grad products on oneDNN, and the weight grad on
    oneDNN too or (onednn_wgrad False) on torch's mm: on 2 EPYC vCPUs oneDNN ran the first two
    1.06-1.16x faster than torch and the weight grad 0.81-1.01x as fast (bench/gemm.py)."""

    @staticmethod
    def forward(ctx, x, weight, bias, onednn_wgrad=True):
        x2 = x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        # keep only what the gradients asked for need, as F.linear does (a frozen weight: no x)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(x2 if need_w else None, weight if need_x else None)
        ctx.x_shape, ctx.has_bias, ctx.onednn_wgrad = x.shape, bias is not None, onednn_wgrad
        return onednn_linear(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable  # a second derivative raises instead of coming out wrong
    def backward(ctx, grad):
        x2, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        if not g.is_contiguous():  # e.g. an expanded gradient (stride 0) from a sum
            g = g.contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = onednn_linear(g, weight.t(), None).view(ctx.x_shape)  # g W: W^T as the "weight"
        if ctx.needs_input_grad[1]:  # g^T x
            gw = onednn_linear(g.t(), x2.t(), None) if ctx.onednn_wgrad else g.t().mm(x2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb, None


# Training kernels on oneDNN: all three products, or the weight grad on torch's mm
TRAIN_ONEDNN = ("onednn", "onednn+mm")
ONE_ROW = "/1"  # suffix of the decode classes chosen for 1-row decoding (runtime/choose.py)


class FastLinear(nn.Linear):
    """An nn.Linear whose product runs on the kernel chosen for it when the model was prepared.

    `choice` maps a shape class to a kernel: "train-fp32" / "train-bf16" (every forward and
    backward outside decoding: "torch", "onednn" or "onednn+mm") and "decode-fp32" /
    "decode-bf16" (inside `decoding`: "torch", "onednn", "onednn+fused", "packed" or
    "packed+fused"). The parameters are the ones of the nn.Linear it replaces, under the same
    names. `decoder` is set only inside `decoding`;
    copies and pickles leave it out, so a copy always computes with its own weights."""

    choice: dict
    decoder = None

    @classmethod
    def of(cls, linear: nn.Linear, choice: Mapping[str, str]) -> FastLinear:
        """A FastLinear holding linear's parameters, hooks and mode (linear itself is unchanged)."""
        new = cls.__new__(cls)
        new.__dict__.update(
            {k: v.copy() if isinstance(v, dict) else v for k, v in vars(linear).items()}
        )
        new.choice = dict(choice)
        return new

    def __getstate__(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "decoder"}

    def kernel(self, dtype: torch.dtype, phase: str = "train", rows: int = 0) -> str:
        """The kernel for this dtype and phase; decoding one row has its own ("decode-fp32/1"),
        tables from before it exist fall back to the class's."""
        cls = f"{phase}-{DTYPE_NAMES.get(dtype, '')}"
        if phase == "decode" and rows == 1 and cls + ONE_ROW in self.choice:
            return self.choice[cls + ONE_ROW]
        return self.choice.get(cls, "torch")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if self.decoder is not None and not torch.is_grad_enabled():
            return self.decoder(x)
        if x.device.type != "cpu" or not x.numel():  # oneDNN has no primitive for no rows
            return F.linear(x, w, b)
        if (dtype := autocast_dtype("cpu")) is not None:  # as F.linear would compute
            kernel = self.kernel(dtype)
            if not x.is_floating_point() or kernel not in TRAIN_ONEDNN:
                return F.linear(x, w, b)
            with torch.autocast("cpu", enabled=False):
                b = None if b is None else b.to(dtype)
                return _OneDNNLinear.apply(x.to(dtype), w.to(dtype), b, kernel == "onednn")
        kernel = self.kernel(x.dtype)
        if x.dtype != w.dtype or kernel not in TRAIN_ONEDNN:
            return F.linear(x, w, b)
        return _OneDNNLinear.apply(x, w, b, kernel == "onednn")


def _replace(model: nn.Module, make) -> None:
    """Each child `m` of every module becomes make(m) (shared children stay shared)."""
    made: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) not in made:
                made[id(child)] = make(child)
            if child is not None:
                parent._modules[name] = made[id(child)]


def prepare_linears(model: nn.Module, choice: Mapping[str, str]) -> int:
    """Every plain nn.Linear of the model becomes a FastLinear with `choice`; FastLinears get
    the new choice. Layers given their own forward by someone else are left as they are.
    Returns how many layers hold the choice."""

    def make(m: nn.Module) -> nn.Module:
        if type(m) is nn.Linear and "forward" not in vars(m):
            return FastLinear.of(m, choice)
        if isinstance(m, FastLinear):
            m.choice = dict(choice)
        return m

    if type(model) is nn.Linear:
        raise TypeError("prepare a model that holds linear layers, not a bare nn.Linear")
    _replace(model, make)
    return sum(isinstance(m, FastLinear) for m in model.modules())


def unprepare_linears(model: nn.Module) -> None:
    """Every FastLinear becomes a plain nn.Linear again, with the same parameters."""

    def make(m: nn.Module) -> nn.Module:
        if not isinstance(m, FastLinear):
            return m
        plain = nn.Linear.__new__(nn.Linear)
        state = m.__getstate__()
        state.pop("choice", None)
        plain.__dict__.update({k: v.copy() if isinstance(v, dict) else v for k, v in state.items()})
        return plain

    _replace(model, make)


def decode_kernel(m: nn.Module) -> str:
    """What m computes with right now while decoding: torch, onednn, onednn+fused, packed,
    packed+fused, or other (a module that is no linear of ours: LoRA, quantized)."""
    if type(m) is nn.Linear and "forward" not in vars(m):
        return "torch"
    if not isinstance(m, FastLinear):
        return "other"
    return getattr(m.decoder, "name", "torch")


# ---- decoding: reordered copies of the weights, siblings as one product -------------------


class _Plain:
    name = "onednn"

    def __init__(self, m: nn.Linear, rows: int):
        self.w, self.b = m.weight.detach(), None if m.bias is None else m.bias.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # 2-D: given (B, T, d) the op costs ~20 us more
        return onednn_linear(x2.contiguous(), self.w, self.b).view(*x.shape[:-1], -1)


class _Packed(_Plain):
    name = "packed"

    def __init__(self, m: nn.Linear, rows: int):
        super().__init__(m, rows)
        self.w = reorder(self.w.contiguous(), rows)  # a loaded GPT-2 weight may be a view


class _Torch:
    name = "torch"

    def __init__(self, m: nn.Linear, rows: int):
        self.w, self.b = m.weight.detach(), None if m.bias is None else m.bias.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w, self.b)


DECODERS = {"torch": _Torch, "onednn": _Plain, "packed": _Packed}
FUSED_KINDS = ("packed+fused", "onednn+fused")  # siblings as one product, reordered or not


class _Fused:
    """Layers that read the same input as one product on reordered weights: the first call
    with an input computes every layer's output; each sibling then takes its slice if it is
    given that same input, unchanged. The input is known by a weak reference (no activation
    is held) plus its data pointer, shape, strides and version (an in-place change recomputes)."""

    def __init__(self, group: list[nn.Linear], rows: int, kind: str = "packed+fused"):
        w = torch.cat([m.weight.detach() for m in group])
        self.bias = None if group[0].bias is None else torch.cat([m.bias.detach() for m in group])
        self.kind = kind
        # "onednn+fused": the joined weights as they are. Each oneDNN call costs ~15 us before
        # any arithmetic (3 us for F.linear): one call for q/k/v and one for gate/up instead
        # of five saves ~1.4 ms of SmolLM2's ~40 ms fp32 token.
        self.joined = reorder(w, rows) if kind == "packed+fused" else w
        self.sizes = [m.out_features for m in group]
        self.ref, self.meta, self.outputs, self.unread = None, None, [], set()

    def slot(self, i: int):
        fused = self

        class Slot:
            name = fused.kind

            def __call__(self, x: torch.Tensor) -> torch.Tensor:
                return fused.output(i, x)

        return Slot()

    def output(self, i: int, x: torch.Tensor) -> torch.Tensor:
        meta = (x.data_ptr(), x.shape, x.stride(), None if x.is_inference() else x._version)
        same = self.ref is not None and self.ref() is x and self.meta == meta
        if not same or i not in self.unread:
            x2 = x.reshape(-1, x.shape[-1]).contiguous()
            y = onednn_linear(x2, self.joined, self.bias).view(*x.shape[:-1], -1)
            self.ref, self.meta = weakref.ref(x), meta
            self.outputs, self.unread = y.split(self.sizes, dim=-1), set(range(len(self.sizes)))
        out = self.outputs[i]
        self.unread.discard(i)
        if not self.unread:  # every sibling has its slice: hold no activations
            self.ref, self.meta, self.outputs = None, None, []
        return out


def _fusable(model: nn.Module, chosen: set) -> list[list[FastLinear]]:
    groups = []
    for parent in model.modules():
        for names in FUSED:
            group = [getattr(parent, n, None) for n in names]
            if (
                all(id(m) in chosen for m in group)
                and len({(m.in_features, m.bias is None, m.weight.dtype) for m in group}) == 1
            ):
                groups.append(group)
    return groups


@contextmanager
def decoding(model: nn.Module, rows: int):
    """Inside, each FastLinear decodes on the kernel chosen for decoding: reordered weight
    copies ("packed"; q/k/v and gate/up as one product each with "packed+fused"), oneDNN on
    the weights as they are ("onednn"; siblings joined into one copy with "onednn+fused"), or
    torch's F.linear. The copies live for the call (reordering costs about one pass over the
    weights) and are dropped after; the model's own weights never change. Packing is skipped
    where the copies would not fit in memory. Nested inside another `decoding` (many generate
    calls under one: IFEval's batches), the outer copies serve: reordering them again cost
    150 ms a call for SmolLM2, 10 s of an IFEval run."""
    linears = [
        m for m in model.modules() if isinstance(m, FastLinear) and m.weight.device.type == "cpu"
    ]
    if any(m.decoder is not None for m in linears):  # an outer decoding holds them
        yield
        return
    kinds = {}
    for m in linears:
        kind = m.kernel(m.weight.dtype, "decode", rows)
        kinds[id(m)] = kind if kind == "torch" or onednn_works(m.weight.dtype) else "torch"
    copies = [m for m in linears if kinds[id(m)] in ("packed", *FUSED_KINDS)]
    if 2 * sum(m.weight.numel() * m.weight.element_size() for m in copies) > free_memory():
        kinds.update({id(m): "torch" for m in copies})  # no room for the reordered copies
    fused = {id(m) for m in linears if kinds[id(m)] in FUSED_KINDS}
    try:
        for group in _fusable(model, fused):
            shared = _Fused(group, rows, kinds[id(group[0])])
            for i, m in enumerate(group):
                m.decoder = shared.slot(i)
        for m in linears:
            if m.decoder is None:
                m.decoder = DECODERS[kinds[id(m)].removesuffix("+fused")](m, rows)
        yield
    finally:
        for m in linears:
            vars(m).pop("decoder", None)


def free_memory() -> float:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on Linux: assume room
        return float("inf")
