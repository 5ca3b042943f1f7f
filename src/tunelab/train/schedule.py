"""Learning-rate schedules: linear warmup, then cosine, linear or constant."""

from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR

from tunelab.errors import ConfigError


def lr_factor(step: int, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """The multiplier on the peak learning rate at `step` (0-based) of `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    raise ConfigError(f"train.schedule={kind!r}: expected cosine, linear or constant")


def make_scheduler(optimizer, total: int, warmup: int, kind: str, min_ratio: float) -> LambdaLR:
    lr_factor(0, total, warmup, kind, min_ratio)  # fail early on a bad kind
    return LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, kind, min_ratio))
