"""`tunelab evaluate METRIC`: measure a model without training it."""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from tunelab.cli.common import (
    EPILOG,
    at_least,
    emit,
    load_model,
    model_args,
    prompt_args,
    sampling,
    sampling_args,
    shot_counts,
    writable,
)


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


def _labeled(a, labels: list[str] | None):
    """(records, gold indices, label names) from --data with the field flags."""
    from tunelab.data import load_records, require_fields
    from tunelab.data.templates import label_index, label_names

    records = load_records(a.data)
    require_fields(records, [a.text_field, a.label_field], a.data)
    labels = labels or label_names(records, a.label_field, a.labels and [a.labels])
    return records, [label_index(r, a.label_field, labels) for r in records], labels


def _run_template(model_path: str) -> str | None:
    """The prompt modifiers a classifier was trained with, from its run's config.yaml."""
    from tunelab.files import read_yaml

    config = Path(model_path).parent / "config.yaml"
    if config.exists():
        return ((read_yaml(config, "run config") or {}).get("classify") or {}).get("template")
    return None


def _metrics_text(m: dict) -> str:
    return f"accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  ({m['examples']} examples)"


def cmd_classification(a) -> None:
    from tunelab.data import Batches
    from tunelab.data.templates import encode_classification
    from tunelab.errors import ModelError
    from tunelab.evaluate.classification import metrics, predict, write_predictions

    if a.predictions:
        writable(a.predictions, "--predictions")  # before the evaluation, not after it
    lm = load_model(a)
    labels = list(lm.model.cfg.labels)
    if not labels:
        raise ModelError(f"{a.model} is not a classifier; use `tunelab evaluate icl` for prompting")
    records, gold, _ = _labeled(a, labels)
    template = a.template or _run_template(a.model) or "{text}"
    examples = encode_classification(
        records,
        lm.tokenizer,
        labels,
        text_field=a.text_field,
        label_field=a.label_field,
        template=template,
        seq_len=a.seq_len,
    )
    pad = lm.tokenizer.batch_pad_id
    gold, probs = predict(lm.model, Batches(examples, a.batch_size, pad_id=pad, shuffle=False))
    result = metrics(gold, probs.argmax(-1).tolist(), labels)
    if a.predictions:
        write_predictions(a.predictions, records, gold, probs, labels, a.text_field)
    emit(a, result, _metrics_text(result))


def _icl_line(k: str, m: dict) -> str:
    low, high = m["accuracy_interval"]
    share = "  ".join(
        f"{name} {n / max(1, m['examples']):.0%}" for name, n in m["predicted"].items()
    )
    other = m["without_calibration" if m["calibrated"] else "with_calibration"]
    spread = m["draw_accuracy"]
    draws = (  # the lottery a single draw would have been, beside the ensemble
        f"; {m['draws']} demonstration draws averaged, each alone {spread['min']:.4f}-"
        f"{spread['max']:.4f}"
        if m["draws"] > 1
        else ""
    )
    return (
        f"{k}-shot: accuracy {m['accuracy']:.4f} [95% CI {low:.3f}-{high:.3f}]  macro-F1 "
        f"{m['macro_f1']:.4f}  predicted: {share}  ({m['examples']} examples; "
        f"{'calibrated (' + m['calibration'] + ')' if m['calibrated'] else 'uncalibrated'}, "
        "the other way: accuracy "
        f"{other['accuracy']:.4f}{draws})"
    )


def prompt_spec(a):
    """The prompt flags as a PromptSpec (None fields are derived from model and fields)."""
    from tunelab.evaluate.prompts import PromptSpec

    words = [w.strip() for w in a.label_words.split(",")] if a.label_words else None
    return PromptSpec(a.format, a.template, a.instruction, words, a.layout)


