"""Output paths checked before any work is done."""

from __future__ import annotations

import os
import re
from pathlib import Path

from tunelab.errors import ConfigError


def nearest_existing(path: Path) -> Path:
    """path itself, or the nearest of its parents that exists: where a new output would go."""
    parent = Path(path)
    while not parent.exists():
        parent = parent.parent
    return parent


def check_folder_out(path: str | Path, what: str, flag: str = "--out", error=ConfigError) -> None:
    """Refuse a folder output that could not be made or written: a file, or a path whose
    nearest existing parent is a file or not writable. `what`: what the folder is for."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise error(f"{flag} {path} is a file; give a folder for {what}")
    parent = nearest_existing(path)
    if not parent.is_dir():
        raise error(f"{flag} {path}: cannot write in {parent} (a file, not a folder)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"{flag} {path}: cannot write in {parent} (permission denied)")


def slug(text) -> str:
    """A name for one folder or file made from free text: the last part of a path or hub id
    ('org/Qwen2.5-0.5B' -> 'Qwen2.5-0.5B'), each run of characters other than letters, digits
    and '.' as one '-', never starting with '.' or '-' and never holding '..' (so it cannot
    climb out of its folder or hide). Empty when nothing is left."""
    text = str(text)
    name = Path(text).name if "/" in text else text
    name = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9.]+", "-", name))
    return name.lstrip("-.").rstrip("-")
