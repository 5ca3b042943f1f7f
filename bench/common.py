"""What every benchmark shares: the machine line, the section writer, peak RSS, worker processes,
medians with their range, and the tiny models of the smoke modes.

One copy of each, so every section of docs/BENCHMARKS.md describes its sitting the same way:
CPU model and count, torch threads, library versions, the git commit, the load average before
and after the section was measured.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "BENCHMARKS.md"
SHARED = ROOT.parent / "shared" / "data"
HEADER = """# Benchmarks

How the figures are measured: tunelab and the reference library run on the same inputs, each in
its own process where memory is compared, alternating run by run; each figure is the median of
several runs after a warm-up, with the range of the runs beside it. Each section names its machine
(CPU model and count, torch threads, library versions), the git commit, the date and the load
average before and after; compare figures only within one section. `python bench/run_all.py`
re-measures every section in one sitting; the script each section names refreshes it alone.
"""


# -- the machine and the sitting ---------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> str:
    """The matrix-relevant CPU features: AMX, AVX512-BF16, AVX-512, AVX2."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split())
    except (OSError, AttributeError):
        return "flags unknown"
    names = [
        ("amx_bf16", "AMX-BF16"),
        ("avx512_bf16", "AVX512-BF16"),
        ("avx512f", "AVX-512"),
        ("avx2", "AVX2"),
    ]
    found = [label for flag, label in names if flag in flags]
    return ", ".join(found) if found else "no AVX2"


def git_commit() -> str:
    """The commit measured, with '+changes' when the work tree differs from it."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True, capture_output=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            text=True,
            capture_output=True,
        ).stdout.strip()
    except OSError:
        return "unknown commit"
    return (rev or "unknown commit") + (" +changes" if dirty else "")


def versions(libs: tuple[str, ...] = ()) -> str:
    import torch

    out = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in libs:
        try:
            out.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            out.append(f"{name} not installed")
    return ", ".join(out)


def machine(libs: tuple[str, ...] = ()) -> str:
    """One line: CPUs, model, features, torch threads, versions, commit."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{cpus} CPUs ({cpu_model()}; {cpu_flags()}), {torch.get_num_threads()} torch "
        f"threads; {versions(libs)}; git {git_commit()}"
    )


def load() -> float:
    return os.getloadavg()[0]


class Sitting:
    """One section's measurement: when it started, the load before and after, how long it took."""

    def __init__(self, command: str, libs: tuple[str, ...] = ()):
        self.command, self.libs = command, libs
        self.load_before, self.started = load(), time.time()
        self.date = datetime.date.today().isoformat()

    def preamble(self) -> str:
        """The 'how and where' paragraph that opens a section."""
        after = load()
        cpus = os.cpu_count() or 1
        busy = (
            " **The machine was busy** (load above its CPU count): figures are slower and "
            "noisier than on a quiet machine; compare only ratios within this section."
            if max(self.load_before, after) > cpus
            else ""
        )
        return (
            f"`{self.command}` on {self.date}, {time.time() - self.started:.0f} s in all.\n\n"
            f"Machine: {machine(self.libs)}. Load average {self.load_before:.2f} before, "
            f"{after:.2f} after.{busy}"
        )


def command_line(script: str, argv: list[str] | None = None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"bench/{script}", *args])


# -- the section writer ------------------------------------------------------------------------
def write_section(title: str, body: str, doc: Path = DOC) -> None:
    """Replace (or add at the end) the '## title' section of docs/BENCHMARKS.md, keeping the
    others. The file is read right before writing: other benchmarks edit their own sections.
    The old section goes whole, hand-written readings included: they describe old figures."""
    text = doc.read_text() if doc.exists() else HEADER
    head = f"## {title}"
    pattern = re.compile(rf"^{re.escape(head)}\n.*?(?=^## |\Z)", re.S | re.M)
    section = f"{head}\n\n{body.strip()}\n"
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def publish(title: str, body: str, smoke: bool, write: bool = True, file=None) -> None:
    """The section into docs/BENCHMARKS.md when `write`, saying so on `file` (stdout); a smoke
    run writes it into a scratch copy instead: the writer runs, docs/ stay as they are."""
    if smoke:
        with tempfile.TemporaryDirectory() as tmp:
            write_section(title, body, Path(tmp) / "BENCHMARKS.md")
    elif write:
        write_section(title, body)
        print(f"\nwritten to {DOC}", file=file or sys.stdout)


# -- statistics --------------------------------------------------------------------------------
def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    """'median (min–max)' of the runs; the median alone for one run."""
    if not values:
        return "–"
    med = fmt.format(statistics.median(values))
    if len(values) == 1:
        return med
    return f"{med} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def alternating(names: list, runs: int) -> list:
    """The order of `runs` rounds over `names`, reversed every other round, so drift in machine
    load touches every variant alike."""
    order = []
    for r in range(runs):
        order += names if r % 2 == 0 else names[::-1]
    return order


