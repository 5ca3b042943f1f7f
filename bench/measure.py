"""What the training benchmarks measure inside a tunelab run, one copy for bench/train.py,
bench/dpo.py and bench/classify.py: the order tunelab's seeded batches take the records in (so
the reference library can be fed the same batches), parameter counts, and the step meter.
"""

from __future__ import annotations

import time

import common  # bench/, beside this script


def batch_plan(n_records: int, batch: int, seed: int, steps: int) -> list[list[int]]:
    """Record indices of the first `steps` batches tunelab's Batches takes (all records train)."""
    from tunelab.data.batching import Batches

    b = Batches([{"input_ids": [0]}] * n_records, batch, pad_id=0, seed=seed)
    plan, epoch = [], 0
    while len(plan) < steps:
        plan += b.plan(epoch)
        epoch += 1
    return plan[:steps]


def count_params(model) -> dict:
    """Base (frozen or not, quantized or not) and trainable parameter counts."""
    from tunelab.adapt.params import param_report

    report = param_report(model)  # counts NF4 weights (buffers) too, tied weights once
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return {"base": report["total_params"] - lora, "trainable": report["trainable_params"]}


class Meter:
    """A loop callback that only observes: clock, tokens and RSS at the start of each step;
    optionally a torch.profiler over step `profile_at`."""

    def __init__(self, end: int, profile_at: int | None = None):
        self.end, self.profile_at, self.prof = end, profile_at, None
        self.marks: list[float] = []
        self.tokens: list[int] = []
        self.peaks = (0.0, 0.0)
        self.params: dict = {}
        self.profile = ""

    def on_start(self, trainer) -> None:
        self.params = count_params(trainer.model)

    def on_step(self, trainer, step: int) -> None:
        if step == 0:
            common.reset_peak()
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.profile = self.prof.key_averages().table(
                sort_by="self_cpu_time_total", row_limit=30
            )
            self.prof = None
        if step == self.end:
            self.peaks = (common.peak_rss_mb(), common.train_peak_mb())
        self.marks.append(time.perf_counter())
        self.tokens.append(trainer.tokens)
        if step == self.profile_at:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU])
            self.prof.__enter__()

    def on_resume(self, trainer, step: int) -> None:
        pass

    def on_optimizer(self, trainer) -> None:
        pass


def train_counting(trainer) -> tuple[list[int], list[float]]:
    """Train a transformers Trainer (TRL's included); (the real tokens, attention-mask sum, of
    each batch its collator made, the losses it logged)."""
    tokens, collate = [], trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting
    trainer.train()
    return tokens, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def clock(marks: list[float], rss: list[tuple[float, float]]):
    """The reference side's Meter: a transformers TrainerCallback appending the clock at the
    start of training and at the end of each step to `marks`, and (peak RSS, training peak RSS)
    at the end of each step to `rss`; the training peak starts with the first step."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            common.reset_peak()
            marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            marks.append(time.perf_counter())
            rss.append((common.peak_rss_mb(), common.train_peak_mb()))

    return Clock()
