"""Training speed and memory: tunelab against transformers + TRL's SFTTrainer, same SFT work.

    python bench/train.py [--steps 20] [--precisions fp32 bf16] [--methods full lora-qv ...]
                          [--runs 1] [--no-write]

Both fine-tune every weight of SmolLM2-135M-Instruct (the HF directory gguf_to_hf_dir makes from
the embedded GGUF; tunelab loads that directory too) on the Alpaca-style instruction set in
../shared/data/instructions, rendered with the model's chat template, loss on the responses only:
sequence length 256, batch 4, no accumulation, no packing, dynamic padding to the longest row,
AdamW at a constant learning rate, clipping at 1.0, no evaluation, no checkpoints. TRL gets the
records in the order tunelab's seeded batch plan takes them (sequential sampler), so both see
the same examples in the same batches. Each framework runs in its own subprocess, so peak RSS
(ru_maxrss) is its own; the first --warmup steps are not timed. Tokens/s counts real (non-pad)
tokens: the attention-mask sum of each batch. MFU = 6 x params x tokens/s over the fp32 matmul
peak measured here, the faster of torch.mm and oneDNN's linear (4 x params for LoRA and QLoRA:
frozen weights need no weight gradient). Methods: full; lora-qv and lora-all (r 16, alpha 32, no dropout, on q_proj/v_proj or
every linear layer of the blocks) against peft's LoraConfig with the same settings; qlora (NF4
base, LoRA on every linear layer) runs for tunelab alone: peft's QLoRA needs bitsandbytes, whose
4-bit layers want a GPU. Training peak RSS resets the process's high-water mark once the model
is loaded and adapted (/proc/self/clear_refs), so it shows what training holds, not the fp32
load that QLoRA quantizes away. The table goes to the '## Training' section of
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import workers  # bench/, beside this script

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "instructions" / "instruction-data.json"
DOC = ROOT / "docs" / "BENCHMARKS.md"
MODEL = "smollm2-135m-instruct"
HEADER = """# Benchmarks

How the figures are measured: tunelab and the reference library run in the same process, on the
same inputs, alternating run by run; each figure is the median of several runs after a warm-up.
Each section names its machine (CPU count and model, torch and library versions) and its date;
compare figures only within one section. Re-run the script a section names to refresh it.
"""


PEAK_BEFORE_RESET = [0.0]


def peak_rss_mb() -> float:
    """The process's peak RSS from its start. Not ru_maxrss: Linux carries the parent's peak
    into a spawned child's ru_maxrss (and the parent converted the GGUF)."""
    return max(train_peak_mb(), PEAK_BEFORE_RESET[0])


def reset_peak() -> None:
    """Start a new RSS high-water mark (Linux >= 4.0): train_peak_mb() then tracks from here.
    Resetting also resets ru_maxrss, so the process peak so far is kept aside first."""
    import gc

    gc.collect()
    PEAK_BEFORE_RESET[0] = peak_rss_mb()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: train_peak_mb() then reports the process peak


def train_peak_mb() -> float:
    """This process's RSS high-water mark (VmHWM) since its start or the last reset_peak()."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# name -> (tunelab method options, peft target_modules or None for full)
METHODS = {
    "full": ({}, None),
    "lora-qv": ({"name": "lora", "targets": "q_proj,v_proj"}, ["q_proj", "v_proj"]),
    "lora-all": ({"name": "lora", "targets": "all-linear"}, "all-linear"),
    "qlora": ({"name": "qlora", "targets": "all-linear", "bits": "nf4"}, None),
}
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}


def hf_dir() -> Path:
    """The HF-layout directory converted (once, cached) from the embedded SmolLM2 GGUF."""
    from tunelab.hub import KNOWN, resolve
    from tunelab.model.gguf import gguf_to_hf_dir

    return gguf_to_hf_dir(resolve(MODEL)) if KNOWN[MODEL].package else resolve(MODEL)


def batch_plan(n_records: int, batch: int, seed: int, steps: int) -> list[list[int]]:
    """Record indices of the first `steps` batches tunelab's Batches takes (all records train)."""
    from tunelab.data.batching import Batches

    dummy = [{"input_ids": [0]}] * n_records
    b = Batches(dummy, batch, pad_id=0, seed=seed)
    plan, epoch = [], 0
    while len(plan) < steps:
        plan += b.plan(epoch)
        epoch += 1
    return plan[:steps]