def cmd_icl(a) -> None:
    from tunelab.data import load_records
    from tunelab.data.templates import label_index
    from tunelab.evaluate.icl import DRAWS, evaluate_icl
    from tunelab.evaluate.prompts import resolve_prompt
    from tunelab.train.progress import Progress

    records, gold, labels = _labeled(a, None)
    shots = a.shots
    order = list(range(len(records)))
    random.Random(a.seed).shuffle(order)
    if a.demos:  # demonstrations from their own file
        pool = load_records(a.demos)
        pool_gold = [label_index(r, a.label_field, labels) for r in pool]
    else:  # else a seeded slice of the data, never scored
        n_pool = max(8, 4 * max(shots))
        pool, pool_gold = [records[i] for i in order[:n_pool]], [gold[i] for i in order[:n_pool]]
        order = order[n_pool:]
    scored = order[: a.limit] if a.limit else order
    spec = prompt_spec(a)
    lm = load_model(a)
    resolve_prompt(spec, lm.tokenizer, labels, a.text_field, a.label_field)  # errors before work
    draws = a.draws or DRAWS
    passes = sum(draws if k else 1 for k in shots)  # 0 shots: one prompt, one draw
    with Progress(len(scored) * passes, label="prompting") as bar:
        result = evaluate_icl(
            lm.model,
            lm.tokenizer,
            [records[i] for i in scored],
            [gold[i] for i in scored],
            labels,
            shots,
            demo_records=pool,
            demo_gold=pool_gold,
            prompt=spec,
            calibrate_scores=a.calibrate,
            calibration=a.calibration,
            text_field=a.text_field,
            label_field=a.label_field,
            seed=a.seed,
            demo_order=a.demo_order,
            draws=draws,
            progress=bar.advance,
        )
    if a.json:
        return print(json.dumps(result))
    p = result["prompt"]
    print(f"prompt ({p['format']}): {json.dumps(p['example'])}; label words {p['label_words']}")
    for k, m in result["shots"].items():
        print(_icl_line(k, m))


def instructions_text(r: dict) -> str:
    """The four accuracies with their intervals, one line each."""
    lines = []
    for m in ("prompt_strict", "instruction_strict", "prompt_loose", "instruction_loose"):
        lo, hi = r["intervals"][m]
        lines.append(f"{m:<20}{r[m]:.4f}  [{lo:.4f}, {hi:.4f}]")
    lines.append(
        f"{r['n']} prompts, {r['instructions']} instructions; "
        f"{r['confidence']:.0%} bootstrap intervals over prompts"
    )
    return "\n".join(lines)


def cmd_instructions(a) -> None:
    from tunelab.evaluate.instructions import (
        evaluate_instructions,
        score_responses,
        write_responses,
    )
    from tunelab.instructions.score import read_prompts, read_responses
    from tunelab.train.progress import Progress

    if a.out:
        writable(Path(a.out) / "responses.jsonl", "--out")
    records = read_prompts(a.data, a.limit)
    if a.responses:  # another system's outputs: score only
        responses = read_responses(a.responses, records)
        result, scores = score_responses(records, responses)
        result["responses"] = str(a.responses)
    else:
        s = sampling(a)  # bad settings stop here, before the model loads
        lm = load_model(a)
        t0 = time.perf_counter()
        with Progress(len(records), label="generating") as bar:
            result, responses, scores = evaluate_instructions(
                lm.model, lm.tokenizer, records, s, a.batch_size, progress=bar.advance
            )
        result["generation"]["wall_s"] = round(time.perf_counter() - t0, 3)
        result["model"] = a.model
    result["data"] = str(a.data)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        write_responses(out / "responses.jsonl", records, responses, scores)
        (out / "summary.json").write_text(json.dumps(result, indent=2))
    shown = {k: v for k, v in result.items() if k != "per_prompt"}
    if a.json:
        return print(json.dumps(shown))
    print(instructions_text(result))
    if "generation" in result:
        g = result["generation"]
        print(
            f"generation: {g['new_tokens']} tokens in {g['generation_s']:.1f} s "
            f"({g['tokens_per_s']:.1f} tok/s), batch {g['batch_size']}"
        )
    if a.out:
        print(f"responses: {Path(a.out) / 'responses.jsonl'}")


