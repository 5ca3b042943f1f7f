"""`tunelab align`: preference alignment (DPO, IPO, hinge) with every run option of finetune."""

from __future__ import annotations

import argparse
import json

from tunelab.cli.common import EPILOG
from tunelab.cli.train import print_instructions, resumable, run_overrides, train_args

ALIGN_ALIASES = {
    "--loss": "align.loss",
    "--beta": "align.beta",
    "--label-smoothing": "align.label_smoothing",
}
HELP = "align a language model to preference pairs (prompt, chosen, rejected): DPO, IPO, hinge"


def cmd_align(a) -> None:
    from tunelab.train.config import load_config
    from tunelab.train.run import config_for_resume
    from tunelab.train.tasks import run_task

    overrides = run_overrides(a)
    if a.resume:
        cfg = config_for_resume(a.resume, overrides)
    else:
        cfg = load_config(a.config, {**overrides, "task": "align"})
    summary = resumable(lambda: run_task(cfg), cfg)
    if a.json:
        return print(json.dumps(summary))
    print(f"run: {cfg.out}")
    for key in ("steps", "wall_time_s", "tokens_per_s", "final_val_loss", "trainable_params"):
        print(f"  {key}: {summary.get(key)}")
    for key in ("preference_accuracy", "reward_margin"):
        if key in summary:
            print(f"  {key}: {summary[key]['before']:.3f} -> {summary[key]['after']:.3f}")
    print_instructions(summary)


def register(sub) -> None:
    """Add the `align` subcommand."""
    p = sub.add_parser(
        "align", help=HELP, description=HELP, epilog=EPILOG, usage="tunelab align [options]"
    )
    train_args(p)
    from tunelab.train.config import option_docs

    docs = {key: (default, doc) for key, default, doc, _ in option_docs()}
    group = p.add_argument_group("alignment (aliases of align.*)")
    for flag, key in ALIGN_ALIASES.items():
        default, doc = docs[key]
        group.add_argument(flag, dest=key, default=argparse.SUPPRESS, help=f"{doc} [{default}]")
    for flag, key in (("--precompute-ref", "align.precompute_ref"), ("--strict", "align.strict")):
        default, doc = docs[key]
        group.add_argument(
            flag,
            dest=key,
            nargs="?",
            const="true",
            default=argparse.SUPPRESS,
            metavar="BOOL",
            help=f"{doc} [{default}]",
        )
    p.set_defaults(func=cmd_align, task="align", overrides=True)
