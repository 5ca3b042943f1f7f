"""The `tunelab` command: one subcommand per workflow, each a thin layer over the library."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from tunelab.errors import ConfigError, TunelabError, closest
from tunelab.runtime import allocator


def build_parser() -> argparse.ArgumentParser:
    from tunelab.cli import align, evaluate, image, models, runtime, study, train
    from tunelab.cli.common import EPILOG, Parser

    parser = Parser(
        prog="tunelab",
        description="Adapt language models and measure what each technique costs and gains.",
        epilog=EPILOG,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (models, train, align, evaluate, image, study, runtime):
        module.register(sub)
    return parser


def entry() -> int:
    """The `tunelab` command: once its arguments parse, it restarts with glibc set to reuse
    freed memory (runtime/allocator.py) unless runtime.allocator is system."""
    return main(sys.argv[1:], restart=True)


def _allocator(args) -> str:
    """keep or system for this command: runtime.allocator from a flag, else its --config or
    --resume run's config.yaml, else auto (TUNELAB_MALLOC overrides, in allocator_choice);
    auto decides by the size of the largest model the command names."""
    chosen = getattr(args, "runtime.allocator", None)
    configs = [_yaml(getattr(args, "config", None))]
    if getattr(args, "resume", None) and isinstance(args.resume, str):
        configs.append(_yaml(Path(args.resume) / "config.yaml"))
    for data in configs if chosen is None else []:
        section = data.get("runtime")
        if isinstance(section, dict) and section.get("allocator"):
            chosen = section["allocator"]
            break
    choice = allocator.allocator_choice(chosen)
    if choice != "auto":
        return choice
    if getattr(args, "command", None) == "study" and isinstance(getattr(args, "recipe", None), str):
        configs.append(_yaml(args.recipe))
    return allocator.for_model("auto", _largest(args, configs))


def _yaml(path) -> dict:
    from tunelab.files import read_yaml

    try:
        data = read_yaml(path) if path else None
    except (OSError, ConfigError):
        return {}  # the command itself reports an unreadable file
    return data if isinstance(data, dict) else {}


def _largest(args, configs: list[dict]) -> int | None:
    """Parameters of the largest model named by --model, a config's model or a recipe's models
    (None when none can be sized, e.g. offline with a hub id)."""
    from tunelab.model.inspect import param_count

    names = [getattr(args, "model", None)] + [c.get("model") for c in configs]
    for exp in (e for c in configs for e in c.get("experiments") or [] if isinstance(e, dict)):
        names += list(exp.get("models") or []) + [(exp.get("config") or {}).get("model")]
    sizes = []
    for name in {n for n in names if isinstance(n, str) and n}:
        try:
            sizes.append(param_count(name))
        except (TunelabError, OSError, ValueError):
            continue
    return max(sizes, default=None)


def _subparser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The parser of the subcommand (and sub-subcommand) that args chose."""
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        for name in ("command", "metric", "action"):
            choice = action.choices.get(getattr(args, name, None) or "")
            if choice is not None:
                return _subparser(choice, args) if choice._subparsers else choice
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Python is, so it stops a run as Ctrl-C does (exit 143)."""


def _terminate(signum, frame) -> None:
    raise Terminated("terminated")


def main(argv: list[str] | None = None, restart: bool = False) -> int:
    """Run one command; restart: the `tunelab` command's own process may restart itself with
    the allocator settings once the arguments parse (never for --help or a usage error)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        if rest:  # unknown dotted options go to the config, which names the closest valid key
            flags = rest[::2] if len(rest) % 2 == 0 else rest
            if (
                not getattr(args, "overrides", False)
                or len(rest) % 2
                or any(not f.startswith("--") or "." not in f for f in flags)
            ):
                unknown = next((f for f in rest if f.startswith("-")), rest[0])
                sub = _subparser(parser, args)
                options = [o for o in sub._option_string_actions if o.startswith("--")]
                sub.error(f"unrecognized arguments: {' '.join(rest)}{closest(unknown, options)}")
            for flag, value in zip(rest[::2], rest[1::2]):
                setattr(args, flag.lstrip("-"), value)
        # parsed: --help and usage errors never get here; a restarted process does not size again
        if restart and not allocator.active() and _allocator(args) == "keep":
            allocator.reexec(sys.argv[1:] if argv is None else argv)
        args.func(args)
    except TunelabError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a command adds how to resume to the exception's args
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        hint = [str(a) for a in e.args if str(a) != "terminated"]
        print("; ".join([what, *hint]), file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