def _labeled_args(q) -> None:
    q.add_argument("--data", required=True, help="labeled records: CSV/TSV, JSON/JSONL, Parquet")
    q.add_argument("--text-field", default="text", help="column holding the text [text]")
    q.add_argument("--label-field", default="label", help="column holding the label [label]")
    q.add_argument(
        "--template", default=None, help="prompt modifiers, e.g. 'Review: {text}\\nSentiment:'"
    )


def register(sub) -> None:
    """Add `evaluate` and its metrics."""
    p = sub.add_parser(
        "evaluate", help="measure a model: perplexity, classification, prompting, instructions"
    )
    ev = p.add_subparsers(dest="metric", required=True, metavar="METRIC")
    q = ev.add_parser("perplexity", help="sliding-window perplexity over text files", epilog=EPILOG)
    model_args(q)
    q.add_argument("--data", nargs="+", required=True, help="text files or folders")
    q.add_argument(
        "--window",
        type=at_least(2),
        default=None,
        help="tokens per window (default min(1024, context))",
    )
    q.add_argument(
        "--stride",
        type=at_least(1),
        default=None,
        help="new tokens scored per window (default window/2)",
    )
    q.add_argument(
        "--max-tokens", type=at_least(1), default=None, help="score only the first N tokens"
    )
    q.set_defaults(func=cmd_perplexity)

    q = ev.add_parser(
        "classification", help="accuracy and macro-F1 of a trained classifier", epilog=EPILOG
    )
    model_args(q)
    _labeled_args(q)
    q.add_argument("--labels", default=None, help=argparse.SUPPRESS)
    q.add_argument("--batch-size", type=at_least(1), default=16)
    q.add_argument("--seq-len", type=at_least(1), default=512, help="max tokens per example")
    q.add_argument("--predictions", type=Path, help="write per-example predictions (JSONL) here")
    q.set_defaults(func=cmd_classification)

    q = ev.add_parser("icl", help="classify by prompting: 0/1/k-shot label scoring", epilog=EPILOG)
    model_args(q)
    _labeled_args(q)
    q.add_argument("--labels", default=None, help="label names in index order, comma-separated")
    q.add_argument(
        "--shots", type=shot_counts, default=[0], help="comma-separated shot counts, e.g. 0,1,4"
    )
    q.add_argument("--demos", default=None, help="demonstration pool file; default: part of --data")
    q.add_argument("--limit", type=at_least(1), default=None, help="score at most N examples")
    q.add_argument("--seed", type=int, default=0, help="seed for demonstrations and the sample")
    q.add_argument(
        "--demo-order",
        choices=("shuffle", "alternate"),
        default="shuffle",
        help="demonstrations in seeded order, or alternating labels [shuffle]",
    )
    prompt_args(q)
    q.set_defaults(func=cmd_icl)

    q = ev.add_parser(
        "instructions",
        epilog=EPILOG,
        help="instruction following (IFEval): generate, then check each response",
    )
    model_args(q)
    sampling_args(q)
    q.set_defaults(max_new_tokens=256)
    q.add_argument(
        "--data", required=True, help="IFEval-style JSONL: prompt, instruction_id_list, kwargs"
    )
    q.add_argument("--limit", type=at_least(1), default=None, help="the first N prompts only")
    q.add_argument("--batch-size", type=at_least(1), default=8, help="prompts per batch [8]")
    q.add_argument(
        "--responses",
        type=Path,
        default=None,
        help="score these responses (JSONL: prompt, response) instead of generating",
    )
    q.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write responses.jsonl (verdicts per instruction) and summary.json here",
    )
    q.set_defaults(func=cmd_instructions)

    from tunelab.cli.image import counting_parser

    counting_parser(ev)
