"""Sequence classification as a training task: a decoder or an encoder gets a label head,
learns from (text, label) records, and is measured by accuracy and macro-F1."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from torch import nn

from tunelab.errors import ConfigError, DataError
from tunelab.train.config import RunConfig

log = logging.getLogger("tunelab")


def to_classifier(model: nn.Module, labels: list[str], pooling: str | None = None) -> nn.Module:
    """The model's transformer (and BERT pooler) under a new, freshly initialised label head."""
    from tunelab.model.heads import SequenceClassifier

    cfg = model.cfg
    if cfg.labels:  # already a classifier: keep its head when the labels agree
        if list(cfg.labels) != list(labels):
            raise ConfigError(f"the model classifies {cfg.labels}, the data has labels {labels}")
        return model
    pooling = pooling or ("last" if cfg.causal else "cls")
    new = cfg.replace(
        labels=list(labels), pooling=pooling, classifier_dropout=0.0 if cfg.causal else 0.1
    )
    with torch.device("meta"):
        clf = SequenceClassifier(new)
    clf.transformer = model.transformer
    clf.pooler = getattr(model, "pooler", None)
    if pooling == "cls" and clf.pooler is None:
        log.warning("pooling=cls without a trained pooler: the first token's state is used")
    param = next(model.parameters())
    clf.score = nn.Linear(cfg.d_model, len(labels), bias=not cfg.causal).to(param.device)
    nn.init.normal_(clf.score.weight, std=0.02)  # what transformers does for a new head
    if clf.score.bias is not None:
        nn.init.zeros_(clf.score.bias)
    clf.dropout = nn.Dropout(new.classifier_dropout)
    return clf.to(param.dtype)


def load_labeled(cfg: RunConfig):
    """(train records, validation records, label names) from the data section."""
    from tunelab.data import load_split
    from tunelab.data.templates import label_names

    d = cfg.data
    records, train, val = load_split(
        d.path, d.val_path, d.val_fraction, cfg.train.seed, fmt=d.format, text_mode=d.text_mode
    )
    labels = label_names(records, cfg.classify.label_field, cfg.classify.labels)
    seen = {str(r.get(cfg.classify.label_field)) for r in train}
    if len(seen) == 1:
        raise DataError(
            f"{d.path}: every training record has the label {seen.pop()!r} in "
            f"{cfg.classify.label_field!r}; a classifier needs at least two classes"
        )
    return train, val, labels


class ClassifyTask:
    """The classification task for `run_training` (a `Task`: see train/tasks.py)."""

    def __init__(self, records: tuple | None = None):
        self.records = records  # (train, val, labels) given by k-fold; else read from the config
        self.labels: list[str] = []
        self.objective, self.all_val = None, None

    def prepare(self, model, tokenizer, cfg: RunConfig):
        from tunelab.train.objectives import classification

        train, val, labels = self.records or load_labeled(cfg)
        self.train_records, self.val_records, self.labels = train, val, labels
        weights = cfg.classify.class_weights
        if weights and len(weights) != len(labels):
            raise ConfigError(
                f"classify.class_weights has {len(weights)} values for {len(labels)} labels {labels}"
            )
        weight = torch.tensor([float(w) for w in weights]) if weights else None

        def objective(model, batch):
            return classification(model, batch, weight)

        self.objective = objective
        return to_classifier(model, labels, cfg.classify.pooling)

    def _encode(self, records, cfg: RunConfig, tokenizer) -> list[dict]:
        from tunelab.data.templates import encode_classification

        c = cfg.classify
        return encode_classification(
            records,
            tokenizer,
            self.labels,
            text_field=cfg.data.text_field,
            label_field=c.label_field,
            template=c.template,
            seq_len=cfg.train.seq_len,
        )

    def data(self, cfg: RunConfig, tokenizer, rank: int = 0, world: int = 1):
        from tunelab.data import Batches

        train = self._encode(self.train_records, cfg, tokenizer)
        val = self._encode(self.val_records, cfg, tokenizer) if self.val_records else []
        pad = tokenizer.batch_pad_id
        common = dict(pad_id=pad, rank=rank, world_size=world)
        b = cfg.train.batch_size
        train_b = Batches(
            train, b, seed=cfg.train.seed, group_by_length=cfg.data.group_by_length, **common
        )
        val_b = Batches(val, b, shuffle=False, keep_all=True, **common) if val else None
        # finish() scores the whole validation set on every rank (torchrun shards val_b)
        self.all_val = Batches(val, b, shuffle=False, pad_id=pad) if val else None
        counts = {name: sum(e["label"] == i for e in train) for i, name in enumerate(self.labels)}
        stats = {
            "kind": "classification",
            "labels": self.labels,
            "train_examples": len(train),
            "val_examples": len(val),
            "train_label_counts": counts,
        }
        return train_b, val_b, stats

    def measure(self, model, tokenizer, cfg: RunConfig, val_batches) -> dict:
        return {}  # a fresh head knows nothing before training; the baseline is prompting (icl)

    def evaluators(self, cfg: RunConfig, tokenizer) -> list:
        return []  # accuracy comes from the objective's metrics as val_accuracy

    def finish(self, model, tokenizer, cfg: RunConfig, val_batches, run_dir: Path) -> dict:
        """Validation metrics of the final model, and its predictions for error analysis."""
        from tunelab.evaluate.classification import metrics, predict, write_predictions

        if self.all_val is None:
            return {"labels": self.labels}
        gold, probs = predict(model, self.all_val)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            write_predictions(
                run_dir / "predictions.jsonl",
                self.val_records,
                gold,
                probs,
                self.labels,
                cfg.data.text_field,
            )
        return {"labels": self.labels, **metrics(gold, probs.argmax(-1).tolist(), self.labels)}


def run_classify(cfg: RunConfig) -> dict:
    """One classification run, or k of them (cross-validation) with mean and std over folds."""
    from tunelab.train.config import check_options
    from tunelab.train.run import run_training, write_summary

    check_options(cfg)
    if cfg.classify.folds < 2:
        return run_training(cfg, task=ClassifyTask())
    from tunelab.evaluate.classification import summarize_folds

    records = load_labeled(cfg)
    everything = records[0] + records[1]
    k, out = cfg.classify.folds, Path(cfg.out or "runs/classify-cv")
    results = []
    for fold in range(k):
        val = everything[fold::k]
        train = [r for i, r in enumerate(everything) if i % k != fold]
        fold_cfg = copy.deepcopy(cfg)
        fold_cfg.out = str(out / f"fold-{fold}")
        results.append(run_training(fold_cfg, task=ClassifyTask((train, val, records[2]))))
    summary = {
        "task": "classify",
        "folds": k,
        "labels": records[2],
        **summarize_folds(results),
        "runs": [str(out / f"fold-{i}") for i in range(k)],
    }
    out.mkdir(parents=True, exist_ok=True)
    write_summary(out, summary)
    (out / "folds.json").write_text(json.dumps(results, indent=2))
    return summary
