"""Training objectives: `objective(model, batch) -> (loss_sum, count, metrics)`.

Each returns the loss summed over its targets and the number of targets, so the loop can
normalise by the count across all micro-batches (and ranks) of one optimizer step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def right_padded(mask: torch.Tensor | None) -> bool:
    """True when every row is real tokens then padding: causal attention never reaches the pads."""
    return mask is None or bool((mask[:, 1:] <= mask[:, :-1]).all())


def causal_lm(model, batch: dict) -> tuple[torch.Tensor, int, dict]:
    """Next-token cross-entropy over tokens whose label is not -100.

    Logits are computed only at positions that predict a target, and right padding needs no
    attention mask, so padded batches cost what their real tokens cost.
    """
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    select = torch.zeros_like(batch["labels"], dtype=torch.bool)
    select[:, :-1] = keep
    mask = batch.get("attention_mask")
    if batch.get("segment_ids") is None and right_padded(mask):
        mask = None
    logits = model(
        batch["input_ids"],
        attention_mask=mask,
        position_ids=batch.get("position_ids"),
        segment_ids=batch.get("segment_ids"),
        select=select,
    )
    loss = F.cross_entropy(logits.float(), labels[keep], reduction="sum")
    return loss, int(keep.sum()), {}
