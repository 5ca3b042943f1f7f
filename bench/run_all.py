"""Every benchmark in one sitting on one machine: each section of docs/BENCHMARKS.md re-measured.

    python bench/run_all.py                   # all sections, rewrites docs/BENCHMARKS.md
    python bench/run_all.py --only train dpo  # some sections
    python bench/run_all.py --list            # what would run, and nothing else
    python bench/run_all.py --smoke           # every script's smoke mode, in this one process

The sections run one after another, each script in its own process (and each framework's run in
a process of its own below it), so nothing else of this sitting shares the CPU with them. Every
section records the CPU model and count, torch threads, library versions, the git commit and the
load average before and after; timed rows are medians of >= 3 runs in alternating order, with
the range. A failed section is reported and the others still run; the exit status says whether
all succeeded. Start it on a quiet machine: the load average before each section is printed
and written into the section, and a busy machine is named as such there.

On a quiet 2-core machine the whole sitting takes about 2 to 2.5 hours (training ~60 min,
classification ~30, DPO ~15-30, from scratch ~12, the rest ~10). --smoke takes about a minute
(~35 CPU-seconds).
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import common  # noqa: E402  (bench/common.py)

# (name, script, arguments for the sitting, what it measures); in the order they run
SECTIONS = [
    ("gemm", "gemm.py", ["--runs", "5"], "kernels: F.linear against oneDNN's linear"),
    ("tokenizer", "tokenizer.py", ["--repeats", "3"], "our BPE against tokenizers"),
    ("generate", "generate.py", ["--runs", "3"], "decoding against transformers' generate"),
    ("train", "train.py",
     ["--runs", "3", "--steps", "20", "--precisions", "fp32", "bf16", "--methods", "full",
      "lora-all", "qlora"], "SFT against TRL's SFTTrainer (+ peft)"),
    ("dpo", "dpo.py", ["--runs", "3", "--steps", "8"], "DPO against TRL's DPOTrainer + peft"),
    ("classify", "classify.py", ["--runs", "3", "--examples", "3200", "--write"],
     "IMDB classification against HF Trainer, memory, LoRA, prompting"),
    ("checkpointing", "checkpointing.py", ["--steps", "3"], "activation checkpointing"),
    ("scratch", "scratch.py", ["--write"], "gpt2-tiny from scratch"),
    ("scale", "scale.py", ["--runs", "3"], "model size: GPT-2 large, Gemma-2B, Mistral-7B shapes"),
]  # fmt: skip
# Opt-in (--only scale): it needs `python bench/shapes.py` first (~21 GB of random checkpoints)
# and hours; its smoke mode runs in tests/test_scale_bench.py (slow).
OPT_IN = {"scale"}
NO_WRITE = {"classify": ["--write"], "scratch": ["--write"]}  # write only when asked


def run_section(name: str, script: str, args: list[str], write: bool) -> tuple[int, float]:
    """The script in its own process, its output streamed; (exit status, seconds)."""
    if not write:
        args = [x for x in args if x not in NO_WRITE.get(name, [])]
        if name not in NO_WRITE:
            args = [*args, "--no-write"]
    cmd = [sys.executable, str(BENCH / script), *args]
    env = dict(os.environ)
    src = str(BENCH.parent / "src")  # the tree measured, whatever the venv's install points at
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    print(
        f"\n=== {name}: {' '.join(['python', f'bench/{script}', *args])} "
        f"(load {common.load():.2f}, {time.strftime('%H:%M:%S')})",
        flush=True,
    )
    started = time.time()
    rc = subprocess.run(cmd, env=env, cwd=BENCH.parent).returncode
    return rc, time.time() - started


def drop_stale_note() -> None:
    """Every section re-measured: the header's note about figures from before issue 17 goes."""
    import re

    text = common.DOC.read_text()
    common.DOC.write_text(
        re.sub(r"\*\*Not yet re-measured \(issue 17\)\.\*\*.*?\n\n", "", text, flags=re.S)
    )


def smoke(names: list[str]) -> int:
    """Every chosen script's --smoke in this process (torch and the libraries imported once)."""
    failed = []
    for name, script, _, _ in SECTIONS:
        if name not in names:
            continue
        started = time.time()
        print(f"\n=== smoke {name}", flush=True)
        try:
            module = importlib.import_module(script[:-3])
            module.main(["--smoke"])
        except BaseException as e:  # SystemExit too: a smoke that exits has failed
            if isinstance(e, KeyboardInterrupt):
                raise
            traceback.print_exc()
            failed.append(name)
        print(
            f"=== smoke {name}: {'FAILED' if name in failed else 'ok'} "
            f"({time.time() - started:.1f} s)",
            flush=True,
        )
    print(
        f"\nsmoke: {len(names) - len(failed)} of {len(names)} ok"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [s[0] for s in SECTIONS]
    ap.add_argument(
        "--only",
        nargs="+",
        choices=names,
        help=f"these sections (default: all but the opt-in {', '.join(sorted(OPT_IN))})",
    )
    ap.add_argument("--list", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--smoke", action="store_true", help="each script's smoke mode, in-process")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    a = ap.parse_args(argv)
    a.only = a.only or [n for n in names if n not in OPT_IN]
    if a.smoke:
        a.only = [n for n in a.only if n not in OPT_IN]
        return smoke(a.only)
    chosen = [s for s in SECTIONS if s[0] in a.only]
    if a.list:
        for name, script, args, what in chosen:
            print(f"{name:14} python bench/{script} {' '.join(args)}   # {what}")
        return 0
    cpus = os.cpu_count() or 1
    print(f"Sitting on {common.machine(('transformers', 'trl', 'peft', 'tokenizers'))}")
    print(
        f"Load average {common.load():.2f} on {cpus} CPUs at the start"
        + (
            ": busy; the figures will be slower and noisier than on a quiet machine"
            if common.load() > 0.5 * cpus
            else ""
        ),
        flush=True,
    )
    results = []
    for name, script, args, what in chosen:
        rc, seconds = run_section(name, script, args, not a.no_write)
        results.append((name, rc, seconds, what))
    print("\n=== the sitting")
    for name, rc, seconds, what in results:
        status = "ok" if rc == 0 else f"FAILED (exit {rc})"
        print(f"{name:14} {status:18} {seconds / 60:6.1f} min   {what}")
    failed = [r for r in results if r[1]]
    if not a.no_write and not failed and len(chosen) >= len(SECTIONS) - len(OPT_IN):
        drop_stale_note()
    if not a.no_write:
        print(f"\nsections written to {common.DOC}" + (" (not the failed ones)" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
