"""A run directory's ownership and hygiene: one run at a time, its own leftovers cleaned.

A run holds an flock on `<run>/.lock` (the file names its pid) while it owns the directory;
the kernel drops the lock when the process dies, so a killed run never blocks the next one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from tunelab.errors import ConfigError
from tunelab.files import atomic_write, temporary_pattern
from tunelab.paths import check_folder_out

LOCK = ".lock"
# What atomic_dir (model/checkpoint.py) and atomic_file leave beside their target when a write
# is killed.
TEMPORARIES = (
    ("checkpoints", ".step-*"),
    (".", ".final.*"),
    (".", ".adapter.*"),
    (".", temporary_pattern("summary.json")),
    (".", temporary_pattern("metrics.jsonl")),
)


def _owner(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"


def _try_lock(fd: int, out: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
            raise
        os.close(fd)
        raise ConfigError(
            f"{out} is in use by a run ({_owner(out / LOCK)}); wait for it to end or choose "
            "another --out"
        ) from None


def check_run_dir(out: Path) -> None:
    """Before any work: out can become a run directory and no running run owns it."""
    check_folder_out(out, "the run")
    lock = out / LOCK
    if lock.exists():  # probe: take and drop the lock
        fd = os.open(lock, os.O_RDONLY)
        _try_lock(fd, out)
        os.close(fd)


@contextmanager
def own_run_dir(out: Path):
    """Create out and hold its lock (pid inside) until the block ends; refuse if held."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    _try_lock(fd, out)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield out
    finally:
        os.close(fd)  # the file stays: removing it would race with a run opening it


def clean_temporaries(out: Path) -> list[Path]:
    """Remove the half-written leftovers of an interrupted run in out; returns what went."""
    gone = []
    for sub, pattern in TEMPORARIES:
        for path in sorted((out / sub).glob(pattern)):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            gone.append(path)
    return gone


def truncate_metrics(out: Path, step: int) -> int:
    """Drop metrics.jsonl records after `step` (a resume replays them); returns how many."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            later = json.loads(line).get("step", 0) > step
        except (ValueError, AttributeError):
            later = True  # a line cut by a kill
        if later:
            dropped += 1
        else:
            keep.append(line + "\n")
    if dropped:
        atomic_write(path, "".join(keep))
    return dropped
