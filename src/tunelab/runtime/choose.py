"""Which linear kernel wins on this machine: measured once per machine, cached, then reused.

The candidates (runtime/kernels.py) are timed on the products that matter, per shape class
(the calls: runtime/candidates.py):
  decode-fp32, decode-bf16  SmolLM2's block over 8 layers and a 7B-sized sibling pair (4096 ->
                            14336), with 1 and 8 rows, from cold caches: torch's F.linear,
                            oneDNN on the weights as they are, siblings joined as one product
                            ("onednn+fused"), on reordered copies ("packed"), and siblings as
                            one reordered product ("packed+fused")
  train-fp32, train-bf16    forward and backward of SmolLM2's MLP products (576 <-> 1536, 1024
                            rows) and LM head (576 -> 49152, 256 rows): F.linear against
                            oneDNN for all three products, and against oneDNN with the
                            weight grad on torch's mm ("onednn+mm")
  dequant-nf4               QLoRA's NF4 weights of a 4096 x 4096 layer dequantized to bf16 with
                            torch's threads against one thread ("one-thread"; runtime/
                            dequant.py gathers by index_select there, by rows over threads)
Each candidate runs in interleaved rounds and keeps its fastest time (other work on the
machine only slows a run down). A class takes a candidate other than torch only when it wins
by MARGIN over the shapes together and loses on none of them beyond TIE. The table is cached as JSON
under $TUNELAB_CACHE/runtime (default ~/.cache/tunelab), keyed by CPU model, cores, threads
and torch version; `tunelab runtime --rerun` measures again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import torch

from tunelab.files import atomic_write
from tunelab.model.weights import release_freed
from tunelab.runtime.candidates import (
    BLOCK_LAYERS,
    DECODE_BLOCKS,
    EVICT_BYTES,
    decode_calls,
    dequant_calls,
    evict,
    release_eviction,
    train_calls,
    weight_bytes,
)
from tunelab.runtime.kernels import (
    ONE_ROW,
    free_memory,
    onednn_works,
)

log = logging.getLogger("tunelab")
MARGIN = 1.10  # a path other than torch's must be this much faster to be chosen
# ... except for training products: each timed call lasts ~30 ms, and three tables measured on
# one machine put oneDNN at 1.04, 1.05 and 1.06x torch; onednn+mm's 1.06-1.10x on the products
# made full fp32 fine-tuning 7.8% faster end to end (docs/BENCHMARKS.md, Training).
MARGINS = {"train": 1.04}
# ... and it may not lose on any shape by more than timing noise: SmolLM2's 576 -> 1536
# training product, a tie, measured 0.96-1.01x in reruns minutes apart, and a strict "never
# slower" turned fp32 training over to torch (the LM head 1.13-1.46x slower there) one run in
# three. A loss beyond 3% on any shape still rules a candidate out.
TIE = 0.97
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CLASSES = ("decode-fp32", "decode-bf16", "train-fp32", "train-bf16", "dequant-nf4")
# Decoding one row and decoding a batch are chosen apart: on 2 EPYC vCPUs plain oneDNN won at 1
# row (1.54x torch) and the fused reordered weights at 8 (1.84x against 1.38x), and one choice
# over both flipped between measurements (IFEval's batches ran at 76 or 108 tok/s).
KEYS = CLASSES + tuple(c + ONE_ROW for c in CLASSES if c.startswith("decode"))
# (in, out, rows): decode shapes are a sibling pair (out each) or the block
# candidates.DECODE_BLOCKS names, train shapes one layer
SHAPES = {
    "decode": [(576, 1536, 1), (576, 1536, 8), (4096, 14336, 1), (4096, 14336, 8)],
    # train: SmolLM2's MLP products both ways and its LM head (49152 outputs), where oneDNN's
    # weight grad ran 0.96x torch while its forward and input grad ran faster
    "train": [(576, 1536, 1024), (1536, 576, 1024), (576, 49152, 256)],
    "dequant": [(4096, 4096, 0)],
}
CANDIDATES = {
    "decode": ("torch", "onednn", "onednn+fused", "packed", "packed+fused"),
    "train": ("torch", "onednn", "onednn+mm"),
    "dequant": ("torch", "one-thread"),
}
# Seconds per class: its rounds are cut short (to 2) past it. Per class, not for the whole
# measurement: timed from cold caches, decoding alone took longer than the whole budget and
# left training products 2 rounds where near-ties need 5.
BUDGET_S = 4.0


def machine() -> dict:
    """What the choice depends on: CPU model, cores, torch's threads, torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return dict(
        cpu=cpu, cores=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__
    )


