"""bench/dpo.py's workers: the same DPO steps by tunelab and by TRL, each run in a process of
its own (common.spawn), and the chat rendering both sides train on."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from measure import Meter, clock, train_counting

MODEL = "smollm2-135m-instruct"
LORA = dict(r=16, alpha=32, targets=["q_proj", "v_proj"])


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
