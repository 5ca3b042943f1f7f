"""Attention over rows of unequal length packed one after another: N tokens, no padding.

Each row attends within itself (causally or not). Three ways to compute it, one answer:

  rows    one SDPA call per row, a Python loop: fastest on CPU, where a call costs little
  mask    one SDPA call over all N tokens with a block-diagonal mask (causal within a block);
          the mask is N x N booleans
  nested  the rows as a jagged nested tensor (layout=torch.jagged): on CUDA, SDPA runs its
          flash or memory-efficient variable-length kernels, one launch and no mask

`backend_for` picks, in this one place, for `runtime.attention: auto` (runtime/): `rows` on the
CPU and other devices; on CUDA `nested` where this torch runs it for the dtype and head size
(checked once, see nested_works), else `mask`. `runtime.attention` rows|mask|nested chooses
(TUNELAB_VARLEN overrides that key); `nested` still falls back to `mask` where no fused kernel
runs it (on the CPU, always).
"""

from __future__ import annotations

import functools
import itertools
import logging
import os

import torch
import torch.nn.functional as F

from tunelab.errors import ConfigError

BACKENDS = ("rows", "mask", "nested")


def varlen_attention(
    q,
    k,
    v,
    lengths: list[int],
    causal: bool,
    enable_gqa: bool = False,
    offsets: torch.Tensor | None = None,
    backend: str | None = None,
):
    """q (N, H, D) and k, v (N, Hkv, D) hold rows of `lengths` tokens one after another;
    returns (N, H, D), each row attending within itself. enable_gqa: H is a multiple of Hkv.

    offsets: `nested_offsets(lengths)`, made once per forward and given to every layer: a
    nested tensor's ragged size takes its identity from that tensor, and activation
    checkpointing's recompute must meet the same one."""
    if backend in (None, "auto"):
        backend = backend_for(q.device, q.dtype, q.shape[-1], causal)
    if backend == "nested":
        return _nested(q, k, v, lengths, causal, enable_gqa, offsets)
    return (_rows if backend == "rows" else _mask)(q, k, v, lengths, causal, enable_gqa)


def nested_offsets(lengths: list[int], device) -> torch.Tensor:
    """Where each non-empty row starts in the packed order, then the end."""
    return torch.tensor([0, *itertools.accumulate(n for n in lengths if n)], device=device)


def backend_for(
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    causal: bool,
    choice: str | None = "auto",
) -> str:
    """The backend for this device: TUNELAB_VARLEN if set, else `choice` (runtime.attention),
    where auto is nested on CUDA, rows elsewhere; nested becomes mask where it does not run."""
    env = os.environ.get("TUNELAB_VARLEN")
    choice = env or choice or "auto"
    if choice == "auto":
        choice = "nested" if device.type == "cuda" else "rows"
    if choice not in BACKENDS:
        where = f"TUNELAB_VARLEN={choice!r}" if env else f"runtime.attention {choice!r}"
        raise ConfigError(f"{where}: expected one of auto, {', '.join(BACKENDS)}")
    if choice == "nested" and not nested_works(device, dtype, head_dim, causal):
        return "mask"
    return choice


def _gqa(enable_gqa: bool) -> dict:
    return {"enable_gqa": True} if enable_gqa else {}  # older torch has no such argument


def _rows(q, k, v, lengths, causal, enable_gqa) -> torch.Tensor:
    # split, not slices: its backward concatenates the rows' gradients in one copy
    return torch.cat(
        [
            F.scaled_dot_product_attention(
                *(t.transpose(0, 1)[None] for t in row), is_causal=causal, **_gqa(enable_gqa)
            )[0].transpose(0, 1)
            for row in zip(*(t.split(lengths) for t in (q, k, v)))
        ]
    )


def _mask(q, k, v, lengths, causal, enable_gqa) -> torch.Tensor:
    n, device = q.shape[0], q.device
    row = torch.arange(len(lengths), device=device).repeat_interleave(
        torch.tensor(lengths, device=device), output_size=n
    )  # the row of each token
    allowed = row[:, None] == row[None, :]
    if causal:  # rows lie one after another, so within a block the lower triangle is causal
        allowed = allowed.tril()
    y = F.scaled_dot_product_attention(
        *(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=allowed, **_gqa(enable_gqa)
    )
    return y[0].transpose(0, 1)


def _nested(q, k, v, lengths, causal, enable_gqa, offsets=None) -> torch.Tensor:
    if enable_gqa:  # the jagged kernels want as many K/V heads as query heads
        n = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)
    offsets = nested_offsets(lengths, q.device) if offsets is None else offsets
    real = [n for n in lengths if n]  # known here: no device sync to find the extremes
    jagged = dict(offsets=offsets, min_seqlen=min(real), max_seqlen=max(real))
    nested = [
        torch.nested.nested_tensor_from_jagged(t, **jagged).transpose(1, 2) for t in (q, k, v)
    ]
    y = F.scaled_dot_product_attention(*nested, is_causal=causal)  # (B, H, {T}, D)
    return y.transpose(1, 2).values()


@functools.cache
def nested_works(device: torch.device, dtype: torch.dtype, head_dim: int, causal: bool) -> bool:
    """SDPA runs jagged nested tensors here with a fused (flash or memory-efficient) kernel and
    agrees with the rows backend: a tiny case, forward only, drawn from its own generator so
    training's random stream is untouched. torch's math fallback for nested tensors (the CPU's)
    does not count: it has no causal mode, and activation checkpointing cannot save its tensors."""
    if not hasattr(torch.nested, "nested_tensor_from_jagged"):
        return False
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, head_dim, generator=gen).to(device, dtype) for _ in range(3))
    quiet = logging.getLogger("torch.nested._internal.sdpa")  # it logs why each kernel declined
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.no_grad():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                got = _nested(q, k, v, [2, 1], causal, False)
            want = _rows(q, k, v, [2, 1], causal, False)
    except (RuntimeError, NotImplementedError, TypeError, ValueError, ImportError):
        return False
    finally:
        quiet.setLevel(level)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    return torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
