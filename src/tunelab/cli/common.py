"""Helpers every subcommand shares: model and sampling options, loading, output."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from tunelab.paths import nearest_existing

EPILOG = (
    "Models: a known name (see `tunelab models`), a model directory, a .gguf file, or a hub id."
)


class Parser(argparse.ArgumentParser):
    """argparse with its errors in one line, the usage left to --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def at_least(low: int):
    """An argparse type: an integer no smaller than low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: must be at least {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def shot_counts(text: str) -> list[int]:
    """--shots: comma-separated counts of demonstrations, each 0 or more."""
    counts = [at_least(0)(part.strip()) for part in str(text).split(",")]
    return counts


def writable(path: Path, flag: str) -> None:
    """Refuse, before any work, an output path that cannot be written."""
    from tunelab.errors import ConfigError

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give a file name")
    parent = nearest_existing(path.parent)
    target = path if path.exists() else parent
    if not parent.is_dir() or not os.access(target, os.W_OK):
        raise ConfigError(f"{flag} {path}: cannot write there (permission denied or not a folder)")


def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="smollm2-135m-instruct", help="model name, directory, .gguf or hub id"
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "fp16", "auto"],
        help="weights dtype; auto: bf16 on CPUs with AMX and GPUs with bf16, else fp32 [fp32]",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)


def sampling(a):
    from tunelab.generate import Sampling

    return Sampling(
        a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.repetition_penalty, a.stop, a.seed
    )


def load_model(a):
    from tunelab.loading import load

    return load(a.model, precision=a.precision, device=a.device)


def emit(a, result: dict, text: str) -> None:
    print(json.dumps(result) if a.json else text)


def prompt_args(q) -> None:
    """The prompt flags shared by `evaluate icl` and `compare --eval icl`."""
    q.add_argument(
        "--format",
        choices=("auto", "chat", "plain"),
        default="auto",
        help="plain: 'Field: {text}\\nSentiment:' text, for chat models too (auto: it "
        "scored higher than chat templates, docs/BENCHMARKS.md); chat: through the model's "
        "chat template with an instruction naming the labels [auto]",
    )
    q.add_argument(
        "--layout",
        choices=("auto", "turns", "inline"),
        default="auto",
        help="chat format: demonstrations as prior user/assistant turns (turns) or listed in "
        "the example's user turn (inline) [auto: turns]",
    )
    q.add_argument(
        "--instruction",
        default=None,
        help="instruction before each example; default names the labels "
        "(chat format only); '' for none",
    )
    q.add_argument(
        "--label-words",
        default=None,
        help="comma-separated words scored for the labels, in label order [the names]",
    )
    q.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="divide out the prompt's label prior (see --calibration) [on; with "
        "--calibration content-free: at 0 shots only]",
    )
    q.add_argument(
        "--calibration",
        choices=("batch", "content-free"),
        default="batch",
        help="where the label prior comes from: the scored examples' mean label "
        "probabilities (batch calibration, Zhou et al. 2024; assumes no label dominates the "
        "data) or content-free inputs such as 'N/A' (Zhao et al. 2021) [batch]",
    )
    q.add_argument(
        "--draws",
        type=at_least(1),
        default=None,  # evaluate.icl.DRAWS; imported when a command runs, not for --help
        metavar="N",
        help="at k > 0 shots, score each example under N draws of demonstrations (draw i "
        "seeded --seed + 1000001*i) and predict from their averaged label probabilities; each "
        "draw's accuracy is reported too. Costs N times the k-shot forward passes; 1: the "
        "single draw --seed picks [3]",
    )
