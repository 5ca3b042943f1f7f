"""DPO speed: tunelab's align task against TRL's DPOTrainer + peft on the same pairs.

    python bench/dpo.py [--steps 8] [--warmup 2] [--runs 1] [--no-write]

Both train LoRA (r 16, alpha 32, q_proj and v_proj, no dropout) on SmolLM2-135M-Instruct (the
HF directory gguf_to_hf_dir makes from the embedded GGUF; tunelab loads that directory too)
with the sigmoid DPO loss, beta 0.1, max length 256, batch 4 pairs, fp32, AdamW at a constant
learning rate, clipping at 1.0, no evaluation. The pairs are the polite/impolite answers of
../shared/data/preferences/instruction-data-with-preference.json rendered once here with the
chat template into plain prompt/chosen/rejected text (each response ends at <|im_end|>, the
EOS), so both tokenize the same text into the same ids; both take the first (warmup + steps) x
batch usable pairs in file order. Each framework runs each reference setting in its own
subprocess: the reference recomputed every step (TRL's default) and precomputed once over
those pairs. Tokens/s counts what TRL counts, the tokens of prompt + chosen and prompt +
rejected of every pair (its attention-mask sum), for both. The section goes to '## DPO' in
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

import workers  # bench/, beside this script

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import hf_dir, machine  # noqa: E402  (bench/train.py: the same model and machine line)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "preferences" / "instruction-data-with-preference.json"
DOC = ROOT / "docs" / "BENCHMARKS.md"
MODEL = "smollm2-135m-instruct"
LORA = dict(r=16, alpha=32, targets=["q_proj", "v_proj"])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def render_pairs(model_dir: str, n: int) -> list[dict]:
    """The first n usable pairs as plain text: chat-rendered prompt, responses up to <|im_end|>."""
    from tunelab.data.templates import instruction_messages
    from tunelab.tokenizer.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    rows = []
    for r in json.loads(DATA.read_text()):
        if r["chosen"] == r["rejected"]:
            continue  # no preference signal (6 rows); both frameworks would skip or waste them
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
    raise SystemExit(f"{DATA}: fewer than {n} usable pairs")


# -- workers: one framework and reference setting per process ------------------------------------
def worker_tunelab(a: dict) -> dict:
    import torch

    from tunelab.adapt import apply_method
    from tunelab.evaluate.preference import pair_tokens
    from tunelab.train.align import AlignTask
    from tunelab.train.config import load_config
    from tunelab.train.loop import Trainer
    from tunelab.train.run import load_for_training, prepare_run_dir

    total = a["warmup"] + a["steps"]
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        data = Path(tmp) / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in a["rows"]))
        cfg = load_config(None, {
            "task": "align", "model": a["model"], "data.path": str(data),
            "data.val_fraction": 0.0, "train.seq_len": a["seq_len"], "train.batch_size": a["batch"],
            "train.grad_accum": 1, "train.max_steps": total, "train.lr": a["lr"],
            "train.warmup_steps": 0, "train.schedule": "constant", "train.weight_decay": 0.0,
            "train.clip": 1.0, "train.precision": "fp32", "train.device": "cpu",
            "train.seed": a["seed"], "out": str(Path(tmp) / "run"), "align.beta": a["beta"],
            "align.precompute_ref": a["precompute"], "method.name": "lora",
            "method.r": LORA["r"], "method.alpha": LORA["alpha"], "method.targets": LORA["targets"],
        })  # fmt: skip
        run_dir = prepare_run_dir(cfg)
        torch.manual_seed(cfg.train.seed)
        model, tokenizer = load_for_training(cfg, torch.device("cpu"))
        task = AlignTask()
        model = task.prepare(model, tokenizer, cfg)
        callbacks = apply_method(model, cfg.method)
        train_b, _, stats = task.data(cfg, tokenizer)
        if stats["train_examples"] != len(a["rows"]):
            raise SystemExit(f"tunelab kept {stats['train_examples']} of {len(a['rows'])} pairs")
        train_b.shuffle = False  # file order, as TRL's sequential sampler takes them
        trainer = Trainer(model, task.objective, train_b, cfg.train, run_dir, total,
                          callbacks=callbacks)  # fmt: skip
        tokens, collate = [], train_b.collate_fn

        def counting(examples):
            tokens.append(sum(map(pair_tokens, examples)))
            return collate(examples)

        train_b.collate_fn = counting
        losses, marks = [], [time.perf_counter()]
        for _ in range(total):
            losses.append(trainer.train_step()["loss"])
            marks.append(time.perf_counter())
    return result(a, tokens, marks, losses, task.info["reference_s"] if a["precompute"] else 0.0)


def worker_trl(a: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    total = a["warmup"] + a["steps"]
    torch.manual_seed(a["seed"])
    model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(a["model"])
    marks, spent = [], {"precompute": 0.0}
    original = DPOTrainer._precompute_ref_logps

    def timed(self, *args, **kw):
        t = time.perf_counter()
        out = original(self, *args, **kw)
        spent["precompute"] += time.perf_counter() - t
        return out

    DPOTrainer._precompute_ref_logps = timed

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            marks.append(time.perf_counter())

    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        args = DPOConfig(
            output_dir=tmp, max_length=a["seq_len"], per_device_train_batch_size=a["batch"],
            gradient_accumulation_steps=1, max_steps=total, learning_rate=a["lr"],
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            beta=a["beta"], loss_type=["sigmoid"], precompute_ref_log_probs=a["precompute"],
            use_cpu=True, report_to="none", logging_steps=1, save_strategy="no",
            eval_strategy="no", dataloader_num_workers=0, seed=a["seed"],
            train_sampling_strategy="sequential", disable_tqdm=True,
        )  # fmt: skip
        peft = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                          target_modules=LORA["targets"], task_type="CAUSAL_LM")  # fmt: skip
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(a["rows"]),
                             processing_class=tokenizer, peft_config=peft, callbacks=[Clock()])  # fmt: skip
        tokens, collate = [], trainer.data_collator

        def counting(examples):
            batch = collate(examples)
            tokens.append(int(batch["attention_mask"].sum()))
            return batch

        trainer.data_collator = counting
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return result(a, tokens[:total], marks, losses, spent["precompute"])


def result(a, tokens, marks, losses, precompute_s) -> dict:
    w, total = a["warmup"], a["warmup"] + a["steps"]
    if len(tokens) < total or len(marks) < total + 1:
        raise SystemExit(f"saw {len(tokens)} batches and {len(marks) - 1} steps, expected {total}")
    steady = sum(tokens[w:total]) / (marks[total] - marks[w])
    train_s = marks[total] - marks[0]
    return dict(steady=steady, precompute_s=precompute_s, train_s=train_s,
                end_to_end=sum(tokens[:total]) / (train_s + precompute_s),
                peak_rss_mb=peak_rss_mb(), first_loss=losses[0], last_loss=losses[total - 1],
                batch_tokens=tokens[:total])  # fmt: skip


# -- the parent: subprocesses, the table ----------------------------------------------------------
def spawn(name: str, a: dict) -> dict:
    return workers.spawn(__file__, name, a)


LABELS = {("trl", False): "TRL DPOTrainer, reference each step (default)",
          ("trl", True): "TRL DPOTrainer, precompute_ref_log_probs=True",
          ("tunelab", False): "tunelab align, reference each step (LoRA off)",
          ("tunelab", True): "tunelab align, precomputed reference (default)"}  # fmt: skip


SHARED_NOTE = (
    " The machine was busy with other work during the run (load average above its CPU count), "
    "which slows every figure several-fold and unevenly from one process to the next: take the "
    "ratio as a direction, not a measurement, and re-run on an idle machine."
)


def table(runs: dict) -> str:
    lines = ["| setting | tok/s, timed steps | precompute s | tok/s incl. precompute, all steps "
             "| peak RSS (MiB) | loss first → last |", "|:---|---:|---:|---:|---:|:---|"]  # fmt: skip
    for key, label in LABELS.items():
        m = runs[key]
        pre = f"{m['precompute_s']:.1f}" if key[1] else "–"
        lines.append(f"| {label} | {m['steady']:.1f} | {pre} | {m['end_to_end']:.1f} "
                     f"| {m['peak_rss_mb']:.0f} | {m['first_loss']:.3f} → {m['last_loss']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def write_section(body: str) -> None:
    """Replace (or add at the end) the '## DPO' section of docs/BENCHMARKS.md, keeping the rest."""
    text = DOC.read_text()  # read right before writing: other sections change concurrently
    section = f"## DPO\n\n{body.strip()}\n"
    pattern = re.compile(r"^## DPO\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    DOC.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--runs", type=int, default=1, help="runs per setting (the median is kept)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    ap.add_argument("--worker", choices=["tunelab", "trl"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        job = json.loads(sys.stdin.read())
        out = (worker_tunelab if a.worker == "tunelab" else worker_trl)(job)
        print("RESULT " + json.dumps(out), flush=True)
        return
    if not DATA.is_file():
        raise SystemExit(f"{DATA}: preference data not found (../shared/data/preferences)")
    model_dir = str(hf_dir())
    rows = render_pairs(model_dir, (a.warmup + a.steps) * a.batch)
    job = dict(model=model_dir, rows=rows, steps=a.steps, warmup=a.warmup, lr=a.lr, beta=a.beta,
               seq_len=a.seq_len, batch=a.batch, seed=0)  # fmt: skip
    load, started, all_runs = os.getloadavg()[0], time.time(), {k: [] for k in LABELS}
    order = [("trl", False), ("tunelab", False), ("trl", True), ("tunelab", True)]
    for r in range(a.runs):  # TRL and tunelab alternate, so drift in machine load touches both
        for key in order if r % 2 == 0 else order[::-1]:
            all_runs[key].append(m := spawn(key[0], dict(job, precompute=key[1])))
            print(f"{LABELS[key]}: {m['steady']:.1f} tok/s timed, {m['end_to_end']:.1f} tok/s "
                  f"incl. precompute ({m['precompute_s']:.1f} s)", flush=True)  # fmt: skip
    # the run with the median end-to-end tok/s of each setting
    runs = {k: sorted(v, key=lambda m: m["end_to_end"])[len(v) // 2] for k, v in all_runs.items()}
    same = all(runs[("trl", p)]["batch_tokens"] == runs[("tunelab", p)]["batch_tokens"]
               for p in (False, True))  # fmt: skip
    best_trl = max(runs[("trl", p)]["end_to_end"] for p in (False, True))
    ours = runs[("tunelab", True)]["end_to_end"]
    ratio = ours / best_trl
    verdict = "met" if ratio >= 1.5 else "not met"
    body = "\n".join([
        f"`python bench/dpo.py --steps {a.steps} --warmup {a.warmup} --runs {a.runs}` on "
        f"{datetime.date.today()}: "
        f"{MODEL}, LoRA r {LORA['r']} alpha {LORA['alpha']} on q_proj and v_proj, sigmoid DPO "
        f"beta {a.beta}, max length {a.seq_len}, batch {a.batch} pairs, fp32, AdamW lr {a.lr:g} "
        f"constant, clip 1.0; the first {len(rows)} usable pairs of "
        "preferences/instruction-data-with-preference.json rendered with the chat template, in "
        f"file order; {a.steps} timed steps after {a.warmup} untimed; each setting in its own "
        f"process ({time.time() - started:.0f} s in all"
        + (f"; median of {a.runs} runs by tok/s incl. precompute" if a.runs > 1 else "") + ").",
        "",
        f"Machine: {machine()}. Load average {load:.2f} before, {os.getloadavg()[0]:.2f} after.",
        "",
        table(runs),
        "",
        "Tokens are TRL's count for both: prompt + chosen and prompt + rejected of each pair "
        + ("(identical per batch in both frameworks)." if same else
           "(the frameworks' per-batch counts differ slightly).")
        + " Timed steps: the steps after the warm-up over their wall time. Incl. precompute: "
        "every step's tokens over the wall time of all steps plus the reference precomputation "
        "over the same pairs (model loading and tokenization are left out of both). tunelab runs "
        "each pair as one row [prompt, chosen, rejected] with a tree-shaped attention mask, so the "
        "prompt is computed once per pair instead of twice; its losses match TRL's at the first "
        "step (log 2: the policy equals the reference) and differ after by LoRA's random init.",
        "",
        f"Target (issue 6): ≥ 1.5x TRL's best setting including precomputation: tunelab "
        f"{ours:.1f} tok/s against TRL's best {best_trl:.1f} tok/s = **{ratio:.2f}x**, {verdict}."
        + (SHARED_NOTE if max(load, os.getloadavg()[0]) > (os.cpu_count() or 1) else ""),
    ])  # fmt: skip
    print("\n" + table(runs) + f"\n\nratio {ratio:.2f}x ({verdict})")
    if not a.no_write:
        write_section(body)
        print(f"\nwritten to {DOC}")


if __name__ == "__main__":
    main()
