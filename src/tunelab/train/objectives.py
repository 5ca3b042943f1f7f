"""Training objectives: `objective(model, batch) -> (loss_sum, count, metrics)`.

Each returns the loss summed over its targets and the number of targets, so the loop can
normalise by the count across all micro-batches (and ranks) of one optimizer step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.data.templates import IGNORE


def causal_lm(model, batch: dict) -> tuple[torch.Tensor, int, dict]:
    """Next-token cross-entropy over tokens whose label is not -100.

    Logits are computed only at positions that predict a target, and the transformer skips the
    padding (see Packed), so padded batches cost about what their real tokens cost.
    """
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    select = torch.zeros_like(batch["labels"], dtype=torch.bool)
    select[:, :-1] = keep
    mask = batch.get("attention_mask")
    logits = model(
        batch["input_ids"],
        attention_mask=mask,
        position_ids=batch.get("position_ids"),
        segment_ids=batch.get("segment_ids"),
        select=select,
    )
    loss = F.cross_entropy(logits.float(), labels[keep], reduction="sum")
    return loss, int(keep.sum()), {}


def classification(model, batch: dict, weight: torch.Tensor | None = None):
    """Cross-entropy of the label logits, summed over examples; metrics: correct predictions.

    With class weights each example's loss is scaled by its label's weight (and the loop still
    divides by the example count), so weights shift the balance without changing the scale.
    """
    kw = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
    logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), **kw).float()
    y = batch["label"]
    loss = F.cross_entropy(logits, y, reduction="none")
    if weight is not None:
        loss = loss * weight.to(loss.device)[y]
    correct = (logits.argmax(-1) == y).sum()
    return loss.sum(), len(y), {"accuracy": correct}


# ---- preference losses: per pair, from summed response log-probs (prompt masked, EOS counted) ----


def dpo_loss(
    policy_chosen,
    policy_rejected,
    ref_chosen,
    ref_rejected,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Sigmoid DPO per pair; label_smoothing > 0 gives conservative DPO (cDPO)."""
    logits = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def ipo_loss(
    policy_chosen,
    policy_rejected,
    ref_chosen,
    ref_rejected,
    beta: float = 0.1,
    chosen_tokens=1,
    rejected_tokens=1,
) -> torch.Tensor:
    """IPO per pair: (per-token log-ratio margin - 1/(2 beta))^2, length-normalised as TRL does."""
    chosen = (policy_chosen - ref_chosen) / torch.as_tensor(chosen_tokens).clamp(min=1)
    rejected = (policy_rejected - ref_rejected) / torch.as_tensor(rejected_tokens).clamp(min=1)
    return (chosen - rejected - 1 / (2 * beta)) ** 2


def hinge_loss(
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1
) -> torch.Tensor:
    """SLiC's hinge per pair: relu(1 - beta * log-ratio margin)."""
    return torch.relu(1 - beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)))


PREFERENCE_LOSSES = ("dpo", "ipo", "hinge")


def preference_loss(
    name: str,
    policy_chosen,
    policy_rejected,
    ref_chosen,
    ref_rejected,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_tokens=1,
    rejected_tokens=1,
) -> torch.Tensor:
    """The named loss per pair; only DPO uses label smoothing, only IPO the token counts."""
    logps = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    if name == "dpo":
        return dpo_loss(*logps, beta, label_smoothing)
    if name == "ipo":
        return ipo_loss(*logps, beta, chosen_tokens, rejected_tokens)
    if name == "hinge":
        return hinge_loss(*logps, beta)
    raise ValueError(f"unknown preference loss {name!r}; expected one of {PREFERENCE_LOSSES}")


def denoising(model, batch: dict) -> tuple[torch.Tensor, int, dict]:
    """A diffusion model's noise-prediction error (DDPM): each image noised to a random step,
    the mean squared error of the predicted noise per image, summed over images."""
    x = batch["pixels"]
    noise = torch.randn_like(x)
    t = torch.randint(0, model.train_timesteps, (x.shape[0],), device=x.device)
    predicted = model(model.add_noise(x, noise, t), t, batch["captions"])
    loss = F.mse_loss(predicted.float(), noise, reduction="none").mean(dim=(1, 2, 3))
    return loss.sum(), x.shape[0], {}
