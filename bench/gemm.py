"""The CPU matrix products behind every linear layer: torch's default (MKL) against oneDNN.

    python bench/gemm.py [--runs 5] [--no-write]
    python bench/gemm.py --smoke    # small shapes, one run: keeps the script working

GFLOP/s of F.linear (MKL's sgemm in torch's CPU build) and of oneDNN's linear, which tunelab's
kernels.py uses, for training-sized products (MiniLM's and SmolLM2's layers at 4096 tokens:
forward, input gradient, weight gradient) and the fp32 decoding pass over SmolLM2-135M's weights
with 1 and 8 rows (GB/s). Medians of --runs, fp32 throughout, the two kernels alternating run by
run. Writes the '## Kernels: fp32 linear layers on CPU' section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tunelab.kernels import onednn_linear

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py)

TITLE = "Kernels: fp32 linear layers on CPU"

SMOLLM2_LAYER = [
    (576, 576),
    (192, 576),
    (192, 576),
    (576, 576),
    (1536, 576),
    (1536, 576),
    (576, 1536),
]


def timed2(a, b, runs: int, inner: int) -> tuple[float, float]:
    """Median seconds per call of two (fn, args) pairs, measured in alternating order."""
    for fn, args in (a, b):
        fn(*args)
    times: list[list[float]] = [[], []]
    for r in range(runs):
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            fn, args = (a, b)[i]
            t = time.perf_counter()
            for _ in range(inner):
                fn(*args)
            times[i].append((time.perf_counter() - t) / inner)
    return statistics.median(times[0]), statistics.median(times[1])


def products(runs: int, shapes: list[tuple]) -> list[str]:
    lines = [
        "| product (M x K -> N) | F.linear GFLOP/s | oneDNN GFLOP/s | ratio |",
        "|:---|---:|---:|---:|",
    ]
    for m, k, n in shapes:
        x, w, g = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
        flop = 2 * m * n * k
        cases = {
            "forward": (F.linear, (x, w), onednn_linear, (x, w, None)),
            "input grad": (torch.mm, (g, w), onednn_linear, (g, w.t(), None)),
            "weight grad": (torch.mm, (g.t(), x), onednn_linear, (g.t(), x.t(), None)),
        }
        for name, (ref, ref_args, ours, our_args) in cases.items():
            a, b = timed2((ref, ref_args), (ours, our_args), runs, 3)
            lines.append(
                f"| {name} {m}x{k}->{n} | {flop / a / 1e9:.0f} | {flop / b / 1e9:.0f} "
                f"| {a / b:.2f}x |"
            )
    return lines


def _pass(fn, ws: list, weights: list, xs: dict) -> None:
    for w, p in zip(ws, weights):
        fn(xs[w.shape[1]], p, None)


def decoding(runs: int, layers: int) -> list[str]:
    ws = [torch.randn(n, k) for _ in range(layers) for n, k in SMOLLM2_LAYER]
    ws.append(torch.randn(49152 if layers > 1 else 512, 576))  # the tied LM head
    size = sum(w.numel() * 4 for w in ws)
    lines = [
        "| decoding pass, SmolLM2-135M fp32 weights | F.linear GB/s | oneDNN reordered GB/s "
        "| ratio |",
        "|:---|---:|---:|---:|",
    ]
    for rows in (1, 8):
        xs = {k: torch.randn(rows, k) for k in (576, 1536)}
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in ws]
        a, b = timed2(
            (_pass, (F.linear, ws, ws, xs)), (_pass, (onednn_linear, ws, packed, xs)), runs, 1
        )
        lines.append(
            f"| {rows} row(s) | {size / a / 1e9:.1f} | {size / b / 1e9:.1f} | {a / b:.2f}x |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="small shapes, one run, no docs")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = ap.parse_args(argv)
    sitting = common.Sitting(common.command_line("gemm.py", argv))
    shapes = [(4096, 384, 1536), (4096, 1536, 384), (4096, 576, 1536), (2048, 2048, 2048)]
    layers = 30
    if args.smoke:
        args.runs, shapes, layers = 1, [(64, 32, 48)], 1
    tables = ["\n".join(products(args.runs, shapes)), "\n".join(decoding(args.runs, layers))]
    body = "\n\n".join(
        [
            sitting.preamble(),
            "Work: the products behind every linear layer, by F.linear / torch.mm (MKL's sgemm in "
            "torch's CPU build) and by oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`, shipped "
            f"with torch for its compiler), fp32, medians of {args.runs} runs with the two kernels "
            "alternating; the decoding pass streams every weight of SmolLM2-135M once (30 blocks and "
            "the tied head) with 1 and 8 rows, oneDNN on weights reordered for that row count.",
            *tables,
        ]
    )
    print("\n\n".join(tables))
    common.publish(TITLE, body, args.smoke, not args.no_write)


if __name__ == "__main__":
    main()
