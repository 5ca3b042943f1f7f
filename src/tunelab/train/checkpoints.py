"""A training run's checkpoints on disk: run/checkpoints/step-N/ with the trainable weights
(safetensors), the optimizer state, the RNG states and state.json (step, counters, scheduler,
data position). Each is written to a temporary folder and renamed into place, so a killed run
leaves the last whole checkpoint; the Trainer (loop.py) decides what goes in and when."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from tunelab.errors import TunelabError
from tunelab.model.checkpoint import atomic_dir
from tunelab.model.weights import write_file


class TrainingError(TunelabError):
    """A run that cannot go on: an unusable checkpoint, a loss that is not finite."""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def write_checkpoint(
    run_dir: Path, step: int, weights: dict, optim: dict, state: dict, keep: int
) -> Path:
    """step-N with weights, optimizer state, RNG states and state.json; then only the `keep`
    most recent checkpoints stay (0: all)."""
    target = Path(run_dir) / "checkpoints" / f"step-{step}"
    with atomic_dir(target) as tmp:
        weights = {n: w.contiguous() for n, w in weights.items()}
        write_file(weights, tmp / "trainable.safetensors")
        torch.save(optim, tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        state = dict(state, python_rng=random.getstate()[1], trainable=sorted(weights))
        (tmp / "state.json").write_text(json.dumps(state))
    for _, path in sorted(checkpoints(run_dir))[: -keep or None]:
        shutil.rmtree(path, ignore_errors=True)
    return target


def read_checkpoint(path: Path) -> tuple[dict, dict, dict, dict]:
    """(state, weights, optimizer state, RNG states) of a checkpoint folder; a TrainingError
    naming it when any part is missing or unreadable."""
    try:
        state = json.loads((path / "state.json").read_text())
        weights = load_file(str(path / "trainable.safetensors"))
        optim = torch.load(path / "optimizer.pt", weights_only=True)
        rng = torch.load(path / "rng.pt", weights_only=True)
    except Exception as e:
        raise TrainingError(f"{path}: unusable checkpoint ({e})") from None
    return state, weights, optim, rng


def restore_rng(rng: dict, state: dict) -> None:
    """The torch (and CUDA) and Python RNG states a checkpoint saved."""
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate((3, tuple(state["python_rng"]), None))


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every whole checkpoint of a run, in no order."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    found = []
    for p in root.iterdir():
        if p.name.startswith("step-") and (p / "state.json").exists():
            found.append((int(p.name.split("-")[1]), p))
    return found


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(checkpoints(run_dir))
    return found[-1][1] if found else None
