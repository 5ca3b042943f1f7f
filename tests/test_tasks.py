"""The task and callback protocols: every task and loop callback provides what the loop uses."""

import ast
from pathlib import Path

import pytest

from tunelab.adapt.freeze import GradualUnfreezing
from tunelab.train.align import AlignTask
from tunelab.train.classify import ClassifyTask
from tunelab.train.image import EMA
from tunelab.train.lm import LMTask
from tunelab.train.loop import Callback
from tunelab.train.tasks import Task

SRC = Path(__file__).resolve().parents[1] / "src" / "tunelab"


def members(protocol) -> set[str]:
    names = {n for n in vars(protocol) if not n.startswith("_")}
    return names | set(getattr(protocol, "__annotations__", {}))


def used_on(path: Path, name: str) -> set[str]:
    """The attributes read from the variable `name` in a module (`task.data` -> "data")."""
    tree = ast.parse(path.read_text())
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == name
    }


@pytest.mark.parametrize("task", [LMTask(), LMTask("chat"), ClassifyTask(), AlignTask()])
def test_every_task_is_a_task(task):
    assert isinstance(task, Task)


def test_a_task_missing_a_method_is_not_a_task():
    class NoFinish:
        objective = None

        def prepare(self, model, tokenizer, cfg):
            return model

        def data(self, cfg, tokenizer, rank=0, world=1):
            return [], None, {}

        def measure(self, model, tokenizer, cfg, val_batches):
            return {}

        def evaluators(self, cfg, tokenizer):
            return []

    assert not isinstance(NoFinish(), Task)
    NoFinish.finish = lambda self, model, tokenizer, cfg, val_batches, run_dir: {}
    assert isinstance(NoFinish(), Task)


def test_run_training_uses_only_what_the_task_protocol_names():
    used = used_on(SRC / "train" / "run.py", "task")
    assert used and used <= members(Task), used - members(Task)


@pytest.mark.parametrize("callback", [GradualUnfreezing, EMA])
def test_every_loop_callback_is_a_callback(callback):
    assert issubclass(callback, Callback)


def test_the_loop_calls_only_the_callback_hooks_or_the_optional_stages():
    optional = {"optimizer_stages", "plan"}  # looked up by name (hasattr), gradual unfreezing's
    used = used_on(SRC / "train" / "loop.py", "cb") | used_on(SRC / "train" / "optim.py", "cb")
    assert members(Callback) <= used, members(Callback) - used
    assert used <= members(Callback) | optional, used - members(Callback) - optional
