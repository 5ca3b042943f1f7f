"""`tunelab evaluate METRIC`: measure a model without training it."""

from __future__ import annotations

from tunelab.cli.common import EPILOG, emit, load_model, model_args


def cmd_perplexity(a) -> None:
    from tunelab.evaluate.perplexity import perplexity, read_texts

    text = read_texts(a.data)
    lm = load_model(a)
    r = perplexity(lm.model, lm.tokenizer, text, a.window, a.stride, a.max_tokens)
    emit(
        a,
        r,
        f"perplexity {r['perplexity']:.3f} over {r['tokens']} tokens (window {r['window']}, stride {r['stride']})",
    )


def register(sub) -> None:
    """Add `evaluate` and its metrics."""
    p = sub.add_parser("evaluate", help="measure a model: perplexity, ...")
    ev = p.add_subparsers(dest="metric", required=True, metavar="METRIC")
    q = ev.add_parser("perplexity", help="sliding-window perplexity over text files", epilog=EPILOG)
    model_args(q)
    q.add_argument("--data", nargs="+", required=True, help="text files or folders")
    q.add_argument(
        "--window", type=int, default=None, help="tokens per window (default min(1024, context))"
    )
    q.add_argument(
        "--stride", type=int, default=None, help="new tokens scored per window (default window/2)"
    )
    q.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    q.set_defaults(func=cmd_perplexity)
