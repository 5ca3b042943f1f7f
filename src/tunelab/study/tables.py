"""A study report's tables: one entry per group of runs, cells as 'mean ± std', best marked."""

from __future__ import annotations

import math

from tunelab.study.results import LOWER_IS_BETTER, short_model

GROUP_KEYS = ("experiment", "model", "method", "data")
# One fixed phrase per known method, matched on the '-'-separated words of the method label.
USE_CASES = {
    "full": "most capacity; every weight is trained",
    "qlora": "adapting on little memory (4-bit base + LoRA)",
    "lora": "cheap adaptation; a small adapter to ship",
    "gradual": "small data; unfreezing top-down limits forgetting",
    "freeze": "small data; only the top blocks train",
    "dpo": "aligning to preference pairs",
    "0shot": "no training: zero-shot prompt",
    "prompt": "no training: few-shot prompt",
    "base": "baseline: the model as released",
}
BEFORE_AFTER = {
    "ppl_in_domain": "perplexity, in-domain",
    "ppl_general": "perplexity, general",
    "preference_accuracy": "preference agreement",
    "reward_margin": "reward margin",
    "prompt_strict": "instructions, prompt strict",
    "instruction_strict": "instructions, instruction strict",
    "prompt_loose": "instructions, prompt loose",
    "instruction_loose": "instructions, instruction loose",
}


class Best(str):
    """A table cell holding the best value of its column within an experiment."""


# -- numbers -----------------------------------------------------------------------------------
def is_num(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def stat(group: dict, key: str) -> tuple[float, float] | None:
    """(mean, std) of a group's key; a plain number counts as std 0."""
    v = group.get(key)
    if isinstance(v, dict) and is_num(v.get("mean")):
        return float(v["mean"]), float(v["std"]) if is_num(v.get("std")) else 0.0
    return (float(v), 0.0) if is_num(v) else None


def fmt(x: float, pct: bool = False, digits: int = 4) -> str:
    if pct:
        return f"{x * 100:+.1f}%"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}g}"


def cell(group: dict, key: str, pct: bool = False) -> str:
    """'mean ± std' when the group has several seeds, 'mean' with one, '–' when not measured."""
    s = stat(group, key)
    if s is None:
        return "–"
    seeds = group.get("seeds") if is_num(group.get("seeds")) else 1
    std = f"{s[1] * 100:.1f}%" if pct else fmt(s[1], digits=2)  # two digits of spread are plenty
    return f"{fmt(s[0], pct)} ± {std}" if seeds > 1 else fmt(s[0], pct)


def interval(group: dict) -> str:
    """'[low, high]': the 95% bootstrap interval of accuracy over the scored examples (its
    bounds averaged over seeds), so a score on 20 examples reads as what it is."""
    low, high = stat(group, "accuracy_low"), stat(group, "accuracy_high")
    return f"[{low[0]:.3g}, {high[0]:.3g}]" if low and high else "–"


def seed_range(group: dict) -> str:
    """'min–max' of the main metric over seeds; '–' with one seed."""
    v = group.get("value")
    if not isinstance(v, dict) or (group.get("seeds") or 1) < 2 or not is_num(v.get("min")):
        return "–"
    return f"{fmt(v['min'])}–{fmt(v['max'])}"


def draw_range(group: dict) -> str:
    """'min–max' of accuracy over one seed's demonstration draws, each scored alone (bounds
    averaged over seeds); '–' for one draw."""
    low, high, draws = stat(group, "draw_low"), stat(group, "draw_high"), stat(group, "draws")
    if not (low and high and draws) or draws[0] < 2:
        return "–"
    return f"{fmt(low[0])}–{fmt(high[0])}"


def shares(group: dict) -> str:
    """How often each label was predicted, e.g. 'negative 48% · positive 52%'."""
    parts = [(k[6:], stat(group, k)) for k in group if str(k).startswith("share:")]
    return " · ".join(f"{name} {s[0]:.0%}" for name, s in parts if s) or "–"


def trainable(group: dict) -> str:
    t, n = stat(group, "trainable_params"), stat(group, "total_params")
    if t is None:
        return "–"
    return f"{t[0] / n[0]:.2%} of {fmt(n[0])}" if n and n[0] else fmt(t[0])


# -- tables ------------------------------------------------------------------------------------
def entries(results: dict) -> list[dict]:
    """One entry per group, in the order of the rows, with its runs; all-failed groups included."""
    stats = {tuple(g.get(k, "") for k in GROUP_KEYS): g for g in results["groups"]}
    out: dict[tuple, dict] = {}
    for r in results["rows"]:
        key = tuple(r[k] for k in GROUP_KEYS)
        e = out.setdefault(key, {**dict(zip(GROUP_KEYS, key)), "stats": stats.get(key, {})})
        e.setdefault("runs", []).append(r)
    for e in out.values():
        done = [r for r in e["runs"] if r["status"] == "done"]
        metrics = [r["metric"] for r in e["runs"] if r.get("metric")]
        e["metric"] = metrics[0] if metrics else e["stats"].get("metric", "")
        e["failed"] = [r for r in e["runs"] if r["status"] == "failed"]
        e["stats"] = {"seeds": len(done), **e["stats"]}
    return list(out.values())


def label(e: dict, many_models: bool) -> str:
    model = short_model(e["model"]) if e["model"] else ""
    return f"{e['method']} · {model}" if many_models and model else str(e["method"])


