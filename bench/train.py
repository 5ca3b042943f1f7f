"""Training speed and memory: tunelab against transformers + TRL's SFTTrainer, same SFT work.

    python bench/train.py [--steps 20] [--warmup 2] [--runs 3] [--precisions fp32 bf16]
                          [--methods full lora-qv lora-all qlora] [--no-write]
    python bench/train.py --profile     # per-op profile of one tunelab full-fine-tuning step
    python bench/train.py --smoke       # a tiny random model, 2 steps: keeps the script working

The work, the same on both sides: fine-tune SmolLM2-135M-Instruct (the HF directory
gguf_to_hf_dir makes from the embedded GGUF; tunelab loads that directory too) on the
Alpaca-style set ../shared/data/instructions, rendered with the model's chat template, loss on
the responses only; sequence length 256 (cut at the end), batch 4, no accumulation, no packing,
dynamic padding to the longest row (no pad-to-multiple), fused AdamW (betas 0.9/0.999, eps 1e-8,
no weight decay) at a constant learning rate, clipping at 1.0, no gradient (activation)
checkpointing, no dropout, no evaluation, no checkpoints, no progress bar, loss logged every step.
TRL gets the records in the order tunelab's seeded batch plan takes them (sequential sampler),
so both see the same examples in the same batches (checked: identical real tokens per batch).

tunelab runs the path the `tunelab finetune` command runs: `run_training` (loading, method,
data, `Trainer.fit`, which enters the oneDNN context for fp32 compute), with a loop callback
that only reads the clock, the token count and the RSS high-water mark at the start of each
step. It runs warmup + steps + 1 steps, so the end of the last timed step is marked before the
final checkpoint is written (untimed, as TRL's save_strategy="no" writes none).

TRL 1.16's defaults that change the work, and what this benchmark sets (like for like):
  gradient_checkpointing True (base config)  -> False (a second forward per step otherwise)
  bf16 None -> True unless fp16 (base config) -> set explicitly per precision row
  logging_steps 10 (base config)             -> 1 (tunelab logs every step too)
  learning_rate 2e-5, lr_scheduler linear    -> the bench's lr, constant, no warmup
  max_length 1024, truncation keep_start     -> 256, keep_start (tunelab cuts the end too)
  completion_only_loss None (-> True for prompt/completion rows), assistant_only_loss False,
  loss_type "nll"                            -> set explicitly to those values
  packing False, padding_free False, pad_to_multiple_of "auto" (no padding off Neuron)
                                             -> False, False, None
  optim adamw_torch_fused (transformers on torch >= 2.8), weight_decay 0, max_grad_norm 1.0,
  seed 42, train_sampling_strategy random, activation_offloading False, use_liger_kernel False,
  torch_compile False                        -> all set explicitly (fused AdamW, sequential)
The row "TRL as its defaults ship" leaves gradient_checkpointing and bf16/fp16 at TRL's
defaults (both on) and keeps the rest of the work as above: what a TRL user gets.

Precisions: fp32 (tunelab precision fp32, autocast off; TRL bf16=False, fp16=False) and bf16
(fp32 weights with bf16 autocast on both sides: tunelab precision fp32 + autocast bf16, TRL
bf16=True, which autocasts over the fp32 model). Methods: full; lora-qv and lora-all (r 16,
alpha 32, no dropout, on q_proj/v_proj or every linear layer of the blocks) against peft's
LoraConfig with the same settings; qlora (NF4 base, LoRA on every linear layer) runs for
tunelab alone: peft's QLoRA needs bitsandbytes, whose 4-bit layers want a GPU.

Process environment: each run is its own process. tunelab "as shipped" gets the glibc settings
the `tunelab` command restarts itself with (src/tunelab/allocator.py); "glibc defaults" runs
tunelab without them (TUNELAB_MALLOC=0), so the allocator's share is the difference of the two
rows; TRL runs with glibc's defaults, as its users get them. Training peak RSS resets the
process's high-water mark at the first step (model loaded and adapted, optimizer built) and
reads it at the end of the last timed step. Real tok/s counts non-pad tokens (the
attention-mask sum) of the timed steps over their wall time. MFU = 6 x params x tokens/s over
the fp32 matmul peak measured here (4 x for LoRA and QLoRA: frozen weights take no weight
gradient). Each row is the median of --runs runs, taken in alternating order, with the range.
The table goes to the '## Training' section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py)
from measure import batch_plan  # noqa: E402
from train_workers import HANDLERS, METHODS, PRECISIONS  # noqa: E402  (what each process runs)

DATA = common.SHARED / "instructions" / "instruction-data.json"
MODEL = "smollm2-135m-instruct"
TITLE = "Training"
# variant -> (worker, environment, label)
VARIANTS = {
    "tunelab": ("tunelab", "shipped", "tunelab (as shipped)"),
    "tunelab-glibc": ("tunelab", "glibc", "tunelab, glibc defaults"),
    "trl": ("trl", "reference", "TRL SFTTrainer, same work"),
    "trl-defaults": ("trl", "reference", "TRL as its defaults ship"),
}


# -- the parent: machine peak, subprocesses, the table ---------------------------------------------
def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """Best fp32 GFLOP/s of an n x n x n product here, by torch.mm or oneDNN's linear."""
    import torch

    from tunelab.kernels import onednn_linear, onednn_works

    x, y = torch.randn(n, n), torch.randn(n, n)
    kernels = [torch.mm] + (
        [lambda a, b: onednn_linear(a, b, None)] if onednn_works(torch.float32) else []
    )
    best = 0.0
    for fn in kernels:
        fn(x, y)
        for _ in range(reps):
            t = time.perf_counter()
            fn(x, y)
            best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def run_one(variant: str, job: dict, in_process: bool) -> dict:
    worker, environment, _ = VARIANTS[variant]
    job = dict(job, trl_mode="defaults" if variant == "trl-defaults" else "same")
    if in_process:
        return dict(HANDLERS[worker](job), environment=environment)
    return common.spawn(__file__, worker, job, environment)


