"""The report's instruction-following section: accuracies with intervals, the paired
differences (a training run after against before; an evaluation cell against the experiment's
first), and accuracy per instruction type as bars."""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.instructions.score import METRICS, paired_difference

SHORT = {
    "prompt_strict": "prompt strict",
    "instruction_strict": "instruction strict",
    "prompt_loose": "prompt loose",
    "instruction_loose": "instruction loose",
}


def measured(study_dir: Path, rows: list[dict]) -> list[dict]:
    """[{run, experiment, seed, kind: 'eval' | 'train', side(s)}] for every finished run that
    measured instruction following; a side holds the accuracies, intervals, per-type and
    per-prompt results."""
    out = []
    for r in rows:
        path = Path(study_dir) / (r.get("dir") or f"runs/{r.get('run')}") / "summary.json"
        if r.get("status") != "done" or not path.is_file():
            continue
        summary = json.loads(path.read_text())
        base = {"run": r.get("run", ""), "experiment": r["experiment"], "seed": r.get("seed")}
        if "per_prompt" in summary and "prompt_strict" in summary:
            out.append({**base, "kind": "eval", "after": summary})
        elif isinstance(summary.get("instructions"), dict):
            ins = summary["instructions"]
            sides = {
                w: {k: v[w] for k, v in ins.items() if isinstance(v, dict) and w in v}
                for w in ("before", "after")
            }
            out.append({**base, "kind": "train", **sides})
    return out


def paired(entries: list[dict]) -> list[dict]:
    """Paired differences: a training run's after minus before; an evaluation cell minus the
    first evaluation cell of its experiment and seed, when both answered the same prompts."""
    out = []
    first: dict[tuple, dict] = {}
    for e in entries:
        if e["kind"] == "train":
            a, b, against = e["before"], e["after"], "before training"
        else:
            ref = first.setdefault((e["experiment"], e["seed"]), e)
            if ref is e or len(ref["after"]["per_prompt"]) != len(e["after"]["per_prompt"]):
                continue
            a, b, against = ref["after"], e["after"], ref["run"]
        try:
            diff = paired_difference(a["per_prompt"], b["per_prompt"])
        except Exception:  # noqa: BLE001 - different prompts: no pairing, no row
            continue
        out.append({"run": e["run"], "against": against, **diff})
    return out


def _acc(side: dict, m: str) -> str:
    lo, hi = side["intervals"][m]
    return f"{side[m]:.3f} [{lo:.3f}, {hi:.3f}]"


def blocks(study_dir: Path, rows: list[dict], plots: bool) -> list[tuple]:
    """The section's blocks, or none when no run measured instruction following."""
    entries = measured(study_dir, rows)
    if not entries:
        return []
    acc_rows = []
    for e in entries:
        for side in ("before", "after") if e["kind"] == "train" else ("after",):
            s = e[side]
            name = e["run"] + (f" ({side})" if e["kind"] == "train" else "")
            acc_rows.append([name, str(s["n"]), *(_acc(s, m) for m in METRICS)])
    out = [
        ("h2", "Instruction following"),
        (
            "p",
            "IFEval-style verifiable instructions: share of prompts whose every instruction "
            "was followed, and of instructions followed, strict and loose, with 95% bootstrap "
            "intervals over prompts.",
        ),
        ("table", ["Run", "Prompts", *(SHORT[m] for m in METRICS)], acc_rows),
    ]
    pairs = paired(entries)
    if pairs:
        head = ["Run", "Against", *(f"Δ {SHORT[m]}" for m in METRICS)]
        body = [
            [
                p["run"],
                p["against"],
                *(
                    f"{p[m]['difference']:+.3f} [{p[m]['interval'][0]:+.3f}, {p[m]['interval'][1]:+.3f}]"
                    for m in METRICS
                ),
            ]
            for p in pairs
        ]
        out += [
            (
                "p",
                "Paired differences on the same prompts: an interval that holds 0 says the "
                "change may be noise.",
            ),
            ("table", head, body),
        ]
    if plots:
        png = type_figure(entries)
        alt = "Strict accuracy per instruction type, one bar per run (before and after training)"
        out.append(("img", "instruction-types", alt, png))
    return out


def type_figure(entries: list[dict]) -> bytes:
    """Horizontal bars: strict accuracy per instruction id, one colour per run (and side)."""
    from tunelab.study.report import _grid, _png

    series = []
    for e in entries:
        for side in ("before", "after") if e["kind"] == "train" else ("after",):
            name = e["run"] + (f" ({side})" if e["kind"] == "train" else "")
            series.append((name, e[side]["by_instruction"]))
    series = series[:8]
    ids = sorted({i for _, by in series for i in by})
    fig, (ax,) = _grid(1, 1, (8, 0.28 * len(ids) * max(1, len(series)) ** 0.5 + 1.5))
    height = 0.8 / len(series)
    for k, (name, by) in enumerate(series):
        ys = [i + k * height for i in range(len(ids))]
        ax.barh(
            ys,
            [by.get(i, {}).get("strict", 0) for i in ids],
            height=height,
            color=f"C{k % 10}",
            label=name,
        )
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(ids))], ids, fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="strict accuracy", xlim=(0, 1))
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)