# -- memory ------------------------------------------------------------------------------------
PEAK_BEFORE_RESET = [0.0]


def train_peak_mb() -> float:
    """This process's RSS high-water mark (VmHWM) since its start or the last reset_peak()."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_rss_mb() -> float:
    """The process's peak RSS from its start. Not ru_maxrss: Linux carries the parent's peak
    into a spawned child's ru_maxrss."""
    return max(train_peak_mb(), PEAK_BEFORE_RESET[0])


def rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def reset_peak() -> None:
    """Start a new RSS high-water mark (Linux >= 4.0): train_peak_mb() then tracks from here."""
    gc.collect()
    PEAK_BEFORE_RESET[0] = peak_rss_mb()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: train_peak_mb() then reports the process peak


# -- worker processes --------------------------------------------------------------------------
# The process environment a worker gets. "shipped": what the `tunelab` command gives itself
# (src/tunelab/allocator.py: it restarts with these glibc settings); "glibc": glibc's defaults,
# and TUNELAB_MALLOC=0 so the Trainer does not set them at run time either; "reference": the
# reference library as its users run it (glibc's defaults).
ENVIRONMENTS = ("shipped", "glibc", "reference")


def worker_env(environment: str) -> dict:
    from tunelab.allocator import MALLOC_ENV

    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV and k != "TUNELAB_MALLOC"}
    if environment == "shipped":
        env.update(MALLOC_ENV)
    elif environment == "glibc":
        env["TUNELAB_MALLOC"] = "0"
    elif environment != "reference":
        raise ValueError(f"environment {environment!r}: expected one of {ENVIRONMENTS}")
    src = str(ROOT / "src")  # the tree measured, whatever the venv's editable install points at
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    return env


def spawn(script: str, name: str, job: dict, environment: str | None = None) -> dict:
    """Run `script --worker name` with `job` on stdin in a fresh process; its 'RESULT {json}'.
    The environment defaults to "shipped" for tunelab workers and "reference" for the others."""
    environment = environment or ("shipped" if name == "tunelab" else "reference")
    proc = subprocess.run(
        [sys.executable, script, "--worker", name],
        env=worker_env(environment),
        input=json.dumps(job),
        capture_output=True,
        text=True,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stderr[-6000:])
        raise SystemExit(f"{Path(script).name}: the {name} worker failed (exit {proc.returncode})")
    out = json.loads(lines[-1][len("RESULT ") :])
    out["environment"] = environment
    return out


def worker_main(handlers: dict, name: str) -> None:
    """The worker side of spawn: the job from stdin, the result as one 'RESULT' line."""
    job = json.loads(sys.stdin.read())
    print("RESULT " + json.dumps(handlers[name](job)), flush=True)


# -- tiny models for the smoke modes -----------------------------------------------------------
def smollm2_dir() -> Path:
    """The HF-layout directory converted (once, cached) from the embedded SmolLM2 GGUF."""
    from tunelab.hub import KNOWN, resolve
    from tunelab.model.gguf import gguf_to_hf_dir

    name = "smollm2-135m-instruct"
    return gguf_to_hf_dir(resolve(name)) if KNOWN[name].package else resolve(name)


def tiny_causal_dir(root: Path) -> Path:
    """A 2-layer random Llama with SmolLM2's real tokenizer and chat template, in HF layout:
    what the smoke modes train in place of SmolLM2-135M (both frameworks load it)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(root) / "tiny-llama"
    if (out / "config.json").exists():
        return out
    source = smollm2_dir()
    cfg = json.loads((source / "config.json").read_text())
    tiny = LlamaConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=cfg["rms_norm_eps"],
        rope_theta=cfg["rope_theta"],
        tie_word_embeddings=True,
        bos_token_id=cfg["bos_token_id"],
        eos_token_id=cfg["eos_token_id"],
        pad_token_id=cfg["pad_token_id"],
    )
    torch.manual_seed(0)
    LlamaForCausalLM(tiny).save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, out / name)
    return out


def tiny_encoder_dir(root: Path) -> Path:
    """A 2-layer random BERT with all-MiniLM-L6-v2's tokenizer, in HF layout."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    from tunelab.hub import resolve

    out = Path(root) / "tiny-bert"
    if (out / "config.json").exists():
        return out
    source = Path(resolve("minilm-l6"))
    tiny = BertConfig(
        vocab_size=json.loads((source / "config.json").read_text())["vocab_size"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    BertModel(tiny).save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    return out
