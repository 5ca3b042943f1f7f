"""The CPU matrix products behind every linear layer: torch's default (MKL) against oneDNN.

    python bench/gemm.py [--runs 5]

Prints GFLOP/s of F.linear (MKL's sgemm in torch's CPU build) and of oneDNN's linear, which
tunelab's kernels.py uses, for training-sized products (MiniLM's and SmolLM2's layers at 4096
tokens: forward, input gradient, weight gradient) and the fp32 decoding pass over SmolLM2-135M's
weights with 1 and 8 rows (GB/s). Medians of --runs; fp32 throughout. Paste into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from tunelab.kernels import onednn_linear

SMOLLM2_LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576),
                 (576, 1536)]  # fmt: skip


def timed(fn, args: tuple, runs: int, inner: int) -> float:
    fn(*args)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        for _ in range(inner):
            fn(*args)
        times.append((time.perf_counter() - t) / inner)
    return statistics.median(times)


def products(runs: int) -> None:
    print("| product (M x K -> N) | F.linear GFLOP/s | oneDNN GFLOP/s | ratio |")
    print("|:---|---:|---:|---:|")
    for m, k, n in [(4096, 384, 1536), (4096, 1536, 384), (4096, 576, 1536), (2048, 2048, 2048)]:
        x, w, g = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
        flop = 2 * m * n * k
        cases = {
            "forward": (F.linear, (x, w), onednn_linear, (x, w, None)),
            "input grad": (torch.mm, (g, w), onednn_linear, (g, w.t(), None)),
            "weight grad": (torch.mm, (g.t(), x), onednn_linear, (g.t(), x.t(), None)),
        }
        for name, (ref, ref_args, ours, our_args) in cases.items():
            a, b = timed(ref, ref_args, runs, 3), timed(ours, our_args, runs, 3)
            print(f"| {name} {m}x{k}->{n} | {flop / a / 1e9:.0f} | {flop / b / 1e9:.0f} "
                  f"| {a / b:.2f}x |")  # fmt: skip


def _pass(fn, ws: list, weights: list, xs: dict) -> None:
    for w, p in zip(ws, weights):
        fn(xs[w.shape[1]], p, None)


def decoding(runs: int) -> None:
    ws = [torch.randn(n, k) for _ in range(30) for n, k in SMOLLM2_LAYER]
    ws.append(torch.randn(49152, 576))  # the tied LM head
    size = sum(w.numel() * 4 for w in ws)
    print("\n| decoding pass, SmolLM2-135M fp32 weights | F.linear GB/s | oneDNN reordered GB/s "
          "| ratio |\n|:---|---:|---:|---:|")  # fmt: skip
    for rows in (1, 8):
        xs = {k: torch.randn(rows, k) for k in (576, 1536)}
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in ws]

        a = timed(_pass, (F.linear, ws, ws, xs), runs, 1)
        b = timed(_pass, (onednn_linear, ws, packed, xs), runs, 1)
        print(f"| {rows} row(s) | {size / a / 1e9:.1f} | {size / b / 1e9:.1f} | {a / b:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    products(args.runs)
    decoding(args.runs)


if __name__ == "__main__":
    main()