# -- workers: one framework per process ---------------------------------------------------------
def worker_tunelab(a: dict) -> dict:
    import torch

    from tunelab.adapt import apply_method
    from tunelab.train.config import load_config
    from tunelab.train.loop import Trainer
    from tunelab.train.objectives import causal_lm
    from tunelab.train.run import build_data, load_for_training, prepare_run_dir

    total = a["warmup"] + a["steps"]
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        cfg = load_config(None, {
            "task": "finetune", "model": a["model"], "data.path": a["data"],
            "data.val_fraction": 0.0, "train.seq_len": a["seq_len"],
            "train.batch_size": a["batch"], "train.grad_accum": 1, "train.max_steps": total,
            "train.lr": a["lr"], "train.warmup_steps": 0, "train.schedule": "constant",
            "train.weight_decay": 0.0, "train.clip": 1.0, "train.precision": a["precision"],
            "train.device": "cpu", "train.seed": a["seed"], "out": tmp,
            **{f"method.{k}": v for k, v in method_options(a["method"]).items()},
        })  # fmt: skip
        run_dir = prepare_run_dir(cfg)
        torch.manual_seed(cfg.train.seed)
        model, tokenizer = load_for_training(cfg, torch.device("cpu"))
        callbacks = apply_method(model, cfg.method)
        train_b, _, stats = build_data(cfg, tokenizer, "auto")
        if stats["train_examples"] != a["n_records"]:
            raise SystemExit(f"tunelab kept {stats['train_examples']} of {a['n_records']} "
                             "records, so TRL's batch order would not match")  # fmt: skip
        trainer = Trainer(model, causal_lm, train_b, cfg.train, run_dir, total, callbacks=callbacks)
        real, padded, marks = [], [], []
        reset_peak()
        collate = train_b.collate_fn

        def counting(examples):
            batch = collate(examples)
            real.append(int(batch["attention_mask"].sum()))
            padded.append(batch["attention_mask"].numel())
            return batch

        train_b.collate_fn = counting
        losses = []
        for _ in range(total):
            losses.append(trainer.train_step()["loss"])
            marks.append(time.perf_counter())
        params = count_params(model)
    return result(a, real, padded, marks, losses, params)


def method_options(method: str) -> dict:
    options, _ = METHODS[method]
    return {**options, **LORA} if options else {}


def count_params(model) -> dict:
    """Base (frozen or not, quantized or not) and trainable parameter counts; the LoRA factors
    are not base parameters."""
    from tunelab.adapt.estimate import param_report

    report = param_report(model)  # counts NF4 weights (buffers) too, tied weights once
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return {"base": report["total_params"] - lora, "trainable": report["trainable_params"]}


def worker_trl(a: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tunelab.data.templates import instruction_messages

    total = a["warmup"] + a["steps"]
    records = json.loads(Path(a["data"]).read_text())
    rows = []
    for i in (i for batch in a["plan"] for i in batch):
        r = records[i]
        user, answer = instruction_messages(r["instruction"], r.get("input") or "", r["output"])
        rows.append({"prompt": [user], "completion": [answer]})
    torch.manual_seed(a["seed"])
    model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(a["model"])
    marks, rss = [], []

    peft_config = None
    if METHODS[a["method"]][1] is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                                 lora_dropout=LORA["dropout"], bias="none", task_type="CAUSAL_LM",
                                 target_modules=METHODS[a["method"]][1])  # fmt: skip

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            reset_peak()

        def on_step_end(self, args, state, control, **kw):
            marks.append(time.perf_counter())
            rss.append((peak_rss_mb(), train_peak_mb()))

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        args = SFTConfig(
            output_dir=tmp, max_length=a["seq_len"], per_device_train_batch_size=a["batch"],
            gradient_accumulation_steps=1, max_steps=total, learning_rate=a["lr"],
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            packing=False, padding_free=False, completion_only_loss=True,
            bf16=a["precision"] == "bf16", use_cpu=True, report_to="none", logging_steps=1,
            save_strategy="no", eval_strategy="no", dataloader_num_workers=0, seed=a["seed"],
            train_sampling_strategy="sequential", shuffle_dataset=False, disable_tqdm=True,
        )  # fmt: skip
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, callbacks=[Clock()],
                             peft_config=peft_config)  # fmt: skip
        real, padded, collate = [], [], trainer.data_collator

        def counting(examples):
            batch = collate(examples)
            real.append(int(batch["attention_mask"].sum()))
            padded.append(batch["attention_mask"].numel())
            return batch

        trainer.data_collator = counting
        out = trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        params = count_params(trainer.model)
        del out
    r = result(a, real[:total], padded[:total], marks, losses, params)
    # at the end of the last timed step, before train() tidies up
    r["peak_rss_mb"], r["train_peak_mb"] = rss[-1]
    return r


