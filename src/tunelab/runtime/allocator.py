"""Keep freed memory in the process instead of giving it back to the system after every step.

glibc serves blocks above its mmap threshold (128 KiB, rising to 32 MiB) with fresh pages from
the kernel and unmaps them on free, so each training step pays a page fault per 4 KiB for every
large tensor it allocates again: the logits' gradient (130 MB for SmolLM2 at batch 4 x 256), the
tied embedding's gradient, activations. On a 2-core CPU that was a fifth of a SmolLM2-135M step
(bench/train.py). PyTorch's CPU tuning guide suggests preloading a caching allocator (jemalloc,
tcmalloc); raising glibc's thresholds gets the same reuse with no extra package. The process then
keeps its peak resident size until it exits. `runtime.allocator: system` (or TUNELAB_MALLOC=0)
leaves glibc's defaults; `auto`, the default, keeps freed memory for models below LARGE
parameters and leaves glibc's defaults from there.

glibc reads its settings when the process starts, so the `tunelab` command, once its arguments
are parsed, starts itself again with them set (`reexec`); a library user calls
`keep_freed_memory()` to get them at run time, which helps less because the heap may no longer
be able to grow in place. Nothing sets them behind a caller's back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# Up to 1 GiB from the heap; the trim threshold keeps the heap from shrinking between steps.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
_done = False


CHOICES = ("auto", "keep", "system")
# From here on a kept heap costs more than the page faults it saves: a Mistral-7B-shaped QLoRA
# step grew past 9.4 GiB with it against 6.2 GiB without (every 117 MB dequantized weight and
# activation came from a fragmenting heap; docs/BENCHMARKS.md "Model size"), while the faults
# it saves are a fifth of a step only where steps are short (SmolLM2-135M).
LARGE = 1_000_000_000


def allocator_choice(configured: str | None = "auto") -> str:
    """auto, keep or system: TUNELAB_MALLOC (0: system, 1: keep) overrides the configured value."""
    env = os.environ.get("TUNELAB_MALLOC")
    if env in ("0", "1"):
        return "system" if env == "0" else "keep"
    return configured or "auto"


def for_model(choice: str, params: int | None) -> str:
    """keep or system for a model of `params` parameters (None: unknown, taken as small)."""
    if choice != "auto":
        return choice
    return "system" if params is not None and params >= LARGE else "keep"


def _applies(configured: str | None = "keep") -> bool:
    return sys.platform.startswith("linux") and allocator_choice(configured) != "system"


def active() -> bool:
    """The settings are in effect in this process (from the environment or a mallopt call)."""
    return _done or all(os.environ.get(k) == v for k, v in MALLOC_ENV.items())


def reexec(argv: list[str], configured: str | None = "keep") -> None:
    """Run `python -m tunelab argv` again with MALLOC_ENV, unless it is already set or the
    allocator is `system`."""
    if not _applies(configured) or all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return
    env = {**os.environ, **MALLOC_ENV}
    try:
        os.execve(sys.executable, [sys.executable, "-m", "tunelab", *argv], env)
    except OSError:  # no interpreter path to restart (embedded Python): run as we are
        keep_freed_memory()


def keep_freed_memory(configured: str | None = "keep") -> bool:
    """The same settings at run time, once per process (an explicit call for library users);
    False where they do not apply."""
    global _done
    if _done or not _applies(configured):
        return _done
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    ok = [
        mallopt(k, int(MALLOC_ENV[e]))
        for k, e in (
            (_M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_"),
            (_M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_"),
        )
    ]
    _done = all(ok)
    return _done
