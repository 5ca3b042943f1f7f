"""The two sides of bench/train.py, one framework per process: tunelab's `run_training` (the
`tunelab finetune` path) and TRL's SFTTrainer on the same records in the same batches.
bench/train.py's docstring says what the work is and which settings are set alike.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import common  # bench/, beside this script
from measure import Meter, clock, count_params, train_counting

# name -> (tunelab method options, peft target_modules or None for full)
METHODS = {
    "full": ({}, None),
    "lora-qv": ({"name": "lora", "targets": "q_proj,v_proj"}, ["q_proj", "v_proj"]),
    "lora-all": ({"name": "lora", "targets": "all-linear"}, "all-linear"),
    "qlora": ({"name": "qlora", "targets": "all-linear", "bits": "nf4"}, None),
}
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
# precision row -> (tunelab train options, TRL flags, label)
PRECISIONS = {
    "fp32": ({"train.precision": "fp32", "train.autocast": "off"}, {"bf16": False, "fp16": False},
             "fp32"),
    "bf16": ({"train.precision": "fp32", "train.autocast": "bf16"}, {"bf16": True, "fp16": False},
             "bf16 autocast, fp32 weights"),
}  # fmt: skip


def worker_tunelab(a: dict) -> dict:
    from tunelab.train.config import load_config
    from tunelab.train.run import run_training

    total = a["warmup"] + a["steps"]
    method = METHODS[a["method"]][0]
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        cfg = load_config(
            None,
            {
                "task": "finetune",
                "model": a["model"],
                "data.path": a["data"],
                "data.val_fraction": 0.0,
                "data.pack": False,
                "data.group_by_length": False,
                "train.seq_len": a["seq_len"],
                "train.batch_size": a["batch"],
                "train.grad_accum": 1,
                "train.max_steps": total + 1,
                "train.lr": a["lr"],
                "train.warmup_steps": 0,
                "train.schedule": "constant",
                "train.weight_decay": 0.0,
                "train.clip": 1.0,
                "train.betas": [0.9, 0.999],
                "train.dropout": 0.0,
                "train.activation_checkpointing": False,
                "train.eval_every": None,
                "train.save_every": None,
                "train.log_every": 1,
                "train.device": "cpu",
                "train.seed": a["seed"],
                "out": str(Path(tmp) / "run"),
                **PRECISIONS[a["precision"]][0],
                **{f"method.{k}": v for k, v in ({**method, **LORA} if method else {}).items()},
            },
        )
        meter = Meter(total, profile_at=a["warmup"] if a.get("profile") else None)
        summary = run_training(cfg, callbacks=[meter])
        records = [
            json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()
        ]
    if summary["data"]["train_examples"] != a["n_records"]:
        raise SystemExit(
            f"tunelab kept {summary['data']['train_examples']} of {a['n_records']} "
            "records, so TRL's batch order would not match"
        )
    real = [b - a_ for a_, b in zip(meter.tokens, meter.tokens[1:])]
    losses = [r["loss"] for r in records if "loss" in r and r.get("split") != "val"][:total]
    out = result(a, real, meter.marks[1:], losses, meter.params)
    out["peak_rss_mb"], out["train_peak_mb"] = meter.peaks
    out["profile"] = meter.profile
    return out


def worker_trl(a: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
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

        peft_config = LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            bias="none",
            task_type="CAUSAL_LM",
            target_modules=METHODS[a["method"]][1],
        )

    # like for like: every setting that changes the work, set; "defaults" leaves gradient
    # checkpointing and bf16/fp16 as TRL ships them
    same = {"gradient_checkpointing": False, **PRECISIONS[a["precision"]][1]}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        args = SFTConfig(
            output_dir=tmp,
            max_length=a["seq_len"],
            truncation_mode="keep_start",
            per_device_train_batch_size=a["batch"],
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
            packing=False,
            padding_free=False,
            pad_to_multiple_of=None,
            completion_only_loss=True,
            assistant_only_loss=False,
            loss_type="nll",
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
            shuffle_dataset=False,
            disable_tqdm=True,
            **({} if a["trl_mode"] == "defaults" else same),
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[clock(marks, rss)],
            peft_config=peft_config,
        )
        real, losses = train_counting(trainer)
        params = count_params(trainer.model)
        settings = {k: getattr(args, k) for k in ("gradient_checkpointing", "bf16", "fp16")}
    out = result(a, real[:total], marks[1:], losses, params)
    out["peak_rss_mb"], out["train_peak_mb"] = rss[total - 1]  # at the end of the last timed step
    out["settings"] = settings
    return out


def result(a, real, ends, losses, params) -> dict:
    """Figures from the real tokens and end time of each step (ends[k]: end of step k)."""
    w, total = a["warmup"], a["warmup"] + a["steps"]
    if len(real) < total or len(ends) < total:
        raise SystemExit(f"saw {len(real)} batches and {len(ends)} steps, expected {total}")
    first = max(w, 1)  # with no warm-up, step 0 is still untimed: its start is not marked alike
    seconds = ends[total - 1] - ends[first - 1]
    return dict(
        tokens_per_s=sum(real[first:total]) / seconds,
        seconds=seconds,
        real_per_batch=statistics.mean(real[:total]),
        load_peak_mb=common.PEAK_BEFORE_RESET[0],
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        params=params,
        batch_tokens=real[:total],
    )


HANDLERS = {"tunelab": worker_tunelab, "trl": worker_trl}
