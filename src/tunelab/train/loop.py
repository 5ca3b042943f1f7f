"""The one training loop every command uses.

One optimizer step = `grad_accum` micro-batches; their losses are summed and the gradients
divided by the number of targets in the whole step, so batch 2 x 4 equals batch 8 x 1.
Checkpoints hold what a resumed run needs to continue bit-identically: trainable weights,
optimizer, scheduler, RNG states and the data position.
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from tunelab.data.batching import FILLER
from tunelab.train.checkpoints import (
    TrainingError,
    checkpoints,
    read_checkpoint,
    restore_rng,
    write_checkpoint,
)
from tunelab.train.config import TrainConfig, compute_precision
from tunelab.train.distributed import full, full_state, load_weights, no_sync, shard_optimizer_state
from tunelab.train.optim import make_optimizer, stage_groups, trainable_named
from tunelab.train.progress import Progress
from tunelab.train.schedule import make_scheduler

if TYPE_CHECKING:
    from tunelab.train.tasks import Objective


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@runtime_checkable
class Callback(Protocol):
    """A loop callback: what changes the training from outside the loop (gradual unfreezing in
    adapt/freeze.py, the image model's EMA in train/image.py). Every hook is called on every
    callback, in the order given. A callback may also have `optimizer_stages()` (parameter names
    and lr factors the loop builds optimizer groups from, held from the start) and `plan(model)`
    (what will train later, kept in fp32 by `fp32_master_weights`); both are looked up by name."""

    def on_start(self, trainer: Trainer) -> None:
        """Before the optimizer is built (e.g. freeze what trains later)."""
        ...

    def on_resume(self, trainer: Trainer, step: int) -> None:
        """When a checkpoint resumes: its step is set, the optimizer not yet rebuilt."""
        ...

    def on_optimizer(self, trainer: Trainer) -> None:
        """After the optimizer and scheduler are rebuilt from a checkpoint."""
        ...

    def on_step(self, trainer: Trainer, step: int) -> None:
        """Before each optimizer step; `step` counts the steps done so far."""
        ...


class Trainer:
    """Runs optimizer steps on a model with an objective; callbacks may change what trains."""

    def __init__(
        self,
        model,
        objective: Objective,
        batches,
        cfg: TrainConfig,
        run_dir: Path,
        total_steps: int,
        val_batches=None,
        callbacks: Sequence[Callback] = (),
        evaluators: Sequence[Callable[[Any], dict]] = (),
        is_main: bool = True,
        reduce=None,
        dist=None,
    ):
        # `dist` (train/distributed.py) wraps the model for DDP and brings rank and reduce.
        if dist is not None:
            is_main, reduce = dist.is_main, dist.reduce
        self.model, self.objective, self.batches, self.cfg = model, objective, batches, cfg
        self.dist = dist
        self.run_dir, self.total_steps, self.val_batches = Path(run_dir), total_steps, val_batches
        self.callbacks, self.evaluators, self.is_main = list(callbacks), list(evaluators), is_main
        self.reduce = reduce or (lambda x: x)  # sums a tensor across ranks under DDP
        self.device = next(model.parameters()).device
        self.step, self.tokens, self.elapsed = 0, 0, 0.0
        self.best_val, self.bad_evals, self.last_val = math.inf, 0, None
        self._stream = None
        self._tb = None  # TensorBoard writer when tensorboard is installed, else False
        for cb in self.callbacks:
            cb.on_start(self)
        self.optimizer = self._make_optimizer()
        self.scheduler = self._make_scheduler()
        self.compute = compute_precision(cfg)  # the autocast dtype: fp32 means none
        self.scaler = torch.amp.GradScaler(self.device.type) if self.compute == "fp16" else None
        self.metrics_file = self.run_dir / "metrics.jsonl"
        if is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    def _make_optimizer(self) -> torch.optim.AdamW:
        """A callback with `optimizer_stages()` names groups of parameters and their lr factors,
        e.g. gradual unfreezing's stages, held from the start though frozen for now (frozen ones
        get no grad, so AdamW skips them); the groups themselves are built here."""
        groups = None
        for cb in self.callbacks:
            if hasattr(cb, "optimizer_stages"):
                groups = stage_groups(self.model, cb.optimizer_stages(), self.cfg)
        return make_optimizer(self.model, self.cfg, groups)

    def _make_scheduler(self):
        cfg = self.cfg
        warmup = (
            cfg.warmup_steps
            if cfg.warmup_steps is not None
            else int(cfg.warmup_ratio * self.total_steps)
        )
        return make_scheduler(
            self.optimizer, self.total_steps, warmup, cfg.schedule, cfg.min_lr_ratio
        )

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        # Names and tensors of the unwrapped model (no DDP `module.` prefix, FSDP shards
        # gathered on every rank), so any world size resumes it; only rank 0 writes.
        weights = {n: p.detach() for n, p in trainable_named(self.model).items()}
        weights = full_state(weights, keep=self.is_main)
        optim = full_state(self.optimizer.state_dict(), keep=self.is_main)
        if not self.is_main:
            self._barrier()
            return None
        state = dict(
            step=self.step,
            tokens=self.tokens,
            elapsed=self.elapsed,
            best_val=self.best_val,
            bad_evals=self.bad_evals,
            last_val=self.last_val,
            scheduler=self.scheduler.state_dict(),
            data=self.batches.state_dict(),
        )
        keep = self.cfg.keep_checkpoints
        target = write_checkpoint(self.run_dir, self.step, weights, optim, state, keep)
        self._barrier()
        return target

    def _barrier(self) -> None:
        if self.dist is not None:
            self.dist.barrier()

    def load_checkpoint(self, path: Path) -> None:
        state, weights, optim, rng = read_checkpoint(path)
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed"]
        self.best_val, self.bad_evals = state["best_val"], state["bad_evals"]
        self.last_val = state.get("last_val")  # a kill after the last checkpoint keeps it
        for cb in self.callbacks:  # e.g. re-unfreeze the blocks that were trainable at this step
            cb.on_resume(self, self.step)
        params = dict(self.model.named_parameters())
        for name in state["trainable"]:
            params[name].requires_grad_(True)
        self.optimizer = self._make_optimizer()
        for cb in self.callbacks:
            cb.on_optimizer(self)
        self.scheduler = self._make_scheduler()
        load_weights(self.model, weights)
        self.optimizer.load_state_dict(optim)
        shard_optimizer_state(self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["data"])
        self._stream = None
        restore_rng(rng, state)

    # -- steps -------------------------------------------------------------------------------
    def _next_batch(self) -> dict:
        if self._stream is None:  # created lazily, so a resumed data position takes effect
            self._stream = self.batches.forever()
        batch = next(self._stream)
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def train_step(self) -> dict:
        self.model.train()
        # Callbacks may have changed what trains since the last step: DDP wraps that set.
        model = self.dist.wrap(self.model) if self.dist is not None else self.model
        loss_sum = torch.zeros((), device=self.device)
        count = torch.zeros((), device=self.device, dtype=torch.long)
        tokens, sums = 0, {}
        for i in range(self.cfg.grad_accum):
            batch = self._next_batch()
            # Gradients are reduced across ranks once per step, after the last micro-batch.
            sync = i == self.cfg.grad_accum - 1
            with nullcontext() if sync else no_sync(model):
                with autocast(self.device, self.compute):
                    loss, n, metrics = self.objective(model, batch)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += loss.detach().float()
            count += n
            sums = _add_metrics(sums, metrics)
            mask = batch.get("attention_mask")
            tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        loss_sum, count = self.reduce(loss_sum), self.reduce(count)
        # Global tokens: every rank must see the same count to stop at the same step.
        tokens = int(self.reduce(torch.tensor(tokens, device=self.device)))
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        # normalise by the targets of the whole step, across micro-batches and ranks
        for p in params:
            p.grad.div_(max(int(count), 1))
        grad_norm = None
        if self.cfg.clip:
            grad_norm = float(full(torch.nn.utils.clip_grad_norm_(params, self.cfg.clip)))
        loss = float(loss_sum) / max(int(count), 1)
        if not math.isfinite(loss):
            last = sorted(checkpoints(self.run_dir))
            where = f"last good checkpoint: {last[-1][1]}" if last else "no checkpoint written yet"
            raise TrainingError(f"loss is {loss} at step {self.step + 1}; {where}")
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.step += 1
        self.tokens += tokens
        extra = self._means(sums, count)
        return {"loss": loss, **extra, "lr": lr, "grad_norm": grad_norm, "tokens_step": tokens}

    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.val_batches is None and not self.evaluators:
            return {}
        self.model.eval()
        out = {}
        if self.val_batches is not None:
            loss_sum = torch.zeros((), device=self.device)
            count = torch.zeros((), device=self.device, dtype=torch.long)
            sums = {}
            if hasattr(self.val_batches, "set_epoch"):  # a capped pass stops mid-epoch: restart
                self.val_batches.set_epoch(0)
            for i, batch in enumerate(self.val_batches):
                if self.cfg.eval_batches and i >= self.cfg.eval_batches:
                    break
                batch = {
                    k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()
                }
                with autocast(self.device, self.compute):
                    loss, n, metrics = self.objective(self.model, batch)
                if batch.get(FILLER):  # run only to keep this rank in step with the others
                    continue
                loss_sum += loss.float()
                count += n
                sums = _add_metrics(sums, metrics)
            loss_sum, count = self.reduce(loss_sum), self.reduce(count)
            val = float(loss_sum) / max(int(count), 1)
            out = {"val_loss": val, "val_ppl": math.exp(min(val, 50))}
            out.update({f"val_{k}": v for k, v in self._means(sums, count).items()})
        for evaluator in self.evaluators:  # task metrics: accuracy, preference agreement, samples
            out.update(evaluator(self.model))
            self.model.eval()
        return out

    def _means(self, sums: dict, count) -> dict:
        """Objective metrics arrive as sums over targets; report them per target, across ranks."""
        n = max(int(count), 1)
        return {k: float(self.reduce(v.to(self.device))) / n for k, v in sums.items()}

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is None:
            self._tb = _tensorboard(self.run_dir)
        if self._tb:
            prefix = "val/" if record.get("split") == "val" else "train/"
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "split"):
                    self._tb.add_scalar(prefix + key, value, record["step"])

    # -- the run -----------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, started = self.cfg, time.perf_counter() - self.elapsed
        progress = Progress(self.total_steps, enabled=self.is_main, start=self.step)
        stop_reason = "max_steps"
        with progress:  # the kernels are the model's own: chosen when it was prepared (runtime/)
            while self.step < self.total_steps:
                for cb in self.callbacks:
                    cb.on_step(self, self.step)
                t0 = time.perf_counter()
                m = self.train_step()
                dt = time.perf_counter() - t0
                self.elapsed = time.perf_counter() - started
                m["tokens_per_s"] = m["tokens_step"] / dt if dt > 0 else 0.0
                progress.update(self.step, m["loss"], m["lr"], m["tokens_per_s"])
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    self.log(
                        {
                            "step": self.step,
                            "tokens": self.tokens,
                            "time": round(self.elapsed, 3),
                            **m,
                        }
                    )
                last = self.step == self.total_steps or (
                    cfg.max_tokens and self.tokens >= cfg.max_tokens
                )
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or last:
                    if self._eval_and_check():
                        stop_reason = "early_stopping"
                        last = True
                if (cfg.save_every and self.step % cfg.save_every == 0) or last:
                    self.save_checkpoint()
                if last:
                    stop_reason = (
                        "max_tokens"
                        if stop_reason == "max_steps" and self.step < self.total_steps
                        else stop_reason
                    )
                    break
        return self.summary(stop_reason)

    def _eval_and_check(self) -> bool:
        """Evaluate, log, and say whether early stopping has run out of patience."""
        ev = self.evaluate()
        if not ev:
            return False
        self.log({"step": self.step, "split": "val", **ev})
        if "val_loss" not in ev:
            return False
        self.last_val = ev["val_loss"]
        if ev["val_loss"] < self.best_val - 1e-6:
            self.best_val, self.bad_evals = ev["val_loss"], 0
        else:
            self.bad_evals += 1
        return bool(self.cfg.early_stopping) and self.bad_evals >= self.cfg.early_stopping

    def summary(self, stop_reason: str) -> dict:
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return dict(
            steps=self.step,
            stop_reason=stop_reason,
            wall_time_s=round(self.elapsed, 3),
            tokens=self.tokens,
            tokens_per_s=self.tokens / self.elapsed if self.elapsed else 0.0,
            peak_memory_mb=round(peak_memory_mb(self.device), 1),
            trainable_params=trainable,
            total_params=total,
            final_val_loss=self.last_val,
            best_val_loss=None if math.isinf(self.best_val) else self.best_val,
        )


def _add_metrics(sums: dict, metrics: dict) -> dict:
    for k, v in metrics.items():
        v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
        sums[k] = sums[k] + v if k in sums else v
    return sums


def _tensorboard(run_dir: Path):
    """A SummaryWriter under run_dir/tensorboard, or False when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return False
    return SummaryWriter(str(run_dir / "tensorboard"))
