"""Preference agreement: how a model scores the chosen and rejected responses of pairs.

Batches hold one row per pair, [prompt, chosen, rejected], scored with the prompt run once
(data/preference.py).
Rewards are DPO's implicit ones, beta * (log pi(y|x) - log pi_ref(y|x)).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from tunelab.data.batching import FILLER
from tunelab.data.preference import pair_logps

METRICS = (
    "reward_accuracy",
    "reward_margin",
    "reward_chosen",
    "reward_rejected",
    "logp_chosen",
    "logp_rejected",
)
TIE = 1e-3  # nats of log-ratio margin below which a pair counts as a tie


def reward_sums(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> dict:
    """Metric sums over the pairs (the loop divides by the pair count).

    A tie counts half: log-ratio margins under TIE nats, which float noise alone makes when the
    policy still equals the reference scored in other batches.
    """
    chosen = (policy_chosen - ref_chosen).detach().float()
    rejected = (policy_rejected - ref_rejected).detach().float()
    tie = (chosen - rejected).abs() < TIE
    wins = ((chosen > rejected) & ~tie).float() + 0.5 * tie.float()
    chosen, rejected = beta * chosen, beta * rejected
    margin = chosen - rejected
    values = (wins, margin, chosen, rejected, policy_chosen.detach(), policy_rejected.detach())
    return {name: v.float().sum() for name, v in zip(METRICS, values)}


@torch.no_grad()
def preference_metrics(
    model,
    batches: Iterable[dict],
    beta: float,
    reference: Callable[[dict], tuple] | None = None,
    max_batches: int | None = None,
) -> dict:
    """Mean reward accuracy, margin, rewards and log-probs over pairs.

    Reference log-probs come from the batches ('ref_chosen', 'ref_rejected') or, when they hold
    none, from reference(batch).
    """
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    sums, n = {}, 0
    try:
        for i, batch in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            pc, pr = pair_logps(model, batch)
            if batch.get(FILLER):  # a rank's turn with nothing left of the set: scored, unused
                continue
            if "ref_chosen" in batch:
                rc, rr = batch["ref_chosen"], batch["ref_rejected"]
            elif reference is not None:
                rc, rr = reference(batch)
            else:
                raise ValueError(
                    "the batches hold no reference log-probs and no reference is given"
                )
            for k, v in reward_sums(pc, pr, rc, rr, beta).items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += len(pc)
    finally:
        model.train(was)
    return {k: v / max(n, 1) for k, v in sums.items()} | {"pairs": n}
