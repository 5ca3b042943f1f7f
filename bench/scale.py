"""Model size: loading and training GPT-2 large, Gemma-2B and Mistral-7B shapes, tunelab against
transformers + peft on the same checkpoints and the same batches.

    python bench/shapes.py                      # once: the random-weight checkpoints (~21 GB)
    python bench/scale.py [--shapes gpt2-large gemma-2b mistral-7b]
                          [--methods load nf4 full lora qlora] [--steps 5] [--warmup 1] [--runs 1]
                          [--bnb-path DIR] [--max-rss-gb N] [--no-write]
    python bench/scale.py --smoke               # scaled-down shapes, 2 steps, both sides

Rows (every measurement in a fresh process, the two sides alternating run by run; what runs
inside the processes is in bench/scale_workers.py):
- load / nf4: in-process load of the bf16 checkpoint, timed around the call: tunelab.load(dir,
  precision="bf16"[, quantize="nf4"]) against AutoModelForCausalLM.from_pretrained(dir,
  dtype=bfloat16, low_cpu_mem_usage=True[, bitsandbytes NF4 with double quantization]). Each
  worker reads its own RSS before and after and its high-water mark (VmHWM) after loading.
- full / lora / qlora: tunelab through its command (`python -m tunelab finetune ... --precision
  bf16 --autocast bf16`: frozen weights stored in bf16, trainable ones with fp32 master copies),
  against a worker that loads the same directory with transformers, wraps it with peft's
  LoraConfig (r 16, alpha 32, dropout 0, all linear layers of the blocks) and trains on the
  batches tunelab's own data pipeline makes from the same file and seed (checked: the same
  tokens per step). Both: sequence length 256, batch 1, AdamW (fused, no weight decay) at a
  constant learning rate, clipping at 1.0, no evaluation, no gradient checkpointing, bf16
  autocast. The reference's full run loads the checkpoint as fp32 (its weights are the fp32
  masters), its LoRA a bf16 base with peft's fp32 adapters, its QLoRA a bitsandbytes NF4 base
  (double quantization); without bitsandbytes that row is LoRA on a bf16 base, and says so.
  This script polls each child's /proc status every 5 ms: the load-phase peak is its VmHWM
  when the model is ready (tunelab: the parameter report its command logs; the reference: its
  'ready' line), the training peak its VmHWM when the last step is recorded, the command peak
  its ru_maxrss at exit (tunelab's command also writes a checkpoint and the final model).
  Seconds per step: the median over the steps after --warmup.
Results go to the '## Model size' section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # bench/, beside this script: the one section writer and commit line
import shapes
from scale_tables import load_table, train_table
from scale_workers import LORA, SHORT, status_mb

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "instructions" / "instruction-data.json"
DOC = common.DOC
SHAPES = list(shapes.CONFIGS)
LOAD_METHODS, TRAIN_METHODS = ("load", "nf4"), ("full", "lora", "qlora")
TRAIN = dict(seq_len=256, batch=1, lr=1e-4, seed=0)
WORKERS = str(Path(__file__).with_name("scale_workers.py"))
# The parameter report tunelab's command logs once the model is loaded and adapted
READY = re.compile(r"^trainable \S+ of \S+ parameters", re.M)


# -- the parent: children watched from outside ------------------------------------------------------
def watched(cmd: list[str], env: dict, logs: Path, events, limit_mb: float) -> dict:
    """Run cmd, polling its /proc status; events(stdout, stderr) names the events seen so far,
    and each gets the child's VmHWM when first seen. Stops the child above limit_mb resident."""
    out, err = logs / "stdout", logs / "stderr"
    with open(out, "w") as fo, open(err, "w") as fe:
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, start_new_session=True)
    t0, marks, killed, last = time.perf_counter(), {}, None, {}
    while True:
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)
        s = status_mb(p.pid) if not pid else {}
        last = s or last
        for name in events(out.read_text(), err.read_text()) if not pid else []:
            if name not in marks and s:
                marks[name] = dict(t=time.perf_counter() - t0, hwm_mb=s["VmHWM"])
        if s and s["VmRSS"] > limit_mb and not killed:
            killed = s["VmRSS"]
            os.killpg(p.pid, signal.SIGKILL)
        if pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            break
        time.sleep(0.005)
    return dict(
        rc=p.returncode,
        marks=marks,
        killed_at_mb=killed,
        stdout=out.read_text(),
        stderr=err.read_text(),
        process_peak_mb=max(usage.ru_maxrss / 1024, last.get("VmHWM", 0)),
    )


