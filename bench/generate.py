"""Generation speed: tunelab against transformers' generate on SmolLM2-135M, same weights.

    python bench/generate.py [--runs 3] [--new-tokens 128] [--no-write]

Both load the same weights (tunelab.load, and AutoModelForCausalLM on the directory that
gguf_to_hf_dir made), get the same chat prompts (left-padded in a batch), decode greedily and make
exactly --new-tokens tokens each (no EOS stop). Tokens/s counts new tokens of the whole batch over
the wall time of the call (prefill included); each figure is the median of --runs runs, taken in
the same process with the two libraries alternating. The table goes to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

import tunelab
from tunelab.generate import Sampling, generate_ids

MODEL = "smollm2-135m-instruct"
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity to a child in two sentences.",
    "List three primary colours.",
    "Hi!",
    "Translate 'good morning' into Spanish and German.",
    "What is 17 times 23? Show your working.",
    "Give me a short motivational quote about learning to code.",
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DOC = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"
HEADER = """# Benchmarks

How the figures are measured: tunelab and the reference library run in the same process, on the
same inputs, alternating run by run; each figure is the median of several runs after a warm-up.
Each section names its machine (CPU count and model, torch and library versions) and its date;
compare figures only within one section. Re-run the script a section names to refresh it.
"""


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor() or model
    import transformers

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpus} CPUs ({model}), {torch.get_num_threads()} torch threads; "
            f"torch {torch.__version__}, transformers {transformers.__version__}")  # fmt: skip


def kernels() -> str:
    from tunelab.runtime import resolve

    rt = resolve("auto")
    return ", ".join(f"{c} {k}" for c, k in rt.kernels.items()) + f" ({rt.source})"


def timed(fn, *args) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def run_ours(lm, prompts: list[list[int]], pad: int, new: int) -> list[list[int]]:
    return generate_ids(lm.model, prompts, Sampling(max_new_tokens=new), set(), pad)


def run_theirs(hf, ids: torch.Tensor, mask: torch.Tensor, new: int) -> list[list[int]]:
    with torch.inference_mode():
        seq = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                          max_new_tokens=new, min_new_tokens=new)  # fmt: skip
    return seq[:, ids.shape[1] :].tolist()


def bench_precision(precision: str, batches: list[int], new: int, runs: int) -> list[dict]:
    from transformers import AutoModelForCausalLM

    lm = tunelab.load(MODEL, precision=precision)
    hf = AutoModelForCausalLM.from_pretrained(lm.path, dtype=DTYPES[precision]).eval()
    pad = lm.tokenizer.pad_id if lm.tokenizer.pad_id is not None else 0
    hf.generation_config.eos_token_id = None  # no EOS stop: both make exactly `new` tokens
    hf.generation_config.pad_token_id = pad
    chats = [lm.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    rows = []
    for b in batches:
        prompts = [chats[i % len(chats)] for i in range(b)]
        width = max(map(len, prompts))
        ids = torch.full((b, width), pad, dtype=torch.long)
        mask = torch.zeros(b, width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
        runners = {"ours": (run_ours, (lm, prompts, pad)), "theirs": (run_theirs, (hf, ids, mask))}
        for fn, args in runners.values():
            fn(*args, 8)  # warm-up: lazy initialisation, first allocations
        times: dict[str, list[float]] = {"ours": [], "theirs": []}
        out = {}
        for r in range(runs):  # alternate who goes first, so drift in machine load evens out
            for name in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):
                fn, args = runners[name]
                seconds, out[name] = timed(fn, *args, new)
                times[name].append(seconds)
        assert all(len(row) == new for row in out["ours"] + out["theirs"]), "a row stopped early"
        ours_tps = b * new / statistics.median(times["ours"])
        theirs_tps = b * new / statistics.median(times["theirs"])
        same = sum(a == t for a, t in zip(out["ours"], out["theirs"]))
        rows.append(dict(batch=b, precision=precision, ours=ours_tps, theirs=theirs_tps,
                         same=f"{same}/{b}"))  # fmt: skip
        print(f"batch {b} {precision}: tunelab {ours_tps:.1f} tok/s, transformers "
              f"{theirs_tps:.1f} tok/s, identical rows {same}/{b}", flush=True)  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| batch | precision | tunelab tok/s | transformers tok/s | ratio | identical rows |",
             "|---:|:---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['batch']} | {r['precision']} | {r['ours']:.1f} | {r['theirs']:.1f} "
                     f"| {r['ours'] / r['theirs']:.2f}x | {r['same']} |")  # fmt: skip
    return "\n".join(lines)


def write_section(body: str) -> None:
    """Replace (or add) the '## Generation' section of docs/BENCHMARKS.md, keeping the others."""
    text = DOC.read_text() if DOC.exists() else HEADER
    section = f"## Generation\n\n{body.strip()}\n"
    pattern = re.compile(r"^## Generation\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="timed runs per figure (median)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    a = ap.parse_args()
    load = os.getloadavg()[0]
    rows = [r for p in a.precisions for r in bench_precision(p, a.batches, a.new_tokens, a.runs)]
    rows.sort(key=lambda r: (r["batch"], list(DTYPES).index(r["precision"])))
    body = "\n".join([
        f"`python bench/generate.py --runs {a.runs}` on {datetime.date.today()}: {MODEL}, greedy, "
        f"{a.new_tokens} new tokens per row (no EOS stop), chat prompts of different lengths "
        f"left-padded, median of {a.runs} runs.",
        "",
        f"Machine: {machine()}. Load average {load:.2f} before, {os.getloadavg()[0]:.2f} after.",
        "",
        f"tunelab's kernels (runtime.linear auto, `tunelab runtime`): {kernels()}.",
        "",
        table(rows),
        "",
        "Tokens/s = batch x new tokens / wall time of one call (prefill included). "
        "Identical rows: rows whose tokens equal transformers' (bf16 rounding may differ).",
    ])  # fmt: skip
    print("\n" + table(rows))
    if not a.no_write:
        write_section(body)
        print(f"\nwritten to {DOC}")


if __name__ == "__main__":
    main()
