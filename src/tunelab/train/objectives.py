"""Training objectives: `objective(model, batch) -> (loss_sum, count, metrics)`.

Each returns the loss summed over its targets and the number of targets, so the loop can
normalise by the count across all micro-batches (and ranks) of one optimizer step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_lm(model, batch: dict) -> tuple[torch.Tensor, int, dict]:
    """Next-token cross-entropy over tokens whose label is not -100."""
    logits = model(
        batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        segment_ids=batch.get("segment_ids"),
    )
    labels = batch["labels"][:, 1:]
    if logits.dtype in (
        torch.float16,
        torch.bfloat16,
    ):  # the loss in float32, whatever the autocast
        logits = logits.float()
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    count = int((labels != -100).sum())
    return loss, count, {}
