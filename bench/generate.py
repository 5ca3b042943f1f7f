"""Generation speed: tunelab against transformers' generate on SmolLM2-135M, same weights.

    python bench/generate.py [--runs 3] [--new-tokens 128] [--no-write]
    python bench/generate.py --smoke   # a tiny random model, 4 tokens: keeps the script working

Both load the same weights (tunelab.load, and AutoModelForCausalLM on the directory that
gguf_to_hf_dir made), get the same chat prompts (left-padded in a batch), decode greedily and make
exactly --new-tokens tokens each (no EOS stop). Tokens/s counts new tokens of the whole batch over
the wall time of the call (prefill included); each figure is the median of --runs runs, taken in
the same process with the two libraries alternating, with the range of the runs. tunelab runs
`generate_ids`, what `tunelab generate` and `LM.generate` call (oneDNN reordered weights for fp32
and bf16 where the CPU supports them); transformers runs `generate` with greedy decoding, its
default cache and attention implementation. The table goes to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import tunelab
from tunelab.generate import Sampling, generate_ids

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py)

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
TITLE = "Generation"


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
        seq = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
        )
    return seq[:, ids.shape[1] :].tolist()


def bench_precision(
    precision: str, batches: list[int], new: int, runs: int, model: str = MODEL
) -> list[dict]:
    from transformers import AutoModelForCausalLM

    lm = tunelab.load(model, precision=precision)
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
        rows.append(
            dict(
                batch=b,
                precision=precision,
                ours=ours_tps,
                theirs=theirs_tps,
                ours_all=[b * new / t for t in times["ours"]],
                theirs_all=[b * new / t for t in times["theirs"]],
                same=f"{same}/{b}",
            )
        )
        print(
            f"batch {b} {precision}: tunelab {ours_tps:.1f} tok/s, transformers "
            f"{theirs_tps:.1f} tok/s, identical rows {same}/{b}",
            flush=True,
        )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| batch | precision | tunelab tok/s, median (range) | transformers tok/s, median "
        "(range) | ratio | identical rows |",
        "|---:|:---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['precision']} | {common.spread(r['ours_all'])} "
            f"| {common.spread(r['theirs_all'])} | {r['ours'] / r['theirs']:.2f}x "
            f"| {r['same']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="timed runs per figure (median)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, 4 tokens, no docs")
    a = ap.parse_args(argv)
    sitting = common.Sitting(common.command_line("generate.py", argv), ("transformers",))
    with tempfile.TemporaryDirectory(prefix="bench-generate-smoke-") as tmp:
        model = MODEL
        if a.smoke:
            a.runs, a.new_tokens, a.batches = 1, 4, [2]
            model = str(common.tiny_causal_dir(Path(tmp)))
        rows = [
            r
            for p in a.precisions
            for r in bench_precision(p, a.batches, a.new_tokens, a.runs, model)
        ]
        report(a, rows, sitting, Path(tmp))


def report(a, rows: list[dict], sitting, tmp: Path) -> None:
    rows.sort(key=lambda r: (r["batch"], list(DTYPES).index(r["precision"])))
    body = "\n".join(
        [
            sitting.preamble(),
            "",
            f"Work: {MODEL}, greedy, {a.new_tokens} new tokens per row (no EOS stop), chat prompts "
            f"of different lengths left-padded, median of {a.runs} runs in alternating order, range "
            "in brackets.",
            "",
            f"tunelab's kernels (runtime.linear auto, `tunelab runtime`): {kernels()}.",
            "",
            table(rows),
            "",
            "Tokens/s = batch x new tokens / wall time of one call (prefill included). "
            "Identical rows: rows whose tokens equal transformers' (bf16 rounding may differ).",
        ]
    )
    print("\n" + table(rows))
    common.publish(TITLE, body, a.smoke, not a.no_write)


if __name__ == "__main__":
    main()
