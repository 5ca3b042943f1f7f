"""A training run from a RunConfig: model, method, data, loop, evaluation, run directory.

Commands differ only in the objective and the data template they plug in here.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from tunelab.adapt.quantize import release_scratch
from tunelab.errors import ConfigError
from tunelab.files import atomic_write
from tunelab.loading import DTYPES, load
from tunelab.model.weights import release_freed
from tunelab.runtime import prepare_runtime, resolve
from tunelab.train.config import RunConfig, check_options, compute_precision, load_config
from tunelab.train.lm import LMTask
from tunelab.train.tasks import Task

if TYPE_CHECKING:
    from tunelab.train.loop import Callback

log = logging.getLogger("tunelab")


def model_config(cfg: RunConfig):
    """(the model's config, the tokenizer of a from-scratch run or None), read without loading a
    weight: what the memory estimate sizes and what a from-scratch model is built from."""
    from tunelab.model.config import preset
    from tunelab.model.inspect import read_config
    from tunelab.tokenizer.tokenizer import Tokenizer

    if not cfg.arch:
        return read_config(cfg.model), None
    if not cfg.tokenizer:
        raise ConfigError(
            "training from scratch (arch) needs a tokenizer: --tokenizer DIR_OR_MODEL"
        )
    path = Path(cfg.tokenizer)
    tokenizer = Tokenizer.from_dir(path) if path.is_dir() else load(cfg.tokenizer).tokenizer
    ids = {
        "eos_token_id": tokenizer.eos_id,
        "bos_token_id": tokenizer.bos_id,
        "pad_token_id": tokenizer.pad_id,
    }
    mcfg = preset(
        cfg.arch, vocab_size=tokenizer.vocab_size, max_seq_len=max(cfg.train.seq_len, 64), **ids
    )
    return mcfg, tokenizer


def load_for_training(cfg: RunConfig, device: torch.device):
    """(model, tokenizer): a pretrained model, or a fresh one from an architecture preset."""
    from tunelab.adapt.memcheck import check_memory
    from tunelab.model.heads import build_model

    mcfg, tokenizer = model_config(cfg)
    # stop with what would fit, before the OS kills a load that cannot
    check_memory(mcfg, cfg.method.get("name", "full"), cfg.method, cfg.train, device)
    if cfg.arch:
        torch.manual_seed(cfg.train.seed)
        model = build_model(mcfg)
        init_weights(model)
        model = model.to(device)
        prepare_runtime(model, cfg.runtime)
        return model, tokenizer
    # a first run on a machine measures the kernels now, while no model takes the memory
    r = cfg.runtime
    resolve(r.linear, r.allocator, r.attention, device)
    quant = {}
    if cfg.method.get("name") == "qlora":  # quantized as each weight is read: no float model
        from tunelab.adapt.lora import quantization

        quant = dict(zip(("quantize", "double_quant"), quantization(cfg.method)))
    lm = load(
        cfg.model, precision=cfg.train.precision, device=str(device), **quant, runtime=cfg.runtime
    )
    return lm.model, lm.tokenizer


def init_weights(model) -> None:
    """GPT-2's initialisation: N(0, 0.02), zero biases, residual projections scaled by depth."""
    n_layer = model.cfg.n_layer
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            std = (
                0.02 / math.sqrt(2 * n_layer)
                if name.endswith(("o_proj.weight", "down_proj.weight"))
                else 0.02
            )
            torch.nn.init.normal_(p, 0.0, std)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)


def set_dropout(model, p: float) -> None:
    for block in getattr(model.transformer, "layers", []):
        block.dropout.p = p


