"""What a task is (the `Task` protocol `run_training` takes) and task dispatch: the runner for a
config's task (pretrain, finetune, classify, align)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import nn

    from tunelab.data.batching import Batches
    from tunelab.tokenizer.tokenizer import Tokenizer
    from tunelab.train.config import RunConfig

# objective(model, batch) -> (loss summed over the targets, number of targets, metrics)
Objective = Callable[[Any, dict], tuple[Any, Any, dict]]


@runtime_checkable
class Task(Protocol):
    """What a training command plugs into `run_training` (train/run.py), in the order it is used:
    `prepare` the loaded model before the method is applied (a head, checks), build the `data`,
    `measure` before and after training, the `objective` and the `evaluators` the loop runs, and
    `finish` with the summary entries computed on the final model. `LMTask` (train/lm.py),
    `ClassifyTask` (train/classify.py) and `AlignTask` (train/align.py) are the tasks."""

    # an attribute or a method; ClassifyTask sets it in `prepare` (it needs the labels' weights)
    objective: Objective | None

    def prepare(self, model: nn.Module, tokenizer: Tokenizer, cfg: RunConfig) -> nn.Module:
        """The model to train (the same object, or one with a head); the method comes after."""
        ...

    def data(
        self, cfg: RunConfig, tokenizer: Tokenizer, rank: int = 0, world: int = 1
    ) -> tuple[Batches, Batches | None, dict]:
        """(training batches for this rank, validation batches or None, data statistics)."""
        ...

    def measure(self, model: nn.Module, tokenizer: Tokenizer, cfg: RunConfig, val_batches) -> dict:
        """Metrics recorded before and after training: {name: value or {sub-name: value}}."""
        ...

    def evaluators(self, cfg: RunConfig, tokenizer: Tokenizer) -> list[Callable[[Any], dict]]:
        """Functions of the model run at each evaluation, each returning metrics to log."""
        ...

    def finish(
        self, model: nn.Module, tokenizer: Tokenizer, cfg: RunConfig, val_batches, run_dir: Path
    ) -> dict:
        """Top-level summary entries computed on the final model (e.g. accuracy)."""
        ...


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
