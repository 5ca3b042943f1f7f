"""A progress bar for long work: loss, learning rate, tokens/s and ETA, on stderr."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as _RichProgress


class Progress:
    """Wraps rich's progress bar; silent when disabled (other ranks) or when stderr is no terminal."""

    def __init__(self, total: int, enabled: bool = True, start: int = 0, label: str = "train"):
        self.enabled = enabled and sys.stderr.isatty()
        self.bar = _RichProgress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not self.enabled,
        )
        self.task = self.bar.add_task(label, total=total, completed=start, info="")

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        info = f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s"
        self.bar.update(self.task, completed=step, info=info)

    def advance(self, info: str = "") -> None:
        self.bar.update(self.task, advance=1, info=info)