def result(a, real, padded, marks, losses, params) -> dict:
    w, total = a["warmup"], a["warmup"] + a["steps"]
    if len(real) < total or len(marks) < total:
        raise SystemExit(f"saw {len(real)} batches and {len(marks)} steps, expected {total}")
    seconds = marks[total - 1] - marks[w - 1] if w else marks[total - 1] - marks[0]
    timed = real[w:total] if w else real[1:total]
    return dict(tokens_per_s=sum(timed) / seconds, seconds=seconds,
                real_per_batch=statistics.mean(real[:total]),
                padded_per_batch=statistics.mean(padded[:total]), peak_rss_mb=peak_rss_mb(),
                train_peak_mb=train_peak_mb(), load_peak_mb=PEAK_BEFORE_RESET[0],
                first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
                params=params, batch_tokens=real[:total])  # fmt: skip


# -- the parent: machine peak, subprocesses, the table ---------------------------------------------
def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """Best fp32 GFLOP/s of an n x n x n product here, by torch.mm (MKL in torch's CPU build)
    or by oneDNN's linear (tunelab's kernels.py), whichever is faster on this machine."""
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


def machine() -> str:
    import torch
    import transformers
    import trl

    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor() or model
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpus} CPUs ({model}), {torch.get_num_threads()} torch threads; "
            f"torch {torch.__version__}, transformers {transformers.__version__}, "
            f"trl {trl.__version__}")  # fmt: skip


def spawn(name: str, a: dict) -> dict:
    return workers.spawn(__file__, name, a)


def table(rows: list[dict], peak: float) -> str:
    lines = ["| method | precision | framework | trainable | real tok/s | MFU | training peak RSS "
             "(MiB) | process peak RSS (MiB) | real tok/batch | loss first → last |",
             "|:---|:---|:---|---:|---:|---:|---:|---:|---:|:---|"]  # fmt: skip
    for r in rows:
        flops = 6 if r["method"] == "full" else 4  # frozen weights: no weight gradients
        for name, label in (("ours", "tunelab"), ("theirs", "TRL SFTTrainer")):
            m = r.get(name)
            if m is None:
                continue
            mfu = flops * m["params"]["base"] * m["tokens_per_s"] / (peak * 1e9)
            lines.append(f"| {r['method']} | {r['precision']} | {label} "
                         f"| {m['params']['trainable'] / 1e6:.2f}M | {m['tokens_per_s']:.1f} "
                         f"| {mfu:.1%} | {m['train_peak_mb']:.0f} | {m['peak_rss_mb']:.0f} "
                         f"| {m['real_per_batch']:.1f} "
                         f"| {m['first_loss']:.3f} → {m['last_loss']:.3f} |")  # fmt: skip
        o, t = r["ours"], r.get("theirs")
        if t is not None:
            lines.append(f"| {r['method']} | {r['precision']} | **ratio** | "
                         f"| **{o['tokens_per_s'] / t['tokens_per_s']:.2f}x** | "
                         f"| **{o['train_peak_mb'] / t['train_peak_mb']:.2f}x** "
                         f"| {o['peak_rss_mb'] / t['peak_rss_mb']:.2f}x "
                         f"| {o['real_per_batch'] / t['real_per_batch']:.2f}x | |")  # fmt: skip
    return "\n".join(lines)


