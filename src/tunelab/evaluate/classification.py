"""Classification metrics and predictions: accuracy, macro-F1, per-class precision/recall and
the confusion matrix, the same for fine-tuned classifiers and for prompting (icl.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tunelab.files import atomic_file


def bootstrap_interval(
    correct: list[int], level: float = 0.95, resamples: int = 1000, seed: int = 0
) -> list[float]:
    """[low, high] of accuracy over `resamples` bootstrap resamples of the examples (seeded)."""
    n = len(correct)
    if not n:
        return [0.0, 0.0]
    hits = torch.tensor(correct, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    means = hits[torch.randint(n, (resamples, n), generator=g)].mean(1)
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail])).tolist()
    return [round(low, 6), round(high, 6)]


def metrics(gold: list[int], predicted: list[int], labels: list[str]) -> dict:
    """Accuracy (with a 95% bootstrap interval), macro-F1, per-class precision/recall/F1/support,
    confusion[gold][pred] and how often each label was predicted (a one-label collapse shows)."""
    k = len(labels)
    confusion = [[0] * k for _ in range(k)]
    for g, p in zip(gold, predicted):
        confusion[g][p] += 1
    per_class, f1s = {}, []
    for i, name in enumerate(labels):
        tp = confusion[i][i]
        predicted_i = sum(confusion[g][i] for g in range(k))
        support = sum(confusion[i])
        precision = tp / predicted_i if predicted_i else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        f1s.append(f1)
    n = len(gold)
    return {
        "accuracy": sum(confusion[i][i] for i in range(k)) / n if n else 0.0,
        "macro_f1": sum(f1s) / k if k else 0.0,
        "per_class": per_class,
        "confusion": confusion,
        "examples": n,
        "accuracy_interval": bootstrap_interval([int(g == p) for g, p in zip(gold, predicted)]),
        "predicted": {
            name: sum(confusion[g][i] for g in range(k)) for i, name in enumerate(labels)
        },
    }


@torch.no_grad()
def predict(model, batches) -> tuple[list[int], torch.Tensor]:
    """(gold labels, probabilities (N, n_labels)) over batches of {"input_ids", "label", ...}."""
    model.eval()
    device = next(model.parameters()).device
    gold, probs = [], []
    for batch in batches:
        kw = (
            {"token_type_ids": batch["token_type_ids"].to(device)}
            if "token_type_ids" in batch
            else {}
        )
        mask = batch.get("attention_mask")
        logits = model(
            batch["input_ids"].to(device),
            attention_mask=None if mask is None else mask.to(device),
            **kw,
        )
        probs.append(logits.float().softmax(-1).cpu())
        gold += batch["label"].tolist()
    return gold, torch.cat(probs) if probs else torch.zeros(0, len(model.cfg.labels))


def write_predictions(
    path: str | Path,
    records: list[dict],
    gold: list[int],
    probs: torch.Tensor,
    labels: list[str],
    text_field: str = "text",
) -> None:
    """One JSON line per example: id, text, gold, predicted, probabilities; for error analysis."""
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        for i, (record, g, p) in enumerate(zip(records, gold, probs.tolist())):
            row = {
                "id": record.get("id", i),
                "text": record.get(text_field),
                "gold": labels[g],
                "predicted": labels[max(range(len(p)), key=p.__getitem__)],
                "probabilities": {name: round(q, 6) for name, q in zip(labels, p)},
            }
            f.write(json.dumps(row) + "\n")


def summarize_folds(results: list[dict]) -> dict:
    """Mean, sample standard deviation and values of accuracy and macro-F1 over folds or seeds."""
    out = {}
    for key in ("accuracy", "macro_f1"):
        values = [r[key] for r in results]
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
        out.update({key: mean, f"{key}_std": var**0.5, f"{key}_values": values})
    return out
