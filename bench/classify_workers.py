"""The processes bench/classify.py measures: a `tunelab classify` run (and its reloaded model
scored on the test reviews), the same work by HF Trainer, and `tunelab evaluate icl` as a user
runs it. bench/classify.py's docstring says what the work is and which settings are set alike.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # bench/, beside this script
from measure import Meter

IMDB = common.SHARED / "imdb"
TRAIN = [IMDB / f"imdb_train_0{i}.jsonl" for i in range(3)]
TEST = IMDB / "imdb_test_00.jsonl"
ENCODER, DECODER = "minilm-l6", "smollm2-135m-instruct"
LABELS = ["negative", "positive"]
TEMPLATE = "Review: {text}\nSentiment:"
BATCH, SEQ_LEN = 16, 256


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def timed(marks: list[float], warmup: int, steps: int) -> tuple[float, float]:
    """(samples/s, seconds) over the steps after the first `warmup` (marks: end of each step)."""
    if len(marks) < steps:
        raise SystemExit(f"saw {len(marks)} step ends, expected {steps}")
    w = max(warmup, 1)
    seconds = marks[steps - 1] - marks[w - 1]
    return BATCH * (steps - w) / seconds, seconds


def tunelab_config(a: dict, out: str) -> dict:
    return {
        "task": "classify",
        "model": a["model"],
        "data.path": a["train_file"],
        "data.val_fraction": 0.0,
        "train.seq_len": SEQ_LEN,
        "train.batch_size": a["batch"],
        "train.grad_accum": 1,
        "train.max_steps": a["steps"] + bool(a.get("speed")),
        "train.lr": a["lr"],
        "train.warmup_steps": a["warmup_lr"],
        "train.schedule": a["schedule"],
        "train.min_lr_ratio": 0.0,
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
        "train.seed": 0,
        "out": out,
        "classify.labels": LABELS,
        "classify.template": a.get("template", "{text}"),
        "classify.pooling": a.get("pooling"),
        "method": a.get("method", {}),
    }


class CpuMeter(Meter):
    """The step meter, with the process CPU time (all threads) at the start of each step."""

    def __init__(self, end: int):
        super().__init__(end)
        self.cpu: list[float] = []

    def on_step(self, trainer, step: int) -> None:
        super().on_step(trainer, step)
        self.cpu.append(time.process_time())


def worker_tunelab(a: dict) -> dict:
    """A `tunelab classify` run (run_training with its task, as the command runs it; one step
    more than asked, so the end of the last timed step is marked before the final checkpoint);
    then, when asked, the reloaded final model scored on the test reviews as `tunelab evaluate
    classification` does."""
    import torch

    import tunelab
    from tunelab.data import Batches
    from tunelab.data.templates import encode_classification
    from tunelab.evaluate.classification import metrics, predict
    from tunelab.train.classify import ClassifyTask
    from tunelab.train.config import load_config
    from tunelab.train.run import run_training

    with tempfile.TemporaryDirectory(prefix="bench-classify-") as tmp:
        cfg = load_config(None, tunelab_config(a, str(Path(tmp) / "run")))
        start, meter = time.perf_counter(), CpuMeter(a["steps"])
        summary = run_training(cfg, task=ClassifyTask(), callbacks=[meter])
        process_s, cpu_end = time.perf_counter() - start, time.process_time()
        n = a["steps"]
        rows = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "loss" in r and r.get("split") != "val"][:n]
        if a.get("speed"):  # one more step ran: the start of step n is the end of step n - 1
            ends = [m - meter.marks[0] for m in meter.marks[1 : n + 1]]
            cpu_marks = meter.cpu[: n + 1]
            peaks = meter.peaks
        else:  # the run as asked: step ends from its metrics, CPU to the end of run_training
            ends = [r["time"] for r in steps]
            cpu_marks = [*meter.cpu[:n], cpu_end]
            peaks = (summary["peak_memory_mb"], summary["peak_memory_mb"])
        out = dict(
            marks=ends,
            batch_tokens=[r["tokens_step"] for r in steps],
            losses=[r["loss"] for r in steps],
            wall_s=ends[-1],
            process_s=process_s,
            cpu_s=cpu_marks[-1] - cpu_marks[0],
            cpu_marks=cpu_marks,
            peak_rss_mb=peaks[0],
            train_peak_mb=peaks[1],
            trainable=meter.params["trainable"],
            params=meter.params["base"],
        )
        if a.get("eval_file"):
            t = time.perf_counter()
            lm = tunelab.load(str(Path(cfg.out) / "final"))
            records = read_jsonl(Path(a["eval_file"]))
            ex = encode_classification(
                records, lm.tokenizer, LABELS, template=cfg.classify.template, seq_len=SEQ_LEN
            )
            batches = Batches(ex, BATCH, pad_id=lm.tokenizer.batch_pad_id, shuffle=False)
            with torch.inference_mode():
                gold, probs = predict(lm.model, batches)
            m = metrics(gold, probs.argmax(-1).tolist(), LABELS)
            out.update(
                accuracy=m["accuracy"],
                macro_f1=m["macro_f1"],
                eval_n=m["examples"],
                eval_s=time.perf_counter() - t,
            )
    return out


def worker_hf(a: dict) -> dict:
    """HF Trainer on the same reviews in the same batches (sequential sampler over the plan)."""
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    records = read_jsonl(Path(a["train_file"]))
    rows = [records[i] for batch in a["plan"] for i in batch]
    tok = AutoTokenizer.from_pretrained(a["model"])

    def dataset(recs: list[dict]) -> Dataset:
        enc = tok([r["text"] for r in recs], truncation=True, max_length=SEQ_LEN)
        return Dataset.from_dict({**enc, "labels": [int(r["label"]) for r in recs]})

    train_ds = dataset(rows)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        a["model"],
        num_labels=2,
        dtype=torch.float32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.1,
    )
    marks: list[float] = []
    begin: list[float] = []
    cpu: list[float] = []
    rss: list[tuple] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            common.reset_peak()
            begin.append(time.perf_counter())
            cpu.append(time.process_time())

        def on_step_end(self, args, state, control, **kw):
            marks.append(time.perf_counter())
            cpu.append(time.process_time())
            rss.append((common.peak_rss_mb(), common.train_peak_mb()))

    real: list[int] = []
    collator = DataCollatorWithPadding(tok)

    def counting(features):
        batch = collator(features)
        real.append(int(batch["attention_mask"].sum()))
        return batch

    with tempfile.TemporaryDirectory(prefix="bench-classify-") as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=a["batch"],
            per_device_eval_batch_size=BATCH,
            gradient_accumulation_steps=1,
            max_steps=a["steps"],
            learning_rate=a["lr"],
            lr_scheduler_type=a["schedule"],
            warmup_steps=a["warmup_lr"],
            weight_decay=0.0,
            max_grad_norm=1.0,
            optim="adamw_torch_fused",
            adam_beta1=0.9,
            adam_beta2=0.999,
            adam_epsilon=1e-8,
            gradient_checkpointing=False,
            bf16=False,
            fp16=False,
            torch_compile=False,
            use_cpu=True,
            report_to="none",
            logging_steps=10,
            save_strategy="no",
            eval_strategy="no",
            dataloader_num_workers=0,
            seed=0,
            train_sampling_strategy="sequential",
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            data_collator=counting,
            callbacks=[Clock()],
        )
        start = time.perf_counter()
        trainer.train()
        process_s = time.perf_counter() - start
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        out = dict(
            marks=[m - begin[0] for m in marks],
            batch_tokens=real[: a["steps"]],
            losses=losses,
            wall_s=marks[-1] - begin[0],
            process_s=process_s,
            cpu_s=cpu[-1] - cpu[0],
            cpu_marks=cpu,
            peak_rss_mb=rss[-1][0],
            train_peak_mb=rss[-1][1],
            params=sum(p.numel() for p in model.parameters()),
        )
        out["trainable"] = out["params"]
        if a.get("eval_file"):
            t = time.perf_counter()
            pred = trainer.predict(dataset(read_jsonl(Path(a["eval_file"]))))
            guess = np.argmax(pred.predictions, -1)
            out.update(
                accuracy=float((guess == pred.label_ids).mean()),
                eval_n=len(guess),
                eval_s=time.perf_counter() - t,
            )
    return out


def run_icl(a: dict) -> dict:
    """`tunelab evaluate icl` as a user runs it, timed."""
    # plain and uncalibrated: the setup the Classification rows were recorded with
    cmd = [
        str(Path(sys.executable).parent / "tunelab"),
        "evaluate",
        "icl",
        "--model",
        DECODER,
        "--data",
        str(TEST),
        "--demos",
        str(TRAIN[0]),
        "--labels",
        ",".join(LABELS),
        "--template",
        TEMPLATE,
        "--format",
        "plain",
        "--no-calibrate",
        "--shots",
        a["shots"],
        "--limit",
        str(a["limit"]),
        "--seed",
        "0",
        "--json",
    ]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"tunelab evaluate icl failed (exit {proc.returncode})")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return dict(result, seconds=time.perf_counter() - t)


HANDLERS = {"tunelab": worker_tunelab, "hf": worker_hf}
