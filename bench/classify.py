"""Classification on IMDB: MiniLM full fine-tuning (tunelab against HF Trainer, same work),
SmolLM2-135M LoRA, and SmolLM2 0/1/k-shot prompting, measured on held-out reviews.

    python bench/classify.py [--examples 0] [--lr 1e-4] [--speed-steps 20] [--runs 3] [--write]
    python bench/classify.py --smoke    # tiny random models, 2 steps: keeps the script working

MiniLM (all-MiniLM-L6-v2, the embedded HF directory, BERT encoder + its [CLS] pooler + a new
2-way linear head) is fully fine-tuned by both frameworks on identical work: the first
--examples reviews of ../shared/data/imdb/imdb_train_00..02 (a multiple of the batch; by
default as many as tunelab's measured speed trains in 95% of --budget, 300 s), max
length 256 (the text is cut, [CLS]/[SEP] kept), batch 16, dynamic padding to the longest row,
AdamW (fused) lr --lr with linear warmup then linear decay to 0, no weight decay, clip 1.0,
fp32, no evaluation during training, no dropout in the encoder and 0.1 before the head (the
`tunelab classify` default; HF's config gets the same), seed 0. HF Trainer gets the reviews in
the order tunelab's seeded batch plan takes them (sequential sampler), so both see the same
examples in the same batches (checked: identical real tokens per batch). Each framework runs in
its own subprocess. Speed: --runs short runs of --speed-steps timed steps after --warmup untimed
ones, alternating who goes first; samples/s = 16 x timed steps / their wall time (median run,
range in brackets). Memory, in the same speed runs: the training peak RSS (high-water mark reset
at the first step, read at the end of the last timed step) and the process peak, for tunelab as
shipped, tunelab with glibc's defaults (TUNELAB_MALLOC=0, without the allocator settings the
`tunelab` command starts with) and HF Trainer.

tunelab runs `run_training` with the classification task, the path `tunelab classify` runs
(`Trainer.fit`, oneDNN linear layers for fp32 compute); a loop callback only reads the clock,
CPU time and RSS at the start of each step. HF Trainer's settings that change the work are set
explicitly: gradient_checkpointing=False (its default too), bf16=False, fp16=False, fused AdamW
(its default on torch >= 2.8), weight_decay 0, max_grad_norm 1.0, no torch.compile, sequential
sampler, no evaluation, no checkpoints, no progress bar.
Accuracy: one full run each (--epochs over the examples), then the 2,000 held-out reviews of
imdb_test_00 (tunelab's model reloaded from the run's final/ directory).

SmolLM2-135M-Instruct LoRA (`tunelab classify --method lora`, last-token head) trains a shorter
budget (--lora-examples) and is scored on the first --lora-eval test reviews; prompting
(`tunelab evaluate icl`) scores --icl-limit seeded test reviews with demonstrations from
imdb_train_00. With --write the table replaces the '## Classification (IMDB)' section of
docs/BENCHMARKS.md (added at the end when missing), leaving the other sections alone.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py)
from classify_report import SPEED, report  # noqa: E402  (the section)
from classify_workers import (  # noqa: E402  (what each process runs)
    BATCH,
    DECODER,
    ENCODER,
    HANDLERS,
    TEMPLATE,
    TEST,
    TRAIN,
    read_jsonl,
    run_icl,
    timed,
    write_jsonl,
)
from measure import batch_plan  # noqa: E402

TITLE = "Classification (IMDB)"


def spawn(name: str, a: dict, environment: str | None = None) -> dict:
    if SMOKE:  # in this process: starting torch again per run would take longer than the work
        return dict(HANDLERS[name](a), environment=environment)
    return common.spawn(__file__, name, a, environment)


SMOKE = False
SEEN: list[float] = []  # the 1-minute load averages read during the run


def loads() -> str:
    SEEN.append(common.load())
    return f"{SEEN[-1]:.2f}"


def smoke_data(tmp: Path) -> tuple[list[dict], list[dict]]:
    """A few short labelled reviews (no shared data needed)."""
    good, bad = "great wonderful superb moving".split(), "awful boring dreadful dull".split()
    rows = [
        {
            "text": f"the film was {(good if i % 2 else bad)[i % 4]} and the story too",
            "label": i % 2,
        }
        for i in range(64)
    ]
    return rows[:48], rows[48:]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--parts",
        nargs="+",
        default=["speed", "minilm", "lora", "icl"],
        choices=["speed", "minilm", "lora", "icl"],
    )
    ap.add_argument(
        "--examples",
        type=int,
        default=0,
        help="MiniLM training reviews; 0: what tunelab's measured speed (speed part) "
        "trains in 95%% of --budget seconds",
    )
    ap.add_argument("--budget", type=float, default=300.0, help="MiniLM training seconds")
    ap.add_argument("--epochs", type=int, default=1, help="MiniLM passes over --examples")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument(
        "--mean-row",
        action="store_true",
        help="also train tunelab with mean pooling (HF's BERT head has only [CLS])",
    )
    ap.add_argument("--warmup-ratio", type=float, default=0.06, help="lr warmup (both)")
    ap.add_argument("--speed-steps", type=int, default=20, help="timed steps per speed run")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (speed runs)")
    ap.add_argument("--runs", type=int, default=3, help="speed runs per framework (median)")
    ap.add_argument("--eval", type=int, default=2000, help="test reviews scored (MiniLM)")
    ap.add_argument("--lora-examples", type=int, default=512, help="SmolLM2 LoRA reviews")
    ap.add_argument("--lora-batch", type=int, default=8)
    ap.add_argument("--lora-lr", type=float, default=5e-4)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-eval", type=int, default=500, help="test reviews scored (LoRA)")
    ap.add_argument("--icl-limit", type=int, default=200, help="test reviews scored (prompting)")
    ap.add_argument("--shots", default="0,1,4")
    ap.add_argument("--write", action="store_true", help="update docs/BENCHMARKS.md")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny random models and data, 2 steps, speed/minilm/lora parts, no docs",
    )
    ap.add_argument("--worker", choices=list(HANDLERS), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return common.worker_main(HANDLERS, a.worker)
    global SMOKE, DECODER
    SMOKE = a.smoke
    with tempfile.TemporaryDirectory(prefix="bench-classify-smoke-") as tmp:
        if a.smoke:
            a.parts = [p for p in a.parts if p != "icl"]  # the CLI in a subprocess: real model
            a.speed_steps, a.warmup, a.runs, a.examples, a.eval = 1, 1, 1, 32, 16
            a.lora_examples, a.lora_batch, a.lora_eval = 8, 4, 8
            encoder_dir = str(common.tiny_encoder_dir(Path(tmp)))
            DECODER = str(common.tiny_causal_dir(Path(tmp)))
            train_all, test_all = smoke_data(Path(tmp))
        else:
            missing = [p for p in [*TRAIN, TEST] if not p.is_file()]
            if missing:
                raise SystemExit(
                    f"{missing[0]}: IMDB not found; this benchmark reads ../shared/data/imdb"
                )
            from tunelab.hub import resolve

            encoder_dir = str(resolve(ENCODER))
            train_all = [r for p in TRAIN for r in read_jsonl(p)]
            test_all = read_jsonl(TEST)
        run(a, argv, encoder_dir, train_all, test_all, Path(tmp))


def run(a, argv, encoder_dir: str, train_all: list, test_all: list, tmp: Path) -> None:
    sitting = common.Sitting(common.command_line("classify.py", argv), ("transformers", "peft"))
    if a.examples == 0 and "speed" not in a.parts:
        raise SystemExit("--examples 0 (fit the budget) needs the speed part to measure first")
    if a.examples and not BATCH <= a.examples <= len(train_all):
        raise SystemExit(f"--examples must be between {BATCH} and {len(train_all)}")
    loads()
    res: dict = {}
    if True:  # the parts share the temporary folder
        all_file = write_jsonl(Path(tmp) / "train_all.jsonl", train_all)
        test_file = write_jsonl(Path(tmp) / "test.jsonl", test_all[: a.eval])
        base = dict(model=encoder_dir, batch=BATCH, lr=a.lr)

        if "speed" in a.parts:  # on all 6,000 training reviews (only the first batches run)
            steps = a.warmup + a.speed_steps
            job = dict(
                base,
                train_file=str(all_file),
                steps=steps,
                warmup_lr=0,
                schedule="constant",
                plan=batch_plan(len(train_all), BATCH, 0, steps),
            )
            job["speed"] = True
            names = [x for x in SPEED if not (SMOKE and x == "tunelab-glibc")]
            runs: dict[str, list] = {x: [] for x in names}
            for variant in common.alternating(names, a.runs):  # drift in load touches all alike
                worker, environment, _ = SPEED[variant]
                m = spawn(worker, job, environment)
                m["samples_s"], m["timed_s"] = timed(m["marks"], a.warmup, steps)
                w = max(a.warmup, 1)
                m["timed_cpu_s"] = m["cpu_marks"][steps] - m["cpu_marks"][w]
                m["samples_cpu_s"] = BATCH * (steps - w) / m["timed_cpu_s"]
                runs[variant].append(m)
                print(
                    f"speed {variant}: {m['samples_s']:.1f} samples/s, "
                    f"{m['samples_cpu_s']:.1f} per CPU-s, training peak RSS "
                    f"{m['train_peak_mb']:.0f} MiB (load {loads()})",
                    flush=True,
                )
            res["speed"] = {
                k: sorted(v, key=lambda m: m["samples_s"])[len(v) // 2] for k, v in runs.items()
            }
            res["speed_runs"] = runs
            res["speed_all"] = {k: [m["samples_s"] for m in v] for k, v in runs.items()}
            res["speed_same"] = all(
                x["batch_tokens"] == runs["hf"][0]["batch_tokens"] for x in runs["tunelab"]
            )

        n = a.examples
        if not n:  # as many reviews as tunelab's measured speed trains in the budget (one epoch)
            n = int(a.budget * 0.95 * res["speed"]["tunelab"]["samples_s"] / a.epochs)
            n = max(BATCH, min(n, len(train_all)))
            print(f"{n} reviews fit {a.budget:.0f} s at the measured speed", flush=True)
        n -= n % BATCH
        if "minilm" in a.parts:
            train_file = write_jsonl(Path(tmp) / "train.jsonl", train_all[:n])
            steps = a.epochs * n // BATCH
            job = dict(
                base,
                train_file=str(train_file),
                steps=steps,
                warmup_lr=round(a.warmup_ratio * steps),
                schedule="linear",
                plan=batch_plan(n, BATCH, 0, steps),
                eval_file=str(test_file),
            )
            res["full"] = {}
            variants = [("tunelab", "tunelab", {}), ("hf", "hf", {})]
            if a.mean_row:
                variants.append(("tunelab_mean", "tunelab", {"pooling": "mean"}))
            for name, worker, extra in variants:
                m = spawn(worker, dict(job, **extra))
                m["samples_s"] = BATCH * steps / m["wall_s"]
                m["load"] = loads()
                res["full"][name] = m
                print(
                    f"full {name}: {m['wall_s']:.0f} s training, {m['samples_s']:.1f} samples/s, "
                    f"accuracy {m['accuracy']:.4f} on {m['eval_n']} (load {loads()})",
                    flush=True,
                )
            res["full_same"] = (
                res["full"]["tunelab"]["batch_tokens"] == res["full"]["hf"]["batch_tokens"]
            )

        if "lora" in a.parts:
            k = a.lora_examples - a.lora_examples % a.lora_batch
            lora_file = write_jsonl(Path(tmp) / "lora.jsonl", train_all[:k])
            lora_test = write_jsonl(Path(tmp) / "lora_test.jsonl", test_all[: a.lora_eval])
            steps = k // a.lora_batch
            job = dict(
                model=DECODER,
                train_file=str(lora_file),
                batch=a.lora_batch,
                lr=a.lora_lr,
                steps=steps,
                warmup_lr=round(a.warmup_ratio * steps),
                schedule="linear",
                template=TEMPLATE,
                method={
                    "name": "lora",
                    "r": a.lora_r,
                    "alpha": 2 * a.lora_r,
                    "targets": "all-linear",
                },
                eval_file=str(lora_test),
            )
            m = spawn("tunelab", job)
            m["samples_s"], m["steps"], m["examples"] = k / m["wall_s"], steps, k
            res["lora"] = m
            print(
                f"lora: {m['wall_s']:.0f} s training, accuracy {m['accuracy']:.4f} "
                f"on {m['eval_n']} (load {loads()})",
                flush=True,
            )

        if "icl" in a.parts:
            res["icl"] = run_icl(dict(shots=a.shots, limit=a.icl_limit))
            shots = ", ".join(
                f"{k}-shot {v['accuracy']:.3f}" for k, v in res["icl"]["shots"].items()
            )
            print(f"icl: {shots} in {res['icl']['seconds']:.0f} s (load {loads()})", flush=True)

    body = report(a, n, res, sitting, DECODER, SEEN)
    print("\n" + body)
    common.publish(TITLE, body, SMOKE, a.write)


if __name__ == "__main__":
    main()