def table(rows: list[dict], peak: float) -> str:
    lines = [
        "| method | precision | framework | trainable | real tok/s, median (range) | MFU "
        "| training peak RSS (MiB) | process peak RSS (MiB) | real tok/batch "
        "| loss first → last |",
        "|:---|:---|:---|---:|---:|---:|---:|---:|---:|:---|",
    ]
    for r in rows:
        flops = 6 if r["method"] == "full" else 4  # frozen weights: no weight gradients
        for variant, runs in r["runs"].items():
            m = runs[len(runs) // 2]
            label = VARIANTS[variant][2]
            if "settings" in m:  # what TRL ran with, read back from its config
                label += f" ({', '.join(f'{k}={v}' for k, v in m['settings'].items())})"
            tps = [x["tokens_per_s"] for x in runs]
            mfu = flops * m["params"]["base"] * statistics.median(tps) / (peak * 1e9)
            lines.append(
                f"| {r['method']} | {r['label']} | {label} "
                f"| {m['params']['trainable'] / 1e6:.2f}M | {common.spread(tps)} | {mfu:.1%} "
                f"| {common.median_of(runs, 'train_peak_mb'):.0f} "
                f"| {common.median_of(runs, 'peak_rss_mb'):.0f} | {m['real_per_batch']:.1f} "
                f"| {m['first_loss']:.3f} → {m['last_loss']:.3f} |"
            )
        ours = r["runs"]["tunelab"]
        for variant, what in (("trl", "same work"), ("trl-defaults", "TRL's defaults")):
            if variant not in r["runs"]:
                continue
            theirs = r["runs"][variant]
            speed = common.median_of(ours, "tokens_per_s") / common.median_of(
                theirs, "tokens_per_s"
            )
            mem = common.median_of(ours, "train_peak_mb") / common.median_of(
                theirs, "train_peak_mb"
            )
            low = min(x["tokens_per_s"] for x in ours) / max(x["tokens_per_s"] for x in theirs)
            lines.append(
                f"| {r['method']} | {r['label']} | **tunelab / TRL, {what}** | "
                f"| **{speed:.2f}x** (slowest/fastest {low:.2f}x) | "
                f"| **{mem:.2f}x** | | | |"
            )
    return "\n".join(lines)


def make_data(root: Path, n: int = 12) -> Path:
    """A few Alpaca-style records for the smoke mode (no shared data needed)."""
    words = "the quick brown fox jumps over a lazy dog while birds sing".split()
    records = [
        {
            "instruction": f"Repeat the words {' '.join(words[: 3 + i % 5])}.",
            "input": "" if i % 2 else "slowly",
            "output": " ".join(words[i % 4 : 6 + i % 5]),
        }
        for i in range(n)
    ]
    path = root / "instructions.json"
    path.write_text(json.dumps(records))
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(PRECISIONS))
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["full"],
        choices=list(METHODS),
        help="full fine-tuning, LoRA on q/v or every linear layer, QLoRA (NF4)",
    )
    ap.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help="which rows: tunelab as shipped and with glibc defaults, TRL on the same "
        "work and as its defaults ship (the last once per method, under bf16)",
    )
    ap.add_argument("--runs", type=int, default=3, help="runs per row (median and range)")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument(
        "--data", default=str(DATA), help="Alpaca-style JSON (instruction/input/output)"
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="print a per-op profile (torch.profiler, self CPU time) of one tunelab "
        "full-fine-tuning step after the warm-up, then stop",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny random model, 2 steps, no docs")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    ap.add_argument("--worker", choices=list(HANDLERS), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return common.worker_main(HANDLERS, a.worker)
    with tempfile.TemporaryDirectory(prefix="bench-train-smoke-") as tmp:
        run(a, argv, Path(tmp))


def run(a, argv, tmp: Path) -> None:
    sitting = common.Sitting(common.command_line("train.py", argv), ("transformers", "trl", "peft"))
    if a.smoke:
        a.steps, a.warmup, a.runs, a.seq_len, a.batch = 1, 1, 1, 64, 2
        a.variants = [v for v in a.variants if v != "tunelab-glibc"]  # in-process: same code
        a.precisions = a.precisions[:1]  # TRL's defaults row runs bf16 anyway
        a.data, model_dir = str(make_data(tmp)), str(common.tiny_causal_dir(tmp))
    else:
        model_dir = str(common.smollm2_dir())
    data = Path(a.data)
    if not data.is_file():
        raise SystemExit(
            f"{data}: instruction data not found; this benchmark reads the shared "
            "Alpaca-style set at ../shared/data/instructions/instruction-data.json "
            "(or pass --data PATH)"
        )
    n_records = len(json.loads(data.read_text()))
    job = dict(
        model=model_dir,
        data=str(data.resolve()),
        n_records=n_records,
        steps=a.steps,
        warmup=a.warmup,
        lr=a.lr,
        seq_len=a.seq_len,
        batch=a.batch,
        seed=0,
        plan=batch_plan(n_records, a.batch, 0, a.warmup + a.steps),
    )
    if a.profile:
        profiled = dict(job, method="full", precision=a.precisions[0], profile=True, steps=1)
        m = run_one("tunelab", profiled, in_process=a.smoke)
        print(
            f"tunelab full {a.precisions[0]}, one step after {a.warmup} (of "
            f"{m['real_per_batch']:.0f} real tokens a batch; {m['tokens_per_s']:.1f} tok/s with "
            f"the profiler on), through Trainer.fit:\n{m['profile']}"
        )
        if not a.smoke:
            return
    peak = matmul_peak(256 if a.smoke else 2048, 2 if a.smoke else 10)
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s", flush=True)
    rows = []
    defaults_at = "bf16" if "bf16" in a.precisions else a.precisions[0]
    for method in a.methods:
        for precision in a.precisions:
            names = [v for v in a.variants if method != "qlora" or v.startswith("tunelab")]
            if "trl-defaults" in names and precision != defaults_at:
                names.remove("trl-defaults")  # once per method, beside the bf16 rows it matches
            runs: dict[str, list[dict]] = {n: [] for n in names}
            for variant in common.alternating(names, a.runs):
                m = run_one(variant, dict(job, precision=precision, method=method), a.smoke)
                runs[variant].append(m)
                print(
                    f"{method} {precision} {variant}: {m['tokens_per_s']:.1f} real tok/s, "
                    f"training peak RSS {m['train_peak_mb']:.0f} MiB, "
                    f"{m['real_per_batch']:.1f} real tok/batch",
                    flush=True,
                )
            for variant in runs:  # each row's runs sorted by speed: the middle one is the median
                runs[variant].sort(key=lambda m: m["tokens_per_s"])
            rows.append(
                dict(method=method, precision=precision, label=PRECISIONS[precision][2], runs=runs)
            )
    peak = max(peak, matmul_peak(256 if a.smoke else 2048, 2 if a.smoke else 10))
    same = (
        all(
            x["batch_tokens"] == r["runs"]["tunelab"][0]["batch_tokens"]
            for r in rows
            for v, xs in r["runs"].items()
            if v != "trl-defaults"
            for x in xs
        )
        if all("tunelab" in r["runs"] for r in rows)
        else False
    )
    params = next(iter(rows[0]["runs"].values()))[0]["params"]["base"]
    body = "\n".join(
        [
            sitting.preamble(),
            "",
            f"Work: {MODEL} ({params / 1e6:.1f}M parameters), {', '.join(a.methods)} on the "
            f"{n_records} records of {data.name} (chat template, loss on responses), seq len "
            f"{a.seq_len}, batch {a.batch}, grad accum 1, no packing, dynamic padding, fused AdamW lr "
            f"{a.lr:g} constant, clip 1.0, no gradient checkpointing (except where a row says so), no "
            f"evaluation, no checkpoints; {a.steps} timed steps after {a.warmup} untimed; every run "
            f"in its own process; median of {a.runs} runs in alternating order, range in brackets. "
            f"fp32 matmul peak {peak:.0f} GFLOP/s (2048³, the faster of torch.mm and oneDNN, best of "
            "10 before and after).",
            "",
            table(rows, peak),
            "",
            "tunelab runs `run_training`, the `tunelab finetune` path (`Trainer.fit`: oneDNN linear "
            'layers for fp32 compute, fused AdamW). "As shipped": with the glibc settings the '
            "`tunelab` command restarts itself with (src/tunelab/allocator.py: freed memory kept for "
            'reuse); "glibc defaults": the same with TUNELAB_MALLOC=0, so the difference of the two '
            "rows is the allocator's share. TRL runs with glibc's defaults and every setting that "
            "changes the work set to tunelab's (gradient_checkpointing=False, bf16/fp16 as the row "
            "says, packing and padding-free off, no pad-to-multiple, completion-only loss, fused "
            'AdamW); "as its defaults ship" leaves gradient_checkpointing and bf16 at TRL 1.16\'s '
            "defaults (both on), so it recomputes activations and autocasts to bf16. bf16 rows: fp32 "
            "weights with bf16 autocast on both sides (tunelab --precision fp32 --autocast bf16, TRL "
            "bf16=True). Training peak RSS: the high-water mark from the first step (model loaded "
            "and adapted) to the end of the last timed step; process peak: the whole process. MFU: "
            "6 × parameters × real tok/s (4 × for LoRA and QLoRA) over the fp32 matmul peak, bf16 "
            "rows too. LoRA: r 16, alpha 32, dropout 0, peft's LoraConfig alike; qlora stores the "
            "base in NF4 and runs for tunelab alone (peft's QLoRA needs bitsandbytes' GPU kernels). "
            "Both frameworks take the same records in the same batches"
            + (
                " (identical real tokens per batch)."
                if same
                else " (their per-batch real tokens differ: check the tokenization)."
            )
            + " Their losses differ by design: TRL also trains on the newline the chat template puts "
            "after <|im_end|>; tunelab stops at the end-of-turn token. Per-op profile of a tunelab "
            "step: `python bench/train.py --profile`.",
        ]
    )
    print("\n" + table(rows, peak))
    if a.smoke:
        print("\n" + body)
    common.publish(TITLE, body, a.smoke, not a.no_write)


if __name__ == "__main__":
    main()