def prepare_run_dir(cfg: RunConfig) -> Path:
    """The run directory's path, checked before any work: writable, not a finished run, not a
    folder of other files, not owned by a running run. Nothing is written yet (open_run_dir)."""
    from tunelab.train.rundir import check_run_dir

    out = Path(cfg.out or f"runs/{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_run_dir(out)
    if not cfg.resume and (out / "summary.json").exists():
        raise ConfigError(
            f"{out} holds a finished run; choose another --out or pass --resume {out}"
        )
    if not cfg.resume and (out / "config.yaml").exists():
        raise ConfigError(
            f"{out} holds an interrupted run; continue it with --resume {out} or choose another --out"
        )
    if not cfg.resume and out.is_dir() and any(p.name != ".lock" for p in out.iterdir()):
        raise ConfigError(
            f"--out {out} holds files that are not a tunelab run; choose a new or empty folder"
        )
    cfg.out = str(out)
    return out


def check_context(cfg: RunConfig, model) -> None:
    """--seq-len within the model's context (positions beyond it do not exist); the default
    seq_len is lowered to a shorter context, a chosen one is refused."""
    from tunelab.train.config import TrainConfig

    context = model.cfg.max_seq_len
    if cfg.train.seq_len > context and cfg.train.seq_len == TrainConfig.seq_len:
        log.info("seq_len: %d, the model's context (default %d)", context, cfg.train.seq_len)
        cfg.train.seq_len = context
    elif cfg.train.seq_len > context:
        raise ConfigError(
            f"--seq-len {cfg.train.seq_len}: beyond the model's context of {context} tokens"
        )


def open_run_dir(cfg: RunConfig, out: Path, owned: ExitStack) -> None:
    """Create the run directory, own it until `owned` closes, clean what an interrupted start
    left behind, and write config.yaml: the first write of a run, after every check passed."""
    from tunelab.train.rundir import clean_temporaries, own_run_dir

    owned.enter_context(own_run_dir(out))
    for path in clean_temporaries(out):
        log.info("removed %s (left by an interrupted write)", path)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_for_resume(run_dir: str | Path, overrides: dict) -> RunConfig:
    """The stored config of a run, with the command line's overrides on top."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise ConfigError(f"{run_dir}: no config.yaml, so nothing to resume")
    cfg = load_config(path, {k: v for k, v in overrides.items() if k not in ("resume", "out")})
    cfg.out, cfg.resume = str(run_dir), True
    return cfg


def resume_notes(run_dir: Path, checkpoint: Path | None, step: int) -> None:
    """Say where a resumed run continues from; forget the metrics it will replay."""
    from tunelab.train.rundir import truncate_metrics

    if checkpoint is None:
        log.info("resuming %s: no checkpoint yet, starting from step 0", run_dir)
    else:
        log.info("resuming %s from %s (step %d)", run_dir, checkpoint, step)
    dropped = truncate_metrics(run_dir, step)
    if dropped:
        log.info(
            "metrics.jsonl: %d records after step %d dropped (they are replayed)", dropped, step
        )


def write_summary(run_dir: Path, summary: dict) -> None:
    atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2))


def total_steps(cfg: RunConfig, batches) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * len(batches) / cfg.train.grad_accum))


def before_after(before: dict, after: dict) -> dict:
    """{name: {before, after}}, one level down for grouped metrics such as perplexity."""
    out = {}
    for k, v in before.items():
        if isinstance(v, dict):
            out[k] = {sub: {"before": v[sub], "after": after[k][sub]} for sub in v}
        else:
            out[k] = {"before": v, "after": after[k]}
    return out


def run_training(
    cfg: RunConfig,
    kind: str = "auto",
    callbacks: Sequence[Callback] = (),
    task: Task | None = None,
) -> dict:
    """Train as the config says and return summary.json's contents; resumes when asked.

    Under torchrun every rank trains on its shard of the data; only rank 0 writes the run."""
    from tunelab.adapt import apply_method
    from tunelab.adapt.params import format_report, param_report
    from tunelab.train.checkpoints import latest_checkpoint
    from tunelab.train.distributed import launch
    from tunelab.train.loop import Trainer
    from tunelab.train.optim import fp32_master_weights

    check_options(cfg)  # every option before any loading or writing
    task = task or LMTask(kind)
    with launch(cfg.train) as dist, ExitStack() as owned:
        # Rank 0 names and checks the run directory (a default name holds the time); it is
        # created, locked and given its config only once the model and data have loaded.
        run_dir = Path(dist.broadcast(str(prepare_run_dir(cfg)) if dist.is_main else None))
        cfg.out = str(run_dir)
        summary_file = run_dir / "summary.json"
        done = cfg.resume and dist.is_main and summary_file.exists()
        finished = dist.broadcast(json.loads(summary_file.read_text()) if done else None)
        if finished is not None:  # a finished run: every rank returns rank 0's summary
            return finished
        torch.manual_seed(cfg.train.seed)
        model, tokenizer = load_for_training(cfg, dist.device)
        model = task.prepare(model, tokenizer, cfg)
        callbacks = [*apply_method(model, cfg.method), *callbacks]
        check_context(cfg, model)
        # FSDP shards each block as one flat group, which wants a single dtype: all fp32 there.
        fp32_master_weights(model, callbacks, everything=dist.strategy == "fsdp")
        model.transformer.checkpoint_blocks = cfg.train.activation_checkpointing
        # kernels for the layers the method and task added too; FSDP keeps torch's (runtime/)
        runtime = prepare_runtime(model, cfg.runtime, sharded=dist.strategy == "fsdp")
        params = param_report(model)
        if dist.is_main:
            log.info(format_report(params))
        train_b, val_b, data_stats = task.data(cfg, tokenizer, dist.rank, dist.world)
        if dist.is_main:
            open_run_dir(cfg, run_dir, owned)
        model.eval()
        before = task.measure(model, tokenizer, cfg, val_b)
        set_dropout(model, cfg.train.dropout)
        dist.shard(model)  # FSDP only; DDP wraps in the loop, which keeps the plain module
        steps = total_steps(cfg, train_b)
        trainer = Trainer(
            model,
            task.objective,
            train_b,
            cfg.train,
            run_dir,
            steps,
            val_batches=val_b,
            callbacks=callbacks,
            evaluators=task.evaluators(cfg, tokenizer),
            dist=dist,
        )
        checkpoint = latest_checkpoint(run_dir) if cfg.resume else None
        checkpoint = dist.broadcast(checkpoint)  # rank 0's choice; other nodes need a shared disk
        if checkpoint is not None:
            trainer.load_checkpoint(checkpoint)
        if cfg.resume and dist.is_main:
            resume_notes(run_dir, checkpoint, trainer.step)
        summary = trainer.fit()
        # the moments and gradients are done with (the last checkpoint keeps them): their memory
        # goes to the evaluation and the final save, which would otherwise peak on top of them
        trainer.optimizer.state.clear()
        model.zero_grad(set_to_none=True)
        # and the heap pages they and the activations held go back to the system: glibc keeps
        # freed small blocks, and a 7B QLoRA run's save peaked 0.65 GiB over training on them
        release_freed()
        set_dropout(model, 0.0)
        model.eval()
        summary.update(before_after(before, task.measure(model, tokenizer, cfg, val_b)))
        summary.update(task.finish(model, tokenizer, cfg, val_b, run_dir))
        summary["params"] = params
        summary["precision"] = dict(
            weights=cfg.train.precision, trainable="fp32", compute=compute_precision(cfg.train)
        )
        if dist.auto_precision:
            summary["precision"]["auto"] = dist.auto_precision
        summary["runtime"] = runtime.record(model)
        summary.update(
            task=cfg.task,
            model=cfg.model if not cfg.arch else cfg.arch,
            method=cfg.method.get("name", "full"),
            data=data_stats,
        )

        def rebuild():  # the model as it was before FSDP, to hold the gathered weights
            plain = task.prepare(load_for_training(cfg, torch.device("cpu"))[0], tokenizer, cfg)
            apply_method(plain, cfg.method)
            return plain

        model = dist.unshard(model, rebuild)
        release_scratch()  # QLoRA's shared dequantization buffer: the save merges afresh
        release_freed()  # what the final evaluation's activations held, before the save
        if dist.is_main:
            # fp32 runs stay fp32; bf16/fp16 runs are saved in the dtype they were loaded in
            save_final(model, tokenizer, run_dir / "final", DTYPES[cfg.train.precision])
            write_summary(run_dir, summary)
        return summary


def save_final(model, tokenizer, path: Path, dtype: torch.dtype | None = None) -> None:
    """The trained model in tunelab format (LoRA merged, quantized bases dequantized, written
    one tensor at a time); a LoRA run also keeps its adapter in PEFT format."""
    from tunelab.adapt.lora import lora_modules, merged_tensors
    from tunelab.adapt.peft_format import save_adapter
    from tunelab.model.checkpoint import save_model_dir

    if lora_modules(model):
        save_adapter(model, path.with_name("adapter"))
    save_model_dir(model, tokenizer, path, tensors=merged_tensors(model, dtype))
