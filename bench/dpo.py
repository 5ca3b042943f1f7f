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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py)
from measure import Meter, batch_plan, clock, train_counting  # noqa: E402  (the same step meter as bench/train.py)

DATA = common.SHARED / "preferences" / "instruction-data-with-preference.json"
MODEL = "smollm2-135m-instruct"
TITLE = "DPO"
LORA = dict(r=16, alpha=32, targets=["q_proj", "v_proj"])
# variant -> (worker, environment, precompute, label)
VARIANTS = {
    "trl-live": ("trl", "reference", False, "TRL DPOTrainer, reference each step"),
    "trl-pre": ("trl", "reference", True, "TRL DPOTrainer, precompute_ref_log_probs=True"),
    "tunelab-live": ("tunelab", "shipped", False, "tunelab align, reference each step (LoRA off)"),
    "tunelab-pre": ("tunelab", "shipped", True, "tunelab align, precomputed reference (default)"),
    "tunelab-pre-glibc": ("tunelab", "glibc", True, "tunelab align, precomputed, glibc defaults"),
    "trl-defaults": ("trl", "reference", False, "TRL DPOTrainer as its defaults ship"),
}


def render_pairs(model_dir: str, n: int, data: Path) -> list[dict]:
    """The first n usable pairs as plain text: chat-rendered prompt, responses up to <|im_end|>."""
    from tunelab.data.templates import instruction_messages
    from tunelab.tokenizer.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    rows = []
    for r in json.loads(data.read_text()):
        if r["chosen"] == r["rejected"]:
            continue  # no preference signal; both frameworks would skip or waste them
        user = instruction_messages(r["instruction"], r.get("input") or "", "")[:-1]
        prompt = tok.render_chat(user, add_generation_prompt=True)
        row = {"prompt": prompt}
        for side in ("chosen", "rejected"):
            full = tok.render_chat([*user, {"role": "assistant", "content": r[side]}], False)
            response = full[len(prompt) :]
            row[side] = response[: response.rindex("<|im_end|>") + len("<|im_end|>")]
        rows.append(row)
        if len(rows) == n:
            return rows
    raise SystemExit(f"{data}: fewer than {n} usable pairs")


class PairMeter(Meter):
    """The step meter, counting tokens as TRL does (prompt twice, both responses)."""

    def __init__(self, end: int):
        super().__init__(end)
        self.pair_tokens: list[int] = []

    def on_start(self, trainer) -> None:
        from tunelab.data.preference import pair_tokens

        super().on_start(trainer)
        collate = trainer.batches.collate_fn

        def counting(examples):
            self.pair_tokens.append(sum(map(pair_tokens, examples)))
            return collate(examples)

        trainer.batches.collate_fn = counting  # observes the batch, changes nothing in it


# -- workers: one framework and reference setting per process ------------------------------------
def worker_tunelab(a: dict) -> dict:
    from tunelab.train.align import AlignTask
    from tunelab.train.config import load_config
    from tunelab.train.run import run_training

    total = a["warmup"] + a["steps"]
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        data = Path(tmp) / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in a["rows"]))
        cfg = load_config(
            None,
            {
                "task": "align",
                "model": a["model"],
                "data.path": str(data),
                "data.val_fraction": 0.0,
                "train.seq_len": a["seq_len"],
                "train.batch_size": a["batch"],
                "train.grad_accum": 1,
                "train.max_steps": total + 1,
                "train.lr": a["lr"],
                "train.warmup_steps": 0,
                "train.schedule": "constant",
                "train.weight_decay": 0.0,
                "train.clip": 1.0,
                "train.precision": "fp32",
                "train.autocast": "off",
                "train.dropout": 0.0,
                "train.activation_checkpointing": False,
                "train.eval_every": None,
                "train.save_every": None,
                "train.log_every": 1,
                "train.device": "cpu",
                "train.seed": a["seed"],
                "out": str(Path(tmp) / "run"),
                "align.loss": "dpo",
                "align.beta": a["beta"],
                "align.label_smoothing": 0.0,
                "align.precompute_ref": a["precompute"],
                "method.name": "lora",
                "method.r": LORA["r"],
                "method.alpha": LORA["alpha"],
                "method.dropout": 0.0,
                "method.targets": LORA["targets"],
            },
        )
        task, meter = AlignTask(), PairMeter(total)
        summary = run_training(cfg, task=task, callbacks=[meter])
        records = [
            json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()
        ]
    if summary["data"]["train_examples"] != len(a["rows"]):
        raise SystemExit(
            f"tunelab kept {summary['data']['train_examples']} of {len(a['rows'])} pairs"
        )
    losses = [r["loss"] for r in records if "loss" in r and r.get("split") != "val"]
    precompute_s = task.info["reference_s"] if a["precompute"] else 0.0
    out = result(a, meter.pair_tokens, meter.marks, losses, precompute_s)
    out["peak_rss_mb"], out["train_peak_mb"] = meter.peaks
    return out