def write_section(body: str) -> None:
    """Replace (or add) the '## Training' section of docs/BENCHMARKS.md, keeping the others."""
    text = DOC.read_text() if DOC.exists() else HEADER
    section = f"## Training\n\n{body.strip()}\n"
    pattern = re.compile(r"^## Training\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s, with the median peak RSS of the runs."""
    best = sorted(runs, key=lambda m: m["tokens_per_s"])[len(runs) // 2]
    return dict(best, **{k: statistics.median(m[k] for m in runs)
                         for k in ("peak_rss_mb", "train_peak_mb")})  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["full"],
        choices=list(METHODS),
        help="full fine-tuning, LoRA on q/v or every linear layer, QLoRA (NF4)",
    )
    ap.add_argument("--runs", type=int, default=1, help="runs per framework (median tok/s)")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument(
        "--data", default=str(DATA), help="Alpaca-style JSON (instruction/input/output)"
    )
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    ap.add_argument("--worker", choices=["tunelab", "trl"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        job = json.loads(sys.stdin.read())
        out = (worker_tunelab if a.worker == "tunelab" else worker_trl)(job)
        print("RESULT " + json.dumps(out), flush=True)
        return
    data = Path(a.data)
    if not data.is_file():
        raise SystemExit(f"{data}: instruction data not found; this benchmark reads the shared "
                         "Alpaca-style set at ../shared/data/instructions/instruction-data.json "
                         "(or pass --data PATH)")  # fmt: skip
    n_records = len(json.loads(data.read_text()))
    model_dir = str(hf_dir())
    peak = matmul_peak()
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s", flush=True)
    load = os.getloadavg()[0]
    job = dict(model=model_dir, data=str(data.resolve()), n_records=n_records, steps=a.steps,
               warmup=a.warmup, lr=a.lr, seq_len=a.seq_len, batch=a.batch, seed=0,
               plan=batch_plan(n_records, a.batch, 0, a.warmup + a.steps))  # fmt: skip
    rows = []
    for method in a.methods:
        names = ("ours", "theirs") if method != "qlora" else ("ours",)
        for precision in a.precisions:
            runs: dict[str, list[dict]] = {n: [] for n in names}
            for r in range(a.runs):  # alternate who goes first, so drift in load evens out
                for name in names if r % 2 == 0 else names[::-1]:
                    m = spawn("tunelab" if name == "ours" else "trl",
                              dict(job, precision=precision, method=method))  # fmt: skip
                    runs[name].append(m)
                    print(f"{method} {precision} {'tunelab' if name == 'ours' else 'TRL'}: "
                          f"{m['tokens_per_s']:.1f} real tok/s, training peak RSS "
                          f"{m['train_peak_mb']:.0f} MiB, {m['real_per_batch']:.1f} real "
                          "tok/batch", flush=True)  # fmt: skip
            rows.append(dict(method=method, precision=precision,
                             **{n: median_run(v) for n, v in runs.items()}))  # fmt: skip
    peak = max(peak, matmul_peak())  # again after: a busy machine lowers the first measurement
    params = rows[0]["ours"]["params"]["base"]
    same = all(
        r["ours"]["batch_tokens"] == r["theirs"]["batch_tokens"] for r in rows if "theirs" in r
    )
    body = "\n".join([
        f"`python bench/train.py --steps {a.steps} --precisions {' '.join(a.precisions)} "
        f"--methods {' '.join(a.methods)} --runs {a.runs}` on {datetime.date.today()}: {MODEL} "
        f"({params / 1e6:.1f}M parameters), {', '.join(a.methods)} "
        f"on the {n_records} records of instructions/instruction-data.json "
        f"(chat template, loss on responses), seq len {a.seq_len}, batch {a.batch}, grad accum 1, "
        f"no packing, dynamic padding, AdamW lr {a.lr:g} constant, clip 1.0, no evaluation; "
        f"{a.steps} timed steps after {a.warmup} untimed; each framework in its own process"
        + (f", median of {a.runs} runs" if a.runs > 1 else "") + ".",
        "",
        f"Machine: {machine()}; fp32 matmul peak {peak:.0f} GFLOP/s (2048³, the faster of torch.mm and oneDNN, best of 10 before and after). "
        f"Load average {load:.2f} before, {os.getloadavg()[0]:.2f} after.",
        "",
        table(rows, peak),
        "",
        "Real tok/s: attention-mask (non-pad) tokens of the timed steps over their wall time. "
        "Training peak RSS: the process's high-water mark from the start of training (model "
        "loaded and adapted, high-water mark reset) to the end of the last timed step; process "
        "peak RSS: over the whole process (model loading, libraries). tunelab's worker runs "
        "with the glibc settings the tunelab command starts with (src/tunelab/allocator.py: "
        "freed memory is kept for reuse, which saves ~200k page faults a step here); TRL's "
        "with glibc's defaults, as its users get them. MFU: 6 × "
        "parameters × real tok/s (4 × for LoRA and QLoRA, whose frozen weights take no weight "
        "gradient) over the fp32 matmul peak (bf16 rows too). LoRA: r "
        f"{LORA['r']}, alpha {LORA['alpha']:g}, dropout {LORA['dropout']:g}; peft's LoraConfig with "
        "the same settings for TRL; lora-qv adapts q_proj and v_proj, lora-all every linear layer "
        "of the blocks; qlora stores those in NF4 (double quantization) and runs for tunelab "
        "alone (peft's QLoRA needs bitsandbytes' GPU kernels). Both take the same records in the "
        "same batches"
        + (" (identical real tokens per batch)." if same else
           " (their tokenizations differ slightly in length).")
        + " Their losses differ by design: TRL also trains on the newline the chat template puts "
        "after <|im_end|> (one more target per example); tunelab stops at the end-of-turn token.",
    ])  # fmt: skip
    print("\n" + table(rows, peak))
    if not a.no_write:
        write_section(body)
        print(f"\nwritten to {DOC}")


if __name__ == "__main__":
    main()
