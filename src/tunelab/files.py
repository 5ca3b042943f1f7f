"""Files written whole or not at all, and YAML read with one-line errors.

Every file tunelab writes that something may read back (summaries, metrics, caches, results)
goes through `atomic_file`: a reader, a resume or a second process never sees half a file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError


def umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temporary_pattern(name: str) -> str:
    """The glob of what `atomic_file` leaves beside `name` when a write is killed."""
    return f".{name}.*.tmp"


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it replaces `path` in one
    rename, on failure it is removed. Its name is unique, so concurrent writers of one cache
    entry never write into each other's file (the last rename wins, whole)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        try:
            os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes it private; it reads like any file
        finally:
            os.close(fd)
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to `path` whole or not at all."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def read_yaml(path: str | Path, what: str = "file") -> Any:
    """The YAML document in `path`. A missing file or invalid YAML is a one-line ConfigError
    naming the file (and the line): "{path}: no such {what}", "{path}:3: invalid YAML (...)"."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a folder, not a {what} (expected a YAML file)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (expected a YAML {what})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or (str(e).strip().splitlines() or ["unreadable"])[0]
        raise ConfigError(f"{path}{where}: invalid YAML ({problem})") from None