def worker_trl(a: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    total = a["warmup"] + a["steps"]
    torch.manual_seed(a["seed"])
    model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(a["model"])
    marks, rss, spent = [], [], {"precompute": 0.0}
    original = DPOTrainer._precompute_ref_logps

    def timed(self, *args, **kw):  # the precomputation's wall time, nothing else changed
        t = time.perf_counter()
        out = original(self, *args, **kw)
        spent["precompute"] += time.perf_counter() - t
        return out

    DPOTrainer._precompute_ref_logps = timed

    same = dict(
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        precompute_ref_log_probs=a["precompute"],
    )
    rows = [a["rows"][i] for batch in a["plan"] for i in batch]
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        args = DPOConfig(
            output_dir=tmp,
            max_length=a["seq_len"],
            truncation_mode="keep_start",
            per_device_train_batch_size=a["batch"],
            precompute_ref_batch_size=a["batch"],
            gradient_accumulation_steps=1,
            max_steps=total,
            learning_rate=a["lr"],
            lr_scheduler_type="constant",
            warmup_steps=0,
            optim="adamw_torch_fused",
            adam_beta1=0.9,
            adam_beta2=0.999,
            adam_epsilon=1e-8,
            weight_decay=0.0,
            max_grad_norm=1.0,
            beta=a["beta"],
            loss_type=["sigmoid"],
            label_smoothing=0.0,
            use_weighting=False,
            disable_dropout=True,
            padding_free=False,
            pad_to_multiple_of=None,
            sync_ref_model=False,
            activation_offloading=False,
            use_liger_kernel=False,
            torch_compile=False,
            use_cpu=True,
            report_to="none",
            logging_steps=1,
            save_strategy="no",
            eval_strategy="no",
            dataloader_num_workers=0,
            seed=a["seed"],
            train_sampling_strategy="sequential",
            disable_tqdm=True,
            **({} if a["trl_mode"] == "defaults" else same),
        )
        peft = LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=0.0,
            target_modules=LORA["targets"],
            task_type="CAUSAL_LM",
        )
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=peft,
            callbacks=[clock(marks, rss)],
        )
        tokens, losses = train_counting(trainer)
        settings = {
            k: getattr(args, k)
            for k in ("gradient_checkpointing", "bf16", "precompute_ref_log_probs")
        }
    out = result(a, tokens[-total:], marks, losses, spent["precompute"])
    out["peak_rss_mb"], out["train_peak_mb"] = rss[total - 1]
    out["settings"] = settings
    return out


def result(a, tokens, marks, losses, precompute_s) -> dict:
    """marks[k]: the start of step k (marks[total]: the end of the last timed step)."""
    w, total = a["warmup"], a["warmup"] + a["steps"]
    if len(tokens) < total or len(marks) < total + 1:
        raise SystemExit(f"saw {len(tokens)} batches and {len(marks) - 1} steps, expected {total}")
    steady = sum(tokens[w:total]) / (marks[total] - marks[w])
    train_s = marks[total] - marks[0]
    return dict(
        steady=steady,
        precompute_s=precompute_s,
        train_s=train_s,
        end_to_end=sum(tokens[:total]) / (train_s + precompute_s),
        first_loss=losses[0],
        last_loss=losses[total - 1],
        batch_tokens=tokens[:total],
    )


HANDLERS = {"tunelab": worker_tunelab, "trl": worker_trl}


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
