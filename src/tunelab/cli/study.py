"""Studies: `tunelab study` runs a recipe's grid, `report` renders it, `compare` puts several
models through the same evaluations."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("tunelab")


def _fmt(value) -> str:
    if isinstance(value, dict):
        mean, std = value["mean"], value["std"]
        return f"{mean:.4g} ± {std:.2g}" if std else f"{mean:.4g}"
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from tunelab.study.results import short_model

    table = Table(
        "experiment",
        "model",
        "method",
        "seeds",
        "metric",
        "value",
        "wall s",
        "peak MiB",
        "trainable",
        title=f"study {results['study']}",
    )
    for g in results["groups"]:
        seeds = f"{g['seeds']}" + (f" ({g['failed']} failed)" if g["failed"] else "")
        table.add_row(
            g["experiment"],
            short_model(g["model"]),
            g["method"],
            seeds,
            g["metric"],
            _fmt(g.get("value")),
            _fmt(g.get("wall_time_s")),
            _fmt(g.get("peak_memory_mb")),
            _fmt(g.get("trainable_params")),
        )
    Console(stderr=False, width=160).print(table)


def _finish(a, study_dir: Path, results: dict) -> None:
    from tunelab.errors import TunelabError
    from tunelab.study.report import write_report

    html, md = write_report(study_dir)
    failed = [r for r in results["rows"] if r["status"] == "failed"]
    if a.json:
        print(json.dumps({**results, "report": str(html), "report_md": str(md)}))
    else:
        print_table(results)
        for r in failed:
            print(f"failed: {r['run']}: {r['error']}")
        print(f"report: {html}")
    if failed and len(failed) == len(results["rows"]):
        raise TunelabError(
            f"every run of the study failed ({len(failed)}); the first: "
            f"{failed[0]['run']}: {failed[0]['error']}"
        )


def cmd_study(a) -> None:
    from tunelab.paths import check_folder_out
    from tunelab.study.study import Study, load_recipe

    recipe = load_recipe(a.recipe, quick=a.quick)
    out = Path(a.out or f"studies/{recipe.get('study', Path(a.recipe).stem)}")
    check_folder_out(out, "the study")
    results = Study(recipe, out).run()
    _finish(a, out, results)


def cmd_report(a) -> None:
    from tunelab.errors import ConfigError
    from tunelab.study.report import write_report

    if not (Path(a.study) / "results.json").exists():
        raise ConfigError(f"{a.study}: no results.json; run `tunelab study RECIPE --out {a.study}`")
    html, md = write_report(a.study)
    print(json.dumps({"report": str(html), "report_md": str(md)}) if a.json else f"report: {html}")


def compare_recipe(models: list[str], evals: list[str], data: dict) -> dict:
    """A study recipe that puts every model through the same evaluation-only cells."""
    experiments = []
    if "perplexity" in evals:
        experiments.append(
            {
                "name": "perplexity",
                "task": "perplexity",
                "models": models,
                "methods": {"as-is": {}},
                "config": {
                    "eval": {"domain": data["domain"], "general": data["general"]},
                    "train": {"samples": data["prompts"]},
                },
            }
        )
    if "icl" in evals:
        runs = [
            {"name": f"{Path(m).name}-{k}shot", "model": m, "method": {"shots": k}}
            for m in models
            for k in data["shots"]
        ]
        icl = {
            "limit": data["limit"],
            "calibrate": data["calibrate"],
            "calibration": data["calibration"],
            **({"draws": data["draws"]} if data["draws"] else {}),
            **{k: v for k, v in data["prompt"].items() if v is not None},
        }
        experiments.append(
            {
                "name": "prompting",
                "task": "icl",
                "runs": runs,
                "config": {
                    "data": {
                        "path": data["reviews"],
                        "val_path": data["reviews_test"],
                        "text_field": data["text_field"],
                    },
                    "classify": {"label_field": data["label_field"]},
                    "icl": icl,
                },
            }
        )
    if "instructions" in evals:
        experiments.append(
            {
                "name": "instructions",
                "task": "instructions",
                "models": models,
                "methods": {"greedy": {}},
                "config": {
                    "instructions": {
                        "data": data["instructions"],
                        "limit": data["limit"],
                        "max_new_tokens": data["max_new_tokens"],
                    }
                },
            }
        )
    return {"study": "compare", "seeds": [0], "experiments": experiments}


def print_paired(pairs: list[dict]) -> None:
    """Each model against the first, on the same prompts: the difference and its interval."""
    for p in pairs:
        print(f"instructions: {p['run']} vs {p['against']}")
        for m in ("prompt_strict", "instruction_strict", "prompt_loose", "instruction_loose"):
            d = p[m]
            lo, hi = d["interval"]
            print(
                f"  {m:<20}{d['a']:.3f} -> {d['b']:.3f}  difference {d['difference']:+.3f} "
                f"[{lo:+.3f}, {hi:+.3f}]"
            )


def cmd_compare(a) -> None:
    from tunelab.errors import ConfigError
    from tunelab.paths import check_folder_out
    from tunelab.study.study import Study

    check_folder_out(a.out, "the study")
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    evals = [e.strip() for e in a.eval.split(",")]
    for e in evals:
        if e not in ("perplexity", "icl", "instructions"):
            raise ConfigError(f"--eval {e!r}: expected perplexity, icl and/or instructions")
    if "instructions" in evals:
        if not a.instructions:
            raise ConfigError("--eval instructions needs --instructions FILE (IFEval-style JSONL)")
        from tunelab.instructions.score import read_prompts

        read_prompts(a.instructions, a.limit)  # a bad file stops here, before any model loads
    demo = "${demo}"
    data = {
        "domain": a.domain or f"{demo}/plots_test.txt",
        "general": a.general or f"{demo}/general.txt",
        "reviews": a.data or f"{demo}/reviews_train.jsonl",
        "reviews_test": a.test_data or a.data or f"{demo}/reviews_test.jsonl",
        "text_field": a.text_field,
        "label_field": a.label_field,
        "calibrate": a.calibrate,
        "calibration": a.calibration,
        "draws": a.draws,
        "prompt": {
            "format": a.format,
            "template": a.template,
            "instruction": a.instruction,
            "label_words": a.label_words,
            "layout": a.layout,
        },
        "shots": [int(k) for k in a.shots.split(",")],
        "limit": a.limit,
        "prompts": ["What is the capital of France?"],
        "instructions": a.instructions,
        "max_new_tokens": a.max_new_tokens,
    }
    if a.data is None:  # the demo reviews have their own fields
        data.update(text_field="review", label_field="sentiment")
    out = Path(a.out)
    results = Study(compare_recipe(models, evals, data), out).run()
    if "instructions" in evals:
        from tunelab.study.instructions import measured, paired

        results["paired"] = paired(measured(out, results["rows"]))
    _finish(a, out, results)
    if results.get("paired") and not a.json:
        print_paired(results["paired"])


def register(sub) -> None:
    """Add study, report and compare."""
    from tunelab.cli.common import prompt_args

    p = sub.add_parser("study", help="run a study recipe: a grid of runs, resumable")
    p.add_argument("recipe", help="study recipe YAML (see recipes/quickstart.yaml)")
    p.add_argument("--out", help="study directory [studies/<study name>]")
    p.add_argument(
        "--quick", action="store_true", help="the recipe's short version (quick: section)"
    )
    p.add_argument("--json", action="store_true", help="print results.json on stdout")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("report", help="render a study's report.html and report.md")
    p.add_argument("study", help="study directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="the same evaluations over several models, one report")
    p.add_argument("--models", required=True, help="comma-separated model names or directories")
    p.add_argument(
        "--eval",
        default="perplexity,icl",
        help="suite: perplexity, icl and/or instructions [perplexity,icl]",
    )
    p.add_argument("--instructions", help="IFEval-style prompts (JSONL) for --eval instructions")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=256,
        help="new tokens per response for --eval instructions [256]",
    )
    p.add_argument("--out", default="studies/compare", help="study directory [studies/compare]")
    p.add_argument("--domain", help="in-domain text for perplexity [demo plots]")
    p.add_argument("--general", help="general text for perplexity [demo general English]")
    p.add_argument("--data", help="labeled records for prompting [demo reviews]")
    p.add_argument("--test-data", help="records to score [--data, or demo test reviews]")
    p.add_argument("--text-field", default="text")
    p.add_argument("--label-field", default="label")
    p.add_argument(
        "--template",
        default=None,
        help="prompt modifiers around {text} [derived from the model and fields]",
    )
    p.add_argument("--shots", default="0,4", help="comma-separated shot counts [0,4]")
    p.add_argument(
        "--limit", type=int, default=60, help="score at most N records (prompts) per model"
    )
    p.add_argument("--json", action="store_true")
    prompt_args(p)
    p.set_defaults(func=cmd_compare)