def child_env() -> dict:
    """glibc's defaults (tunelab's command sets its own), offline, this checkout's tunelab."""
    from tunelab.allocator import MALLOC_ENV

    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).strip(":")
    return env


def _failed(r: dict) -> str | None:
    if r["killed_at_mb"]:
        return f"stopped at {r['killed_at_mb'] / 1024:.1f} GiB resident (--max-rss-gb)"
    if r["rc"]:
        tail = (r["stderr"].strip().splitlines() or ["?"])[-1][:160]
        return f"exit {r['rc']}: {tail}"
    return None


def measure_load(side: str, method: str, job: dict, logs: Path, limit: float) -> dict:
    job = dict(job, side=side, method=method)
    cmd = [sys.executable, WORKERS, "load", json.dumps(job)]
    r = watched(cmd, child_env(), logs, lambda o, e: (), limit)
    found = [json.loads(x[7:]) for x in r["stdout"].splitlines() if x.startswith("RESULT ")]
    return (
        dict(found[-1], process_peak_mb=r["process_peak_mb"])
        if found
        else {"failed": _failed(r) or "no result"}
    )


def measure_train(side: str, method: str, job: dict, logs: Path, limit: float) -> dict:
    job = dict(job, method=method)
    if side == "tunelab":
        run = logs / "run"
        opts = {"name": method, **({"targets": "all-linear", **LORA} if method != "full" else {})}
        cmd = [
            sys.executable,
            "-m",
            "tunelab",
            "finetune",
            "--model",
            job["model"],
            "--data",
            job["data"],
            "--precision",
            "bf16",
            "--autocast",
            "bf16",
            "--seq-len",
            str(job["seq_len"]),
            "--batch-size",
            str(job["batch"]),
            "--max-steps",
            str(job["steps"]),
            "--lr",
            str(job["lr"]),
            "--seed",
            str(job["seed"]),
            "--out",
            str(run),
            "--data.val_fraction",
            "0",
            "--train.schedule",
            "constant",
            "--train.warmup_steps",
            "0",
            "--train.clip",
            "1.0",
            "--train.weight_decay",
            "0",
            "--train.device",
            "cpu",
            "--train.log_every",
            "1",
            *[x for k, v in opts.items() for x in (f"--method.{k}", str(v))],
        ]

        def events(out, err):
            metrics = run / "metrics.jsonl"
            n = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            return (["ready"] if READY.search(err) else []) + [f"step{i}" for i in range(1, n + 1)]
    else:
        cmd = [sys.executable, WORKERS, "train", json.dumps(job)]

        def events(out, err):
            found = [json.loads(x[6:]) for x in out.splitlines() if x.startswith("EVENT ")]
            return [e["kind"] + (str(e["step"]) if e["kind"] == "step" else "") for e in found]

    r = watched(cmd, child_env(), logs, events, limit)
    m, last = r["marks"], f"step{job['steps']}"
    if last not in m or "ready" not in m:
        return {"failed": _failed(r) or "no 'ready' or last-step record"}
    # A command that fails after its last step (e.g. writing the final model) keeps its figures.
    after = f"after training: {_failed(r)}" if _failed(r) else None
    out = dict(
        ready_s=m["ready"]["t"],
        load_peak_mb=m["ready"]["hwm_mb"],
        train_peak_mb=m[last]["hwm_mb"],
        after=after,
        process_peak_mb=r["killed_at_mb"] or r["process_peak_mb"],
    )
    if side == "tunelab":
        steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        times = [0.0] + [s["time"] for s in steps]
        out.update(
            step_s=[b - a for a, b in zip(times, times[1:])],
            tokens=[s["tokens_step"] for s in steps],
            losses=[s["loss"] for s in steps],
            storage="?",
            trainable=READY.search(r["stderr"])[0].split()[1],
        )
        if (run / "summary.json").exists():
            summary = json.loads((run / "summary.json").read_text())
            by = summary["params"]["by_dtype"]
            kinds = [
                {SHORT.get(k, k) for k, v in by.items() if v["params"] > v["trainable_params"]},
                {SHORT.get(k, k) for k, v in by.items() if v["trainable_params"]},
            ]
            out.update(
                storage=" / ".join("+".join(sorted(k)) or "–" for k in kinds),
                trainable=summary["trainable_params"],
                summary_peak_mb=summary["peak_memory_mb"],
            )
    else:
        found = [json.loads(x[6:]) for x in r["stdout"].splitlines() if x.startswith("EVENT ")]
        steps = [e for e in found if e["kind"] == "step"]
        out.update(
            step_s=[s["seconds"] for s in steps],
            tokens=[s["tokens"] for s in steps],
            losses=[s["loss"] for s in steps],
            trainable=found[0]["trainable"],
            storage=found[0]["storage"],
            threads=steps[-1]["threads"],
        )
    return out


