"""DPO speed: tunelab's align task against TRL's DPOTrainer + peft on the same pairs.

    python bench/dpo.py [--steps 8] [--warmup 2] [--runs 3] [--no-write]
    python bench/dpo.py --smoke     # a tiny random model, 2 steps: keeps the script working

The work, the same on both sides: LoRA (r 16, alpha 32, q_proj and v_proj, no dropout) on
SmolLM2-135M-Instruct (the HF directory gguf_to_hf_dir makes from the embedded GGUF; tunelab
loads that directory too), the sigmoid DPO loss, beta 0.1, no label smoothing, max length 256,
batch 4 pairs, fp32 (no autocast), fused AdamW at a constant learning rate, clipping at 1.0, no
gradient checkpointing, no dropout, no evaluation, no checkpoints, no progress bar. The pairs are
the polite/impolite answers of ../shared/data/preferences/instruction-data-with-preference.json
rendered once here with the chat template into plain prompt/chosen/rejected text (each response
ends at <|im_end|>, the EOS), so both tokenize the same text into the same ids. TRL takes them
in the order of tunelab's seeded batch plan (sequential sampler): the same pairs per batch.

The reference log-probs, compared both ways on both sides: precomputed once over the training
pairs (TRL `precompute_ref_log_probs=True`, tunelab `align.precompute_ref: true`, its default)
and live, computed every step (TRL's default; tunelab with the LoRA layers switched off).

tunelab runs `run_training` with its align task, the path `tunelab align` runs (`Trainer.fit`,
oneDNN linear layers for fp32 compute), with a callback that only reads the clock and the RSS.

TRL 1.16's defaults that change the work, and what this benchmark sets (like for like):
  gradient_checkpointing True (base config)  -> False
  bf16 None -> True unless fp16 (base config) -> bf16=False, fp16=False (fp32 on both sides)
  precompute_ref_log_probs False             -> both ways, one row each
  learning_rate 1e-6, logging_steps 10       -> the bench's lr, constant; logging every step
  disable_dropout True, loss_type ["sigmoid"], beta 0.1, label_smoothing 0, use_weighting False,
  padding_free False, pad_to_multiple_of "auto" (no padding off Neuron), max_length 1024,
  truncation keep_start, sync_ref_model False, optim adamw_torch_fused, seed 42, random sampler
                                             -> all set explicitly (max length 256, sequential)
The row "TRL as its defaults ship" leaves gradient_checkpointing, bf16/fp16 and
precompute_ref_log_probs at TRL's defaults (on, on, off), the rest as above.

Process environment: tunelab as shipped (the glibc settings the `tunelab` command restarts
with, src/tunelab/allocator.py) and, for the precomputed setting, with glibc's defaults
(TUNELAB_MALLOC=0); TRL with glibc's defaults. Tokens/s counts what TRL counts, the tokens of
prompt + chosen and prompt + rejected of every pair, for both. Each row: the median of --runs
runs in alternating order, range in brackets. The section goes to '## DPO' in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py)
from dpo_workers import HANDLERS, LORA, MODEL, render_pairs  # noqa: E402  (bench/dpo_workers.py)
from measure import batch_plan  # noqa: E402  (the same step meter as bench/train.py)

DATA = common.SHARED / "preferences" / "instruction-data-with-preference.json"
TITLE = "DPO"
# variant -> (worker, environment, precompute, label)
VARIANTS = {
    "trl-live": ("trl", "reference", False, "TRL DPOTrainer, reference each step"),
    "trl-pre": ("trl", "reference", True, "TRL DPOTrainer, precompute_ref_log_probs=True"),
    "tunelab-live": ("tunelab", "shipped", False, "tunelab align, reference each step (LoRA off)"),
    "tunelab-pre": ("tunelab", "shipped", True, "tunelab align, precomputed reference (default)"),
    "tunelab-pre-glibc": ("tunelab", "glibc", True, "tunelab align, precomputed, glibc defaults"),
    "trl-defaults": ("trl", "reference", False, "TRL DPOTrainer as its defaults ship"),
}


def run_one(variant: str, job: dict, in_process: bool) -> dict:
    worker, environment, precompute, _ = VARIANTS[variant]
    job = dict(
        job, precompute=precompute, trl_mode="defaults" if variant == "trl-defaults" else "same"
    )
    if in_process:
        return dict(HANDLERS[worker](job), environment=environment)
    return common.spawn(__file__, worker, job, environment)


def table(runs: dict) -> str:
    lines = [
        "| setting | tok/s, timed steps | precompute s | tok/s incl. precompute, all steps "
        "| training peak RSS (MiB) | process peak RSS (MiB) | loss first → last |",
        "|:---|---:|---:|---:|---:|---:|:---|",
    ]
    for key, ms in runs.items():
        m, label = ms[len(ms) // 2], VARIANTS[key][3]
        if "settings" in m:
            label += f" ({', '.join(f'{k}={v}' for k, v in m['settings'].items())})"
        pre = common.spread([x["precompute_s"] for x in ms]) if VARIANTS[key][2] else "–"
        lines.append(
            f"| {label} | {common.spread([x['steady'] for x in ms])} | {pre} "
            f"| {common.spread([x['end_to_end'] for x in ms])} "
            f"| {common.median_of(ms, 'train_peak_mb'):.0f} "
            f"| {common.median_of(ms, 'peak_rss_mb'):.0f} "
            f"| {m['first_loss']:.3f} → {m['last_loss']:.3f} |"
        )
    return "\n".join(lines)


def ratios(runs: dict) -> str:
    """tunelab over TRL, like for like, on the end-to-end tok/s (precomputation included)."""
    out = []
    for ours, theirs, what in (
        ("tunelab-pre", "trl-pre", "both precomputed"),
        ("tunelab-live", "trl-live", "both live"),
        ("tunelab-pre", "trl-defaults", "tunelab's default against TRL's defaults"),
    ):
        if ours in runs and theirs in runs:
            r = common.median_of(runs[ours], "end_to_end") / common.median_of(
                runs[theirs], "end_to_end"
            )
            out.append(f"{what} **{r:.2f}x**")
    return "tunelab / TRL, tok/s incl. precompute: " + "; ".join(out) + "." if out else ""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3, help="runs per setting (median and range)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument(
        "--data", default=str(DATA), help="preference JSON (instruction, chosen, rejected)"
    )
    ap.add_argument("--smoke", action="store_true", help="tiny random model, 2 steps, no docs")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    ap.add_argument("--worker", choices=list(HANDLERS), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return common.worker_main(HANDLERS, a.worker)
    with tempfile.TemporaryDirectory(prefix="bench-dpo-smoke-") as tmp:
        run(a, argv, Path(tmp))


def run(a, argv, tmp: Path) -> None:
    sitting = common.Sitting(common.command_line("dpo.py", argv), ("transformers", "trl", "peft"))
    data = Path(a.data)
    if a.smoke:
        a.steps, a.warmup, a.runs, a.batch = 1, 1, 1, 2
        a.variants = [v for v in a.variants if v not in ("tunelab-pre-glibc", "trl-live")]
        model_dir = str(common.tiny_causal_dir(tmp))
        pairs = [
            {
                "instruction": f"Say hello to person {i}.",
                "input": "",
                "chosen": f"Hello, dear person {i}! How are you?",
                "rejected": f"Hi {i}.",
            }
            for i in range(8)
        ]
        data = tmp / "pairs.json"
        data.write_text(json.dumps(pairs))
    else:
        model_dir = str(common.smollm2_dir())
    if not data.is_file():
        raise SystemExit(f"{data}: preference data not found (../shared/data/preferences)")
    rows = render_pairs(model_dir, (a.warmup + a.steps) * a.batch, data)
    job = dict(
        model=model_dir,
        rows=rows,
        steps=a.steps,
        warmup=a.warmup,
        lr=a.lr,
        beta=a.beta,
        seq_len=a.seq_len,
        batch=a.batch,
        seed=0,
        plan=batch_plan(len(rows), a.batch, 0, a.warmup + a.steps),
    )
    runs: dict[str, list[dict]] = {k: [] for k in a.variants}
    for key in common.alternating(a.variants, a.runs):
        runs[key].append(m := run_one(key, job, a.smoke))
        print(
            f"{VARIANTS[key][3]}: {m['steady']:.1f} tok/s timed, {m['end_to_end']:.1f} tok/s "
            f"incl. precompute ({m['precompute_s']:.1f} s)",
            flush=True,
        )
    for ms in runs.values():  # sorted by end-to-end tok/s: the middle one is the median
        ms.sort(key=lambda m: m["end_to_end"])
    same = len({json.dumps(ms[0]["batch_tokens"]) for ms in runs.values()}) == 1
    body = "\n".join(
        [
            sitting.preamble(),
            "",
            f"Work: {MODEL}, LoRA r {LORA['r']} alpha {LORA['alpha']} on q_proj and v_proj, sigmoid "
            f"DPO beta {a.beta}, max length {a.seq_len}, batch {a.batch} pairs, fp32 (no autocast), "
            f"fused AdamW lr {a.lr:g} constant, clip 1.0, no gradient checkpointing (except where a "
            f"row says so); the first {len(rows)} usable pairs of {data.name} rendered with the chat "
            f"template, in tunelab's seeded batch order on both sides; {a.steps} timed steps after "
            f"{a.warmup} untimed; every run in its own process; median of {a.runs} runs in "
            "alternating order, range in brackets.",
            "",
            table(runs),
            "",
            ratios(runs),
            "",
            "Tokens are TRL's count for both: prompt + chosen and prompt + rejected of each pair "
            + (
                "(identical per batch in every row)."
                if same
                else "(the per-batch counts differ between rows: check the tokenization)."
            )
            + " Timed steps: the steps after the warm-up over their wall time. Incl. precompute: "
            "every step's tokens over the wall time of all steps plus the reference precomputation "
            "over the same pairs (model loading and tokenization are left out of both). tunelab runs "
            "`run_training` with its align task (the `tunelab align` path, `Trainer.fit`); each pair "
            "is one row [prompt, chosen, rejected] with a tree-shaped attention mask, so the prompt "
            "is computed once per pair instead of twice. TRL rows set gradient_checkpointing=False "
            'and bf16=False, fp16=False explicitly; "as its defaults ship" leaves those and '
            "precompute_ref_log_probs at TRL 1.16's defaults (read back from its config, in "
            'brackets). tunelab "glibc defaults": TUNELAB_MALLOC=0, without the allocator settings '
            "the `tunelab` command starts with. Losses match at the first step (log 2: the policy "
            "equals the reference) and differ after by LoRA's random init.",
        ]
    )
    print("\n" + table(runs) + "\n\n" + ratios(runs))
    if a.smoke:
        print("\n" + body)
    common.publish(TITLE, body, a.smoke, not a.no_write)


if __name__ == "__main__":
    main()
