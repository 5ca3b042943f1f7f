"""Training commands: every option of the run config as a flag, plus short aliases."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from tunelab.cli.common import EPILOG

# Short flags every training command takes, each an alias of a dotted config key.
ALIASES = {
    "--model": "model", "--arch": "arch", "--tokenizer": "tokenizer", "--out": "out",
    "--data": "data.path", "--val-data": "data.val_path", "--max-steps": "train.max_steps",
    "--epochs": "train.epochs", "--batch-size": "train.batch_size", "--grad-accum": "train.grad_accum",
    "--lr": "train.lr", "--seq-len": "train.seq_len", "--seed": "train.seed",
    "--eval-every": "train.eval_every", "--save-every": "train.save_every",
    "--precision": "train.precision", "--autocast": "train.autocast", "--dist": "train.dist", "--method": "method.name", "--eval-domain": "eval.domain", "--eval-general": "eval.general",
    "--eval-instructions": "eval.instructions",
    "--text-field": "data.text_field", "--label-field": "classify.label_field",
    "--labels": "classify.labels", "--template": "classify.template", "--folds": "classify.folds",
}  # fmt: skip
# Switches: the flag alone turns a boolean option on (--train.KEY false turns it off again).
SWITCHES = {"--activation-checkpointing": "train.activation_checkpointing"}


def train_args(p: argparse.ArgumentParser, resume: bool = True) -> None:
    """Every option of the run config as a flag; resume: the --resume flag of a training run."""
    from tunelab.adapt import METHODS
    from tunelab.train.config import option_docs

    p.add_argument("--config", type=Path, help="YAML recipe (see recipes/); flags override it")
    if resume:
        p.add_argument(
            "--resume", metavar="RUN_DIR", help="continue this run from its latest checkpoint"
        )
    done = (
        "print summary.json on stdout at the end" if resume else "print one JSON object on stdout"
    )
    p.add_argument("--json", action="store_true", help=done)
    docs = {key: (default, doc) for key, default, doc, _ in option_docs()}
    docs["method.name"] = (
        "full",
        f"{', '.join(METHODS[:-1])} or {METHODS[-1]}; options as --method.KEY VALUE "
        "(e.g. --method.r 16)",
    )
    short = p.add_argument_group("common options (aliases of the dotted keys below)")
    for flag, key in ALIASES.items():
        default, doc = docs[key]
        short.add_argument(flag, dest=key, default=argparse.SUPPRESS, help=f"{doc} [{default}]")
    for flag, key in SWITCHES.items():
        short.add_argument(
            flag,
            dest=key,
            action="store_const",
            const=True,
            default=argparse.SUPPRESS,
            help=f"{docs[key][1]} [off]",
        )
    every = p.add_argument_group("every option, as --section.key VALUE")
    for key, (default, doc) in docs.items():
        if f"--{key}" in ALIASES or key in ("resume", "task"):
            continue
        every.add_argument(
            f"--{key}", dest=key, default=argparse.SUPPRESS, metavar="V", help=f"{doc} [{default}]"
        )


def run_overrides(a) -> dict:
    """The dotted config keys a command line set ({'train.lr': '1e-4'}), the rest left out."""
    skip = {"command", "func", "debug", "config", "resume", "json", "task", "overrides"}
    return {k: v for k, v in vars(a).items() if k not in skip}


def resumable(fn, cfg):
    """fn(); an interruption (Ctrl-C, SIGTERM) is re-raised with how to resume the run."""
    try:
        return fn()
    except KeyboardInterrupt as e:
        if cfg.out and (Path(cfg.out) / "config.yaml").exists():
            e.args = (*e.args, f"resume with: tunelab {cfg.task} --resume {cfg.out}")
        raise


def cmd_train(a) -> None:
    from tunelab.train.config import load_config
    from tunelab.train.run import config_for_resume
    from tunelab.train.tasks import run_task

    overrides = run_overrides(a)
    if a.resume:
        cfg = config_for_resume(a.resume, overrides)
    else:
        cfg = load_config(a.config, {**overrides, "task": a.task})
    summary = resumable(lambda: run_task(cfg), cfg)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return
    if a.json:
        return print(json.dumps(summary))
    print(f"run: {cfg.out}")
    for key in (
        "steps",
        "wall_time_s",
        "tokens_per_s",
        "final_val_loss",
        "trainable_params",
        "peak_memory_mb",
        "accuracy",
        "macro_f1",
    ):
        if key in summary:
            print(f"  {key}: {summary[key]}")
    for name, ppl in summary.get("perplexity", {}).items():
        print(f"  perplexity {name}: {ppl['before']:.2f} -> {ppl['after']:.2f}")
    print_instructions(summary)


def print_instructions(summary: dict) -> None:
    """Instruction following before -> after, when the run measured it."""
    ins = summary.get("instructions") or {}
    for key in ("prompt_strict", "instruction_strict", "prompt_loose", "instruction_loose"):
        if key in ins:
            print(f"  instructions {key}: {ins[key]['before']:.3f} -> {ins[key]['after']:.3f}")


def register(sub) -> None:
    """Add the training subcommands."""
    for task, text in (
        ("pretrain", "continued pretraining (or from scratch with --arch) on raw text"),
        ("finetune", "supervised fine-tuning on instructions or chat messages"),
        ("classify", "train a classifier (decoder or encoder) on labeled text"),
    ):
        p = sub.add_parser(
            task, help=text, description=text, epilog=EPILOG, usage=f"tunelab {task} [options]"
        )
        train_args(p)
        p.set_defaults(func=cmd_train, task=task, overrides=True)