def full_mb(name: str, scale: bool) -> float:
    """Full fine-tuning's state: bf16 weights with fp32 master copies, fp32 gradients and two
    AdamW moments, 18 bytes a parameter (the reference's fp32 weights: 16), and 1 GiB besides."""
    return shapes.n_params(name, scale) * 18 / 2**20 + 1024


def machine(threads) -> str:
    cpu = common.cpu_model()
    versions = []
    for pkg in ("torch", "transformers", "peft"):
        versions.append(f"{pkg} {md.version(pkg)}")
    return (
        f"{len(os.sched_getaffinity(0))} CPUs ({cpu}), {threads} torch threads, "
        f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB RAM; "
        + ", ".join(versions)
    )


def bnb_version(path: str | None) -> str:
    found = [
        d.version
        for d in md.distributions(path=[path] if path else sys.path)
        if d.metadata["Name"] == "bitsandbytes"
    ]
    return f"bitsandbytes {found[0]}" if found else "no bitsandbytes"


def available_mb() -> float:
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M)[1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=SHAPES, choices=SHAPES)
    ap.add_argument(
        "--methods",
        nargs="+",
        default=[*LOAD_METHODS, *TRAIN_METHODS],
        choices=[*LOAD_METHODS, *TRAIN_METHODS],
        help="load / nf4: loading alone (bf16 / NF4); full, lora, qlora: training",
    )
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per training run")
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of s/step")
    ap.add_argument("--runs", type=int, default=1, help="runs per side (medians, min–max)")
    ap.add_argument("--smoke", action="store_true", help="scaled-down shapes, 2 steps")
    ap.add_argument("--data", default=str(DATA), help="Alpaca-style JSON (instruction/output)")
    ap.add_argument("--cache", help="shape folders' parent (default ~/.cache/tunelab/shapes)")
    ap.add_argument("--work", help="scratch folder for run directories (default: system temp)")
    ap.add_argument("--bnb-path", help="folder holding bitsandbytes, for the reference's NF4")
    ap.add_argument(
        "--max-rss-gb",
        type=float,
        help="stop a child above this resident size "
        "(default 90%% of the memory available at the start)",
    )
    ap.add_argument("--doc", default=None, help=f"page to update (default {DOC}; not in --smoke)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--json", help="also write every measurement, raw, to this file")
    a = ap.parse_args()
    if a.smoke:
        a.steps, a.warmup, a.runs = 2, 1, 1
    doc = Path(a.doc) if a.doc else (None if a.smoke else DOC)
    if not Path(a.data).is_file():
        raise SystemExit(f"{a.data}: instruction data not found (pass --data PATH)")
    limit = a.max_rss_gb * 1024 if a.max_rss_gb else 0.9 * available_mb()
    if a.work:
        Path(a.work).mkdir(parents=True, exist_ok=True)
    cache = Path(a.cache).expanduser() if a.cache else shapes.CACHE
    dirs = {
        n: shapes.write_shape(n, cache / (f"{n}-scaled" if a.smoke else n), scale=a.smoke)
        for n in a.shapes
    }
    job = dict(data=str(Path(a.data).resolve()), steps=a.steps, bnb_path=a.bnb_path, **TRAIN)
    have_bnb = bnb_version(a.bnb_path) != "no bitsandbytes"
    names = {"tunelab": "tunelab", "reference": "transformers + peft"}
    load_rows, train_rows, load0, threads = [], [], os.getloadavg()[0], set()
    for shape in a.shapes:
        weights = sum(f.stat().st_size for f in dirs[shape].glob("*.safetensors")) / 2**30
        for method in a.methods:
            row = dict(
                shape=shape,
                method=method,
                weights_gib=weights,
                sides={names["tunelab"]: [], names["reference"]: []},
            )
            (load_rows if method in LOAD_METHODS else train_rows).append(row)
            if method == "full" and full_mb(shape, a.smoke) > limit:
                row["skipped"] = f"not run: needs ~{full_mb(shape, a.smoke) / 1024:.0f} GiB"
                continue
            for run in range(a.runs):  # alternate who goes first, so drift in load evens out
                for side in ("tunelab", "reference")[:: 1 if run % 2 == 0 else -1]:
                    if side == "reference" and method == "nf4" and not have_bnb:
                        row["sides"][names[side]].append({"failed": "no bitsandbytes here"})
                        continue
                    with tempfile.TemporaryDirectory(prefix="scale-", dir=a.work) as tmp:
                        fn = measure_load if method in LOAD_METHODS else measure_train
                        r = fn(side, method, dict(job, model=str(dirs[shape])), Path(tmp), limit)
                    row["sides"][names[side]].append(r)
                    threads.add(r.get("threads"))
                    print(
                        f"{shape} {method} {names[side]}: "
                        + (
                            r.get("failed")
                            or ", ".join(
                                f"{k} {v:.2f}" for k, v in r.items() if isinstance(v, float)
                            )
                        ),
                        flush=True,
                    )
    same = all(
        len({tuple(r["tokens"]) for runs in row["sides"].values() for r in runs if "tokens" in r})
        <= 1
        for row in train_rows
    )
    cmd = " ".join(["python bench/scale.py", *sys.argv[1:]])
    parts = [
        f"`{cmd}` on {datetime.date.today()}, tunelab {common.git_commit()}. Machine: "
        f"{machine(', '.join(str(t) for t in sorted(threads - {None})) or '?')}, "
        f"{bnb_version(a.bnb_path)}. Load average {load0:.2f} before, {os.getloadavg()[0]:.2f} "
        f"after. Random-weight{' scaled-down' if a.smoke else ''} checkpoints from bench/shapes.py "
        f"(bf16 safetensors shards); each figure from its own process"
        + (f", median of {a.runs} runs (min–max)" if a.runs > 1 else "")
        + ".",
    ]
    if load_rows:
        parts += [
            "",
            load_table(load_rows),
            "",
            'Loading, timed inside the process around `tunelab.load(dir, precision="bf16"'
            '[, quantize="nf4"])` and `AutoModelForCausalLM.from_pretrained(dir, dtype='
            "torch.bfloat16, low_cpu_mem_usage=True)` (nf4: bitsandbytes NF4, double "
            "quantization, on CPU); RSS before counts the imported libraries. Target: "
            "issue 16's bound on the peak while loading, 1.15 × the bf16 weights + 0.5 GB. "
            "RSS counts the memory-mapped checkpoint pages a process has touched, on both "
            "sides.",
        ]
    if train_rows:
        parts += [
            "",
            train_table(train_rows, a.warmup),
            "",
            f"Training: {a.steps} steps on {Path(a.data).name}, sequence length "
            f"{TRAIN['seq_len']}, batch {TRAIN['batch']}, AdamW lr {TRAIN['lr']:g} constant, "
            f"clip 1.0, bf16 autocast on both sides, no gradient checkpointing, no "
            f"evaluation; s/step is the median of steps {a.warmup + 1}–{a.steps}. tunelab: "
            "`--precision bf16 --autocast bf16` (frozen weights in bf16, trainable ones "
            "with fp32 master copies); the reference: full loads fp32 weights, LoRA a bf16 "
            "base with fp32 adapters, QLoRA a bitsandbytes NF4 base. LoRA r "
            f"{LORA['r']}, alpha {LORA['alpha']}, dropout 0 on every linear layer of the "
            "blocks (peft's `all-linear`; GPT-2's fused c_attn takes one adapter in peft, "
            "three in tunelab, hence the trainable counts). Both sides trained on "
            + (
                "the same batches (identical tokens per step)."
                if same
                else "batches whose token counts differ: check the data pipeline."
            )
            + " Peaks: VmHWM read every 5 ms from outside when the model is ready "
            "(load-phase) and when the last step is recorded (training); command peak: "
            "the whole process, including what tunelab's command writes at the end "
            "(checkpoint, final model). tunelab runs with the allocator its command picks "
            "(src/tunelab/runtime/allocator.py: freed memory kept below 1B parameters, "
            "glibc's defaults from 1B); the reference with glibc's defaults."
            + (
                ""
                if have_bnb
                else " QLoRA's reference row is peft LoRA on a bf16 base: "
                "bitsandbytes is not installed here."
            ),
        ]
    body = "\n".join(parts)
    if a.json:
        Path(a.json).write_text(json.dumps(dict(load=load_rows, train=train_rows), indent=1))
    print("\n" + body)
    if doc and not a.no_write:
        common.write_section("Model size", body, doc)
        print(f"\nwritten to {doc}")


if __name__ == "__main__":
    main()