def cache_path(key: dict | None = None) -> Path:
    key = key or machine()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(os.environ.get("TUNELAB_CACHE") or "~/.cache/tunelab").expanduser()
    return root / "runtime" / f"linear-{digest}.json"


def timer(fn, candidate: str, cls: str) -> float:
    """Seconds one call of fn (candidate's product for cls) takes, a decode call from cold
    caches (candidates.evict); tests fake a machine here."""
    if cls.startswith("decode"):
        evict()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@contextmanager
def _grad(phase: str):
    with torch.inference_mode() if phase == "decode" else torch.enable_grad():
        yield


def measure(rounds: int = 5, budget_s: float = BUDGET_S) -> list[dict]:
    """Rows {class, shape, candidate, ms}: each candidate's fastest of `rounds` calls."""
    rows = []
    for cls in CLASSES:
        start = time.perf_counter()
        phase, dname = cls.split("-")
        dtype = DTYPES.get(dname, torch.bfloat16)
        kinds = CANDIDATES[phase] if onednn_works(dtype) else ("torch",)
        for k, n, r in SHAPES.get(phase, ()):
            if 3 * weight_bytes(phase, k, n, dtype) > free_memory():  # weights, their copies
                continue
            with _grad(phase):
                if phase == "dequant":
                    calls = dequant_calls(k, n)
                else:
                    make = decode_calls if phase == "decode" else train_calls
                    calls = make(k, n, r, dtype, kinds)
                best = {c: math.inf for c in calls}
                for fn in calls.values():  # a first call: primitives made, pages touched
                    fn()
                # 7B-sized: 3 rounds; a small block decodes in ~1 ms, near-ties there: twice
                n_rounds = (
                    min(rounds, 3) if k * n >= 1 << 24 else rounds * (1 + (phase == "decode"))
                )
                for i in range(n_rounds):
                    if i >= 2 and time.perf_counter() - start > budget_s:
                        break
                    for c, fn in calls.items():
                        best[c] = min(best[c], timer(fn, c, cls))
            what = " (block)" if (k, n) in DECODE_BLOCKS else " (pair)"
            shape = f"{k}x{n}, {r} row{'s' * (r > 1)}" + (what if phase == "decode" else "")
            shape = f"{k}x{n} to bf16" if phase == "dequant" else shape
            rows += [
                dict(cls=cls, shape=shape, candidate=c, ms=round(t * 1e3, 4))
                for c, t in best.items()
            ]
    release_eviction()
    return rows


def decide(rows: list[dict], margin: float | None = None) -> dict:
    """Per class, the fastest candidate that beats torch by `margin` (default: the class's
    margin(key)) over the class's shapes (geometric mean) and is slower than torch on none of
    them beyond timing noise (TIE); else torch. Decode classes are chosen twice: over their
    batch shapes (the class) and their 1-row shapes (class/1)."""
    choice = {}
    for key in KEYS:
        table: dict[str, dict[str, float]] = {}
        for row in rows:
            if choice_key(row) == key:
                table.setdefault(row["shape"], {})[row["candidate"]] = row["ms"]
        best, best_gain = "torch", class_margin(key) if margin is None else margin
        for cand in {c for times in table.values() for c in times} - {"torch"}:
            ratios = [t["torch"] / t[cand] for t in table.values() if cand in t and t[cand] > 0]
            if not ratios or len(ratios) < len(table) or min(ratios) < TIE:
                continue  # loses somewhere, or was not measured everywhere
            gain = math.exp(sum(map(math.log, ratios)) / len(ratios))
            if gain >= best_gain:
                best, best_gain = cand, gain
        choice[key] = best
    return choice


def class_margin(key: str) -> float:
    """How much faster than torch a candidate must be to be chosen for this class."""
    return MARGINS.get(key.split("-")[0], MARGIN)