def results_table(ents: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The main table: one row per group, best value of each experiment's metric marked."""
    headers = [
        "Experiment",
        "Model",
        "Method",
        "Data",
        "Seeds",
        "Metric",
        "Value",
        "95% CI",
        "Macro-F1",
        "Predicted",
        "Val loss",
        "Trainable",
        "Wall time (s)",
        "Tokens/s",
        "Peak memory (MB)",
        "Forgetting",
    ]
    panels, rows = by_metric(ents), []
    for e in ents:
        g, n_failed = e["stats"], len(e["failed"])
        seeds = f"{g['seeds']}" + (f" ({n_failed} failed)" if n_failed else "")
        value, peers = cell(g, "value"), panels.get((e["experiment"], e["metric"]), [])
        if len(peers) > 1 and e is best(peers):
            value = Best(value)
        elif not stat(g, "value") and (n_failed or not g["seeds"]):
            value = "failed" if n_failed else "not run"
        rows.append(
            [
                e["experiment"],
                str(e["model"]),
                e["method"],
                str(e["data"]),
                seeds,
                e["metric"],
                value,
                interval(g),
                cell(g, "macro_f1"),
                shares(g),
                cell(g, "final_val_loss"),
                trainable(g),
                cell(g, "wall_time_s"),
                cell(g, "tokens_per_s"),
                cell(g, "peak_memory_mb"),
                cell(g, "forgetting", pct=True),
            ]
        )
    return _drop_empty(headers, rows)


def prompt_table(ents: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Prompting groups: accuracy per prompt and shot count, its interval over the examples,
    its spread over demonstration seeds and over the draws averaged within a seed, and what
    the model predicted."""
    headers = [
        "Experiment",
        "Model",
        "Prompt",
        "Format",
        "Shots",
        "Seeds",
        "Accuracy",
        "95% CI (examples)",
        "Seed range",
        "Draws",
        "Draw range",
        "Macro-F1",
        "Predicted",
        "Calibrated",
        "Uncalibrated accuracy",
        "Examples",
    ]
    rows = []
    for e in ents:
        g = e["stats"]
        if e["runs"][0].get("task") != "icl" or not stat(g, "value"):
            continue
        shots = stat(g, "shots")
        rows.append(
            [
                e["experiment"],
                short_model(str(e["model"])),
                str(g.get("prompt", e["method"])),
                str(g.get("prompt_format") or "–"),
                fmt(shots[0]) if shots else "–",
                str(g["seeds"]),
                cell(g, "value"),
                interval(g),
                seed_range(g),
                fmt(stat(g, "draws")[0]) if stat(g, "draws") else "–",
                draw_range(g),
                cell(g, "macro_f1"),
                shares(g),
                {True: "yes", False: "no", None: "–"}.get(g.get("calibrated"), g.get("calibrated")),
                cell(g, "accuracy_without_calibration"),
                cell(g, "examples"),
            ]
        )
    return headers, rows


def before_after_table(ents: list[dict]) -> tuple[list[str], list[list[str]]]:
    headers = ["Experiment", "Model", "Method", "Measure", "Before", "After", "Change"]
    rows = []
    for e in ents:
        for key, name in BEFORE_AFTER.items():
            b, a = stat(e["stats"], f"{key}_before"), stat(e["stats"], f"{key}_after")
            if b or a:
                change = f"{a[0] - b[0]:+.4g}" if a and b else "–"
                cells = [cell(e["stats"], f"{key}_{w}") for w in ("before", "after")]
                rows.append([e["experiment"], str(e["model"]), e["method"], name, *cells, change])
    return headers, rows


def technique_table(ents: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Technique, use case, compute cost and generalization, every figure measured."""
    headers = ["Experiment", "Technique", "Model", "Use case", "Compute cost", "Generalization"]
    rows = []
    for e in ents:
        g = e["stats"]
        cost = [
            f"{name} {cell(g, key)}"
            for key, name in (("wall_time_s", "wall s"), ("peak_memory_mb", "peak MB"))
            if stat(g, key)
        ]
        cost += [f"trainable {trainable(g)}"] if stat(g, "trainable_params") else []
        gen = [f"forgetting {cell(g, 'forgetting', pct=True)}"] if stat(g, "forgetting") else []
        gen += [f"val loss {cell(g, 'final_val_loss')}"] if stat(g, "final_val_loss") else []
        if stat(g, "value") and e["metric"] != "final_val_loss":
            gen.append(f"{e['metric']} {cell(g, 'value')}")
        words = str(e["method"]).lower().split("-")
        use = next((phrase for key, phrase in USE_CASES.items() if key in words), None)
        shot = next((w for w in words if w.endswith("shot") and w[:-4].isdigit()), None)
        use = use or (f"no training: {shot[:-4]}-shot prompt" if shot else "–")
        none = "run failed" if e["failed"] and not g["seeds"] else "not measured"
        rows.append(
            [
                e["experiment"],
                e["method"],
                str(e["model"]),
                use,
                "; ".join(cost) or none,
                "; ".join(gen) or none,
            ]
        )
    return headers, rows


def _drop_empty(headers: list[str], rows: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """Leave out columns nobody measured, so the table stays readable."""
    keep = [i for i in range(len(headers)) if any(r[i] not in ("–", "") for r in rows)]
    return [headers[i] for i in keep], [[r[i] for i in keep] for r in rows]


def by_metric(ents: list[dict]) -> dict[tuple, list[dict]]:
    """Groups with a main metric, by (experiment, metric): what one chart panel compares."""
    out: dict[tuple, list[dict]] = {}
    for e in ents:
        if stat(e["stats"], "value"):
            out.setdefault((e["experiment"], e["metric"]), []).append(e)
    return out


def best(peers: list[dict]) -> dict:
    sign = -1 if peers[0]["metric"] in LOWER_IS_BETTER else 1
    return max(peers, key=lambda e: sign * stat(e["stats"], "value")[0])
