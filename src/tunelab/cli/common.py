"""Helpers every subcommand shares: model and sampling options, loading, output."""

from __future__ import annotations

import argparse
import json

EPILOG = (
    "Models: a known name (see `tunelab models`), a model directory, a .gguf file, or a hub id."
)


def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="smollm2-135m-instruct", help="model name, directory, .gguf or hub id"
    )
    p.add_argument(
        "--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights dtype"
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
    import tunelab

    return tunelab.load(a.model, precision=a.precision, device=a.device)


def emit(a, result: dict, text: str) -> None:
    print(json.dumps(result) if a.json else text)
