"""QLoRA's base layers on CPU: an NF4 linear layer's forward and input gradient, tunelab against
bitsandbytes' Linear4bit on the same weights.

    python bench/nf4.py [--tokens 256] [--runs 5] [--shapes mistral-7b gpt2-large]
                        [--bnb-path DIR] [--no-write]
    python bench/nf4.py --smoke     # small shapes, one run: keeps the script working

Per layer shape of Mistral-7B's blocks (q, k/v, o, gate/up, down) and of GPT-2 large's (q/k/v/o
and c_attn as peft quantizes it, the MLP both ways): milliseconds of the forward
(x @ W.T) and of the input gradient (grad @ W) under bf16 autocast, the dequantization included
— what a QLoRA step does 32 times per block stack, twice. Both sides hold the same NF4 codes
(double quantization, block 64); bitsandbytes runs its native CPU kernels where its wheel has
them. Medians of --runs, the two sides alternating. Without bitsandbytes only tunelab's column
is filled. Writes the '## NF4 layers (QLoRA's base) on CPU' section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py)

TITLE = "NF4 layers (QLoRA's base) on CPU"
MISTRAL = [("q_proj, o_proj", 4096, 4096), ("k_proj, v_proj", 4096, 1024),
           ("gate_proj, up_proj", 4096, 14336), ("down_proj", 14336, 4096)]  # fmt: skip
# GPT-2 large: tunelab splits c_attn into q, k, v (1280 -> 1280 each); peft keeps it whole
GPT2_LARGE = [("q, k, v, c_proj (attn)", 1280, 1280), ("c_attn", 1280, 3840),
              ("c_fc", 1280, 5120), ("c_proj (mlp)", 5120, 1280)]  # fmt: skip
SHAPES = {"mistral-7b": MISTRAL, "gpt2-large": GPT2_LARGE}
SMOKE = [("small", 256, 512), ("wide", 512, 1024)]


def ours(lin: nn.Linear):
    """The layer as a run prepares it: dequantized with the threads this machine's kernel
    table chose (runtime/choose.py, class dequant-nf4)."""
    from tunelab.adapt.quantize import NF4Linear
    from tunelab.runtime import choose

    layer = NF4Linear(lin, double_quant=True)
    one = choose.measured()["choice"].get("dequant-nf4") == "one-thread"
    layer.dequant_threads = 1 if one else None
    return layer


def theirs(lin: nn.Linear):
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(
        lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
        compress_statistics=True, quant_type="nf4",
    )  # fmt: skip
    q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4")
    return q.to("cpu") if q.weight.quant_state is None else q


def step_times(layer, x: torch.Tensor, grad: torch.Tensor) -> tuple[float, float]:
    """Seconds of one forward and of its input-gradient backward, under bf16 autocast."""
    x = x.detach().requires_grad_(True)
    with torch.autocast("cpu", torch.bfloat16):
        t = time.perf_counter()
        y = layer(x)
        forward = time.perf_counter() - t
    t = time.perf_counter()
    y.backward(grad.to(y.dtype))
    return forward, time.perf_counter() - t


def measure(shapes, tokens: int, runs: int, bnb: bool) -> list[dict]:
    rows = []
    for name, d_in, d_out in shapes:
        torch.manual_seed(0)
        lin = nn.Linear(d_in, d_out, bias=False).to(torch.bfloat16)
        sides = {"tunelab": ours(lin)}
        if bnb:
            sides["bitsandbytes"] = theirs(lin)
        x, grad = torch.randn(tokens, d_in), torch.randn(tokens, d_out)
        times: dict[str, list] = {k: [] for k in sides}
        for layer in sides.values():  # warm-up, and bitsandbytes quantizes on first use
            step_times(layer, x, grad)
        for r in range(runs):
            for k in sides if r % 2 == 0 else reversed(list(sides)):
                times[k].append(step_times(sides[k], x, grad))
        row = dict(name=name, shape=f"{d_in} -> {d_out}")
        for k, ts in times.items():
            row[k] = tuple(1000 * statistics.median(t[i] for t in ts) for i in (0, 1))
        rows.append(row)
        print(row, flush=True)
    return rows


def table(rows: list[dict], bnb: bool) -> list[str]:
    lines = [
        "| layers | in -> out | tunelab forward ms | tunelab input grad ms "
        "| bitsandbytes forward ms | bitsandbytes input grad ms | ratio (theirs / ours, both) |",
        "|:---|:---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        f, b = r["tunelab"]
        tf, tb = r.get("bitsandbytes", (float("nan"), float("nan")))
        ratio = f"{(tf + tb) / (f + b):.2f}x" if bnb else "–"
        lines.append(
            f"| {r['name']} | {r['shape']} | {f:.1f} | {b:.1f} | {tf:.1f} | {tb:.1f} | {ratio} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256, help="rows of x (batch x sequence)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--bnb-path", help="folder holding bitsandbytes (an unpacked wheel)")
    ap.add_argument("--smoke", action="store_true", help="small shapes, one run")
    ap.add_argument("--no-write", action="store_true", help="print only")
    a = ap.parse_args(argv)
    if a.bnb_path:
        sys.path.insert(0, a.bnb_path)
    try:
        import bitsandbytes  # noqa: F401

        bnb = True
    except ImportError:
        bnb = False
    runs = 1 if a.smoke else a.runs
    libs = ("bitsandbytes",) if bnb else ()
    sitting = common.Sitting(common.command_line("nf4.py", argv), libs)
    tokens = 16 if a.smoke else a.tokens
    layers = [(f"{name}: {n}", k, o) for name in a.shapes for n, k, o in SHAPES[name]]
    rows = measure(SMOKE if a.smoke else layers, tokens, runs, bnb)
    body = "\n".join(
        [
            sitting.preamble(),
            "",
            *table(rows, bnb),
            "",
            f"{tokens} tokens, bf16 autocast, medians of {runs} runs, the sides alternating. "
            "Forward: the layer's output; input grad: backward of the output into x (the frozen "
            "base's share of a QLoRA step: LoRA's own products are not included).",
        ]
    )
    print("\n" + body)
    common.publish(TITLE, body, a.smoke, write=not a.no_write)


if __name__ == "__main__":
    main()
