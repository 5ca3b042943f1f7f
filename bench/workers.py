"""Running one framework's worker in its own process, as each framework's own command would run.

tunelab's command starts with glibc set to reuse freed memory (src/tunelab/allocator.py); the
reference libraries run with glibc's defaults, as their users get them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tunelab.allocator import MALLOC_ENV


def spawn(script: str, name: str, a: dict, env: dict | None = None) -> dict:
    """Run `script --worker name` with the job `a` on stdin; its last 'RESULT {json}' line."""
    base = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    if name == "tunelab":
        base.update(MALLOC_ENV)
    proc = subprocess.run([sys.executable, script, "--worker", name], env={**base, **(env or {})},
                          input=json.dumps(a), capture_output=True, text=True)  # fmt: skip
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stderr[-6000:])
        raise SystemExit(f"the {name} worker failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT ") :])
