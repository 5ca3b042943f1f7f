"""Linear layers on oneDNN for CPU: training with the weights as they are, decoding prepacked.

PyTorch runs a CPU nn.Linear through MKL's sgemm, which takes a generic code path on AMD CPUs:
on the 2-vCPU AMD EPYC (Zen 5) tunelab is measured on, ~190 GFLOP/s, while oneDNN, which torch
ships for its compiler, reaches ~400-440 GFLOP/s on the same products, and with a few rows
(decoding) its reordered weights stream 1.8-3.4x faster (bench/gemm.py, docs/BENCHMARKS.md).
Results equal F.linear to rounding (sums in another order). The model is untouched: while a
context below is active, each plain nn.Linear gets an instance `forward`, removed on exit.
TUNELAB_ONEDNN=0 turns it off.
"""

from __future__ import annotations

import functools
import os
import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b by oneDNN; w may be a plain (out, in) tensor, a strided view or reordered."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


@functools.cache
def onednn_works(dtype: torch.dtype) -> bool:
    """oneDNN's linear exists in this torch build, runs here and agrees with F.linear."""
    if os.environ.get("TUNELAB_ONEDNN", "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    try:
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        gen = torch.Generator().manual_seed(0)  # not torch's global one: runs stay reproducible
        x, w, g = (torch.randn(*s, generator=gen).to(dtype) for s in ((3, 8), (5, 8), (3, 5)))
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        pairs = [(onednn_linear(x, w, None), F.linear(x, w)),  # and the transposed views backward passes
                 (onednn_linear(g, w.t(), None), g @ w), (onednn_linear(g.t(), x.t(), None), g.t() @ x)]  # fmt: skip
        return all(torch.allclose(a.float(), b.float(), atol=tol) for a, b in pairs)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with all three products (forward, input and weight grads) on oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        # keep only what the gradients asked for need, as F.linear does (a frozen weight: no x)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(x2 if need_w else None, weight if need_x else None)
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
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
        if ctx.needs_input_grad[1]:
            gw = onednn_linear(g.t(), x2.t(), None)  # g^T x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb


def _train_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # autocast, a moved model, or no rows at all (oneDNN has no primitive for an empty product)
    w = self.weight  # fp32 only: a copy made inside the context and cast later keeps this method
    if (
        x.dtype != torch.float32
        or w.dtype != torch.float32
        or x.device.type != "cpu"
        or not x.numel()
    ):
        return F.linear(x, w, self.bias)
    return _OneDNNLinear.apply(x, w, self.bias)


def _plain_linears(model: nn.Module) -> list[nn.Linear]:
    """nn.Linear layers (not subclasses, not already given a forward) on the CPU."""
    return [m for m in model.modules() if type(m) is nn.Linear and "forward" not in vars(m)
            and m.weight.device.type == "cpu"]  # fmt: skip


@contextmanager
def _swapped(linears: list[nn.Linear], make_forward):
    for m in linears:
        m.forward = make_forward(m)  # an instance attribute shadows the class's method
    try:
        yield
    finally:
        for m in linears:
            vars(m).pop("forward", None)


@contextmanager
def onednn_linears(model: nn.Module, enabled: bool = True):
    """Inside, the model's fp32 CPU linear layers train (and evaluate) through oneDNN.

    A bound method, not a closure: a deep copy made inside computes with its own weights."""
    linears = [m for m in _plain_linears(model) if m.weight.dtype == torch.float32]
    if not (enabled and linears and onednn_works(torch.float32)):
        yield
        return
    with _swapped(linears, lambda m: types.MethodType(_train_forward, m)):
        yield


def on_onednn(fn):
    """Decorate fn(model, ...) to run with the model's fp32 CPU linear layers on oneDNN
    (evaluation entry points; inside training the context is already active and this adds none)."""

    @functools.wraps(fn)
    def wrapped(model, *args, **kwargs):
        with onednn_linears(model):
            return fn(model, *args, **kwargs)

    return wrapped


# Sibling layers that read the same input: decoding runs each group as one product.
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@contextmanager
def packed_linears(model: nn.Module, rows: int):
    """Inside, the linear layers (blocks and a plain LM head) decode on reordered weights.

    Decoding reads every weight once per token for a few rows; oneDNN's reordered layout
    streams them ~1.8x faster than F.linear here (fp32 and bf16, one row or eight), and q/k/v
    and gate/up run as one product each (fewer, larger calls: ~10% of a token). The copies
    live for the call (reordering costs about one pass over the weights) and are dropped after;
    the model's own weights never change. Skipped where the copies would not fit in memory.
    """
    linears = _plain_linears(model)
    dtype = linears[0].weight.dtype if linears else None
    size = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    usable = dtype in (torch.float32, torch.bfloat16) and onednn_works(dtype)
    if not usable or 2 * size > free_memory():
        yield
        return
    forwards = {}
    for group in _fusable(model, set(linears)):
        fused = _FusedGroup(group, rows)
        forwards.update({id(m): fused.forward_for(i) for i, m in enumerate(group)})
    with _swapped(linears, lambda m: forwards.get(id(m)) or _packed_forward(m, rows)):
        yield


def _fusable(model: nn.Module, linears: set) -> list[list[nn.Linear]]:
    groups = []
    for parent in model.modules():
        for names in FUSED:
            group = [getattr(parent, n, None) for n in names]
            if (
                all(m in linears for m in group)
                and len({(m.in_features, m.bias is None, m.weight.dtype) for m in group}) == 1
            ):
                groups.append(group)
    return groups


class _FusedGroup:
    """Layers that read the same input as one product: the first call with a new input
    computes every layer's output; each layer then returns its slice for that same input."""

    def __init__(self, group: list[nn.Linear], rows: int):
        w = torch.cat([m.weight.detach() for m in group])
        self.bias = None if group[0].bias is None else torch.cat([m.bias.detach() for m in group])
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
        self.sizes = [m.out_features for m in group]
        self.input, self.outputs, self.unread = None, [], set()

    def forward_for(self, i: int):
        def forward(x: torch.Tensor) -> torch.Tensor:
            if self.input is not x or i not in self.unread:  # identity: the same tensor object
                y = onednn_linear(x.reshape(-1, x.shape[-1]), self.packed, self.bias)
                y = y.view(*x.shape[:-1], -1)
                self.input, self.outputs = x, y.split(self.sizes, dim=-1)
                self.unread = set(range(len(self.sizes)))
            out = self.outputs[i]
            self.unread.discard(i)
            if not self.unread:  # every sibling has its slice: hold no activations
                self.input, self.outputs = None, []
            return out

        return forward


def _packed_forward(m: nn.Linear, rows: int):
    w, b = m.weight.detach(), None if m.bias is None else m.bias.detach()
    packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)

    def forward(x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # 2-D: given (B, T, d) the op costs ~20 us more
        return onednn_linear(x2, packed, b).view(*x.shape[:-1], -1)

    return forward


def free_memory() -> float:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on Linux: assume room
        return float("inf")
