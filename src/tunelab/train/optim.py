"""The optimizer: AdamW over the trainable parameters, weight decay on matrices only."""

from __future__ import annotations

import torch

from tunelab.errors import ConfigError
from tunelab.runtime import fused_adamw
from tunelab.train.config import TrainConfig


def trainable_named(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def fp32_master_weights(model, callbacks=(), everything: bool = False) -> int:
    """Trainable parameters (and those a callback will unfreeze later) kept in fp32, so AdamW's
    small updates are not rounded away in bf16; frozen ones stay in the dtype they were loaded
    in. Returns how many tensors were converted. everything: all floating-point parameters."""
    names = {n for n, p in model.named_parameters() if p.requires_grad or everything}
    for cb in callbacks:
        if hasattr(cb, "plan"):  # gradual unfreezing: its stages name what will train
            names.update(n for stage, _ in cb.plan(model) for n in stage)
    converted = 0
    for name, p in model.named_parameters():
        if name in names and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.to(torch.float32, memory_format=torch.contiguous_format)
            converted += 1
    return converted


def param_groups(
    params: dict[str, torch.nn.Parameter], cfg: TrainConfig, lr_scale: float = 1.0
) -> list:
    """Weight decay on matrices only: biases and norm weights are not decayed."""
    decay = [p for n, p in params.items() if p.dim() >= 2]
    rest = [p for n, p in params.items() if p.dim() < 2]
    groups = [
        dict(params=decay, weight_decay=cfg.weight_decay),
        dict(params=rest, weight_decay=0.0),
    ]
    return [dict(g, lr=cfg.lr * lr_scale) for g in groups if g["params"]]


def stage_groups(model, stages, cfg: TrainConfig) -> list:
    """Optimizer groups for stages of (parameter names, lr factor), e.g. gradual unfreezing's."""
    params = dict(model.named_parameters())
    groups = []
    for names, factor in stages:
        groups += param_groups({n: params[n] for n in names}, cfg, factor)
    return groups


def make_optimizer(model, cfg: TrainConfig, groups: list | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, or over `groups` when a callback supplies them."""
    if groups is None:
        params = trainable_named(model)
        if not params:
            raise ConfigError("no trainable parameters: check the method's freeze settings")
        groups = param_groups(params, cfg)
    fast = {"fused": True} if fused_adamw(groups[0]["params"][0].device) else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), **fast)