def choice_key(row: dict) -> str:
    """The choice a measured row counts toward: its class, or class/1 for 1-row decoding."""
    one = row["cls"].startswith("decode") and row["shape"].split(", ")[-1].startswith("1 row")
    return row["cls"] + ONE_ROW if one else row["cls"]


def design() -> str:
    """What a table measures and how it decides: one made otherwise (an older tunelab's) is
    measured again rather than trusted."""
    blocks = sorted(DECODE_BLOCKS.items())
    what = [SHAPES, blocks, BLOCK_LAYERS, CANDIDATES, KEYS, MARGIN, MARGINS, TIE, EVICT_BYTES]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def _cached(path: Path, key: dict) -> dict | None:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = found.get("machine") == key and found.get("design") == design()
    return found if ok and set(found.get("choice", {})) == set(KEYS) else None


@contextmanager
def _locked(path: Path):
    """One process measures at a time (the ranks of a run on one machine): the others wait,
    then read its table."""
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "w")
    except (ImportError, OSError):  # no fcntl (Windows) or a read-only cache: measure alone
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def measured(rerun: bool = False) -> dict:
    """This machine's table {machine, measured, seconds, load, rows, choice}: from the cache,
    or measured now (once per machine) and cached. A table measured on a busy machine is a
    guess (preempted calls once made torch look 30x faster than oneDNN and stuck): it serves
    until the machine is quiet, and is measured again then."""
    key, path = machine(), cache_path()

    def usable(found: dict | None) -> bool:
        return found is not None and not (_busy(found["load"], key) and not _busy(_load(), key))

    if not rerun and usable(found := _cached(path, key)):
        return found
    with _locked(path):
        if not rerun and usable(found := _cached(path, key)):
            return found
        log.info(
            "measuring the linear kernels on this machine (once; `tunelab runtime` shows them)"
        )
        started = time.perf_counter()
        rows = measure()
        release_freed()  # its 7B-sized test matrices must not stay in the heap for the run
        found = dict(
            machine=key,
            design=design(),
            measured=datetime.now(UTC).isoformat(timespec="seconds"),
            seconds=round(time.perf_counter() - started, 2),
            load=_load(),
            rows=rows,
            choice=decide(rows),
        )
        if _busy(found["load"], key):
            log.warning(
                f"the machine was busy (load {found['load']}): the kernel times are noisy; "
                "they are measured again the first time it is quiet"
            )
        try:
            atomic_write(path, json.dumps(found, indent=1))  # a concurrent reader never sees half
        except OSError:  # a read-only cache: measure again next time
            pass
    return found


def _busy(load: float | None, key: dict) -> bool:
    return (load or 0) > (key["cores"] or 1)


def _load() -> float | None:
    """The 1-minute load average as the measurement ends: above the cores, times are noisy."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def format_table(found: dict) -> str:
    """The table as `tunelab runtime` prints it."""
    m = found["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, torch {m['torch']}",
        f"measured: {found['measured']} in {found['seconds']} s, load average "
        f"{found.get('load')} ({cache_path(m)})",
        "",
        f"{'class':<12} {'shape':<28} {'candidate':<13} {'ms':>9} {'vs torch':>9}",
    ]
    torch_ms = {(r["cls"], r["shape"]): r["ms"] for r in found["rows"] if r["candidate"] == "torch"}
    for r in found["rows"]:
        base = torch_ms.get((r["cls"], r["shape"]))
        speed = f"{base / r['ms']:.2f}x" if base and r["ms"] else ""
        mark = " *" if found["choice"].get(choice_key(r)) == r["candidate"] else ""
        lines.append(
            f"{r['cls']:<12} {r['shape']:<28} {r['candidate']:<13} {r['ms']:>9.3f} {speed:>9}{mark}"
        )
    lines += [
        "",
        "chosen (*): " + ", ".join(f"{c} {k}" for c, k in found["choice"].items()),
        "a path other than torch is chosen only when faster by "
        + ", ".join(f"{m:.2f}x for {c}" for c, m in MARGINS.items())
        + f", {MARGIN:.2f}x for the others, and slower nowhere beyond {1 - TIE:.0%} noise",
    ]
    if _busy(found.get("load"), m):
        lines.append("the machine was busy (load above its cores): measured again when it is quiet")
    return "\n".join(lines)
