"""Moved to tunelab.runtime (kernels.py, prepare_runtime); kept for the bench scripts."""

from __future__ import annotations

from contextlib import contextmanager

from tunelab.runtime import resolve
from tunelab.runtime.kernels import onednn_linear, onednn_works, prepare_linears, unprepare_linears

__all__ = ["onednn_linear", "onednn_works", "onednn_linears"]


@contextmanager
def onednn_linears(model, enabled: bool = True):
    """Inside, the model's linear layers run on oneDNN (runtime.linear onednn); after, they are
    plain nn.Linear again. New code prepares the model once with runtime.prepare_runtime."""
    if not enabled:
        yield
        return
    prepare_linears(model, resolve("onednn").kernels)
    try:
        yield
    finally:
        unprepare_linears(model)
