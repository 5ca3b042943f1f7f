"""Output paths checked before any work is done."""

from __future__ import annotations

from pathlib import Path


def nearest_existing(path: Path) -> Path:
    """path itself, or the nearest of its parents that exists: where a new output would go."""
    parent = Path(path)
    while not parent.exists():
        parent = parent.parent
    return parent
