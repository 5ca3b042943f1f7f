"""Preference pairs as batches: one row per pair, [prompt, chosen, rejected], and their scores.

Both responses attend to the one copy of the prompt through a tree-shaped mask, so the prompt
runs once per pair and each response sees exactly what it would see alone. The DPO objective
(train/align.py), the reference log-probs (train/reference.py) and preference agreement
(evaluate/preference.py) all score pairs with `pair_logps`.
"""

from __future__ import annotations

import torch


def collate_pairs(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """One row per pair: [prompt, chosen, rejected] with positions, branch ids and targets."""
    rows = [e["prompt"] + e["chosen"] + e["rejected"] for e in examples]
    b, t = len(rows), max(map(len, rows))
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    pos = torch.zeros(b, t, dtype=torch.long)
    branch = torch.full((b, t), -1, dtype=torch.long)
    select = torch.zeros(b, t, dtype=torch.bool)
    pred_row, pred_pos, pred_target, pred_side = [], [], [], []
    for i, e in enumerate(examples):
        p, c, r = len(e["prompt"]), len(e["chosen"]), len(e["rejected"])
        ids[i, : p + c + r] = torch.tensor(rows[i])
        pos[i, : p + c + r] = torch.cat([torch.arange(p + c), torch.arange(p, p + r)])
        branch[i, : p + c + r] = torch.tensor([0] * p + [1] * c + [2] * r)
        # Response token j is predicted at the position before it; the first at the prompt's end.
        for side, start, n, target in ((0, p, c, e["chosen"]), (1, p + c, r, e["rejected"])):
            at = [p - 1, *range(start, start + n - 1)]
            pred_row += [i] * n
            pred_pos += at
            pred_target += target
            pred_side += [side] * n
            select[i, at] = True
    pred_row, pred_pos = torch.tensor(pred_row), torch.tensor(pred_pos)
    order = select.view(-1).cumsum(0) - 1  # where each selected position lands in the logits
    batch = {
        "input_ids": ids,
        "position_ids": pos,
        "branch": branch,
        "select": select,
        "attention_mask": (branch >= 0).long(),
        "pred_row": pred_row,
        "pred_index": order[pred_row * t + pred_pos],
        "pred_target": torch.tensor(pred_target),
        "pred_side": torch.tensor(pred_side),
        "chosen_tokens": torch.tensor([float(len(e["chosen"])) for e in examples]),
        "rejected_tokens": torch.tensor([float(len(e["rejected"])) for e in examples]),
    }
    if "ref_chosen" in examples[0]:
        batch["ref_chosen"] = torch.tensor([e["ref_chosen"] for e in examples])
        batch["ref_rejected"] = torch.tensor([e["ref_rejected"] for e in examples])
    return batch


def pair_tokens(example: dict) -> int:
    """Tokens of the pair's two sequences, prompt + chosen and prompt + rejected (TRL's count)."""
    return 2 * len(example["prompt"]) + len(example["chosen"]) + len(example["rejected"])


def tree_mask(position_ids: torch.Tensor, branch: torch.Tensor, window: int | None = None):
    """(B, 1, T, T) boolean attention: prompt (branch 0) for all, each response only for itself.

    branch: 0 prompt, 1 chosen, 2 rejected, -1 padding. Positions continue the prompt in both
    responses, so a sliding window counts distance as in the plain sequence.
    """
    t = branch.shape[1]
    index = torch.arange(t, device=branch.device)
    q, k = branch[:, :, None], branch[:, None, :]
    allowed = (index[:, None] >= index[None, :]) & ((k == 0) | (k == q)) & (k >= 0)
    if window is not None:
        allowed = allowed & (position_ids[:, :, None] - position_ids[:, None, :] < window)
    # A padding query that may see nothing would give NaN; let every query see itself.
    return (allowed | torch.eye(t, dtype=torch.bool, device=branch.device))[:, None]


def pair_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs (B,) of the chosen and rejected responses (prompt not counted, EOS is).

    Logits are computed only at positions that predict a response token; the last prompt
    position predicts the first token of both responses.
    """
    core = getattr(model, "module", model)  # a DDP wrapper runs the model it holds
    mask = tree_mask(batch["position_ids"], batch["branch"], core.cfg.sliding_window)
    logits = model(batch["input_ids"], mask, batch["position_ids"], select=batch["select"])
    logp = torch.log_softmax(logits.float(), dim=-1)
    tokens = logp[batch["pred_index"], batch["pred_target"]]
    b = batch["input_ids"].shape[0]
    slot = batch["pred_row"] + b * batch["pred_side"]  # chosen sums in [0, b), rejected in [b, 2b)
    sums = torch.zeros(2 * b, device=tokens.device, dtype=tokens.dtype).index_add(0, slot, tokens)
    return sums[:b], sums[b:]
