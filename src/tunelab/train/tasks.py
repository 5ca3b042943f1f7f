"""Task dispatch: the runner for a config's task (pretrain, finetune, classify, align)."""

from __future__ import annotations


def run_task(cfg) -> dict:
    """Run the config's task; every one ends in train/run.py's run_training."""
    if cfg.task == "classify":
        from tunelab.train.classify import run_classify

        return run_classify(cfg)
    from tunelab.train.run import run_training

    if cfg.task == "align":
        from tunelab.train.align import AlignTask

        return run_training(cfg, task=AlignTask())
    return run_training(cfg)
