"""The results table of a study: one row per run from its summary.json, and mean ± std over seeds."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

from tunelab.files import atomic_file, atomic_write

COST_KEYS = ("trainable_params", "total_params", "wall_time_s", "tokens_per_s", "peak_memory_mb")
MAIN_METRIC = {
    "classify": "accuracy",
    "icl": "accuracy",
    "align": "preference_accuracy",
    "pretrain": "ppl_in_domain",
    "finetune": "final_val_loss",
    "perplexity": "ppl_in_domain",
    "instructions": "prompt_strict",
    "counting": "accuracy",
    "image": "final_loss",
}
INSTRUCTION_METRICS = ("prompt_strict", "instruction_strict", "prompt_loose", "instruction_loose")
# Lower is better for these; the report flips its "best" marks by this.
LOWER_IS_BETTER = ("ppl_in_domain", "ppl_general", "final_val_loss", "forgetting")


def _ba(summary: dict, key: str) -> tuple:
    value = summary.get(key)
    return (value.get("before"), value.get("after")) if isinstance(value, dict) else (None, value)


def metrics_of(task: str, summary: dict) -> dict:
    """The flat metric columns of one run's summary."""
    row = {k: summary.get(k) for k in COST_KEYS}
    row["final_val_loss"] = summary.get("final_val_loss")
    if "final_loss" in summary:  # image training: the last logged denoising loss
        row["final_loss"] = summary["final_loss"]
    for name, ppl in (summary.get("perplexity") or {}).items():
        row[f"ppl_{name}_before"], row[f"ppl_{name}_after"] = (
            (ppl.get("before"), ppl.get("after")) if isinstance(ppl, dict) else (None, ppl)
        )
    if row.get("ppl_general_before") and row.get("ppl_general_after"):
        row["forgetting"] = row["ppl_general_after"] / row["ppl_general_before"] - 1
    for key in ("accuracy", "macro_f1"):
        if key in summary:
            row[key] = summary[key]
    if isinstance(summary.get("accuracy_interval"), list):  # 95% bootstrap over the examples
        row["accuracy_low"], row["accuracy_high"] = summary["accuracy_interval"]
    if isinstance(summary.get("predicted"), dict) and summary.get("examples"):
        for name, count in summary["predicted"].items():  # how often each label was predicted
            row[f"share:{name}"] = count / summary["examples"]
    if task == "icl":
        prompt = summary.get("prompt") if isinstance(summary.get("prompt"), dict) else {}
        row.update(
            shots=summary.get("shots"),
            examples=summary.get("examples"),
            prompt=summary.get("prompt_name", "default"),
            prompt_format=prompt.get("format"),
            # how: "batch" or "content-free" (True in runs from before the choice existed)
            calibrated=(summary.get("calibration") or True)
            if summary.get("calibrated")
            else summary.get("calibrated"),
            draws=summary.get("draws"),
        )
        if isinstance(summary.get("draw_accuracy"), dict):  # each demonstration draw alone
            row["draw_low"] = summary["draw_accuracy"].get("min")
            row["draw_high"] = summary["draw_accuracy"].get("max")
        for key in ("with_calibration", "without_calibration"):
            if isinstance(summary.get(key), dict):
                row[f"accuracy_{key}"] = summary[key].get("accuracy")
    for key in ("preference_accuracy", "reward_margin"):
        if key in summary:
            row[f"{key}_before"], row[f"{key}_after"] = _ba(summary, key)
    for key in INSTRUCTION_METRICS:  # an evaluation cell's, or a training run's before/after
        if key in summary:
            row[key] = summary[key]
        elif isinstance(summary.get("instructions"), dict) and key in summary["instructions"]:
            row[f"{key}_before"], row[f"{key}_after"] = _ba(summary["instructions"], key)
    main = MAIN_METRIC[task]
    value = row.get(main, row.get(f"{main}_after"))
    return {**row, "metric": main, "value": value}


def _model_name(model: str | None) -> str:
    """'${run:domain/lora}' reads as 'domain/lora': the model that run produced."""
    return re.sub(r"\$\{run:([^}]+)\}", r"\1", model or "")


def short_model(model: str) -> str:
    """A model's name for tables: hub names and 'experiment/run' as they are, paths by their
    last part (a run's final/ by the run)."""
    p = Path(str(model))
    if p.name == "final":
        p = p.parent
    return str(p) if len(p.parts) <= 2 and not p.is_absolute() else p.name


def row_of(cell: dict, run_dir: Path) -> dict:
    row = {
        "experiment": cell["experiment"],
        "run": cell["run"],
        "dir": f"runs/{cell['run']}",
        "task": cell["task"],
        "model": _model_name(cell["model"]),
        "method": cell["method_label"],
        "data": cell.get("data", ""),
        "seed": cell["seed"],
        "status": "pending",
        "error": None,
    }
    if (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text())
        row.update(status="done", **metrics_of(cell["task"], summary))
        row["model"] = row["model"] or str(summary.get("model") or "")
    elif (run_dir / "error.json").exists():
        row.update(status="failed", error=json.loads((run_dir / "error.json").read_text())["error"])
    return row


def _mean_std(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return {"mean": mean, "std": math.sqrt(var)}


def group_rows(rows: list[dict]) -> list[dict]:
    """Rows of one experiment/model/method/data, averaged over their finished seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["experiment"], r["model"], r["method"], r["data"]), []).append(r)
    out = []
    for (experiment, model, method, data), members in groups.items():
        done = [r for r in members if r["status"] == "done"]
        g = {
            "experiment": experiment,
            "model": model,
            "method": method,
            "data": data,
            "task": members[0]["task"],
            "seeds": len(done),
            "failed": len(members) - len(done),
            "metric": members[0].get("metric") or MAIN_METRIC[members[0]["task"]],
        }
        numeric = {
            k
            for r in done
            for k, v in r.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "seed"
        }
        for key in sorted(numeric):
            values = [r[key] for r in done if isinstance(r.get(key), int | float)]
            if values:
                g[key] = _mean_std(values)
        if done and "value" in g:  # the spread over seeds, not only its std
            values = [r["value"] for r in done if isinstance(r.get("value"), int | float)]
            g["value"].update(min=min(values), max=max(values))
        for key in ("prompt", "prompt_format", "calibrated"):  # what every seed shared
            if done and len({str(r.get(key)) for r in done}) == 1 and done[0].get(key) is not None:
                g[key] = done[0][key]
        out.append(g)
    return out


def write_results(out: Path, results: dict) -> None:
    """results.json and results.csv (one line per run), each written atomically."""
    atomic_write(out / "results.json", json.dumps(results, indent=2))
    keys: list[str] = []
    for r in results["rows"]:
        keys += [k for k in r if k not in keys]
    with atomic_file(out / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(results["rows"])
