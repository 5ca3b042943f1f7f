"""A study's report: results and technique tables plus plots, as self-contained HTML and Markdown.

Read from the study directory (results.json, each run's metrics.jsonl): measured numbers only."""

from __future__ import annotations

import base64
import html
import importlib.util
import io
import json
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.paths import slug
from tunelab.study.counting import blocks as counting_blocks
from tunelab.study.instructions import blocks as instruction_blocks
from tunelab.study.results import LOWER_IS_BETTER, group_rows
from tunelab.study.tables import (
    GROUP_KEYS,
    Best,
    before_after_table,
    by_metric,
    entries,
    is_num,
    label,
    prompt_table,
    results_table,
    stat,
    technique_table,
)

COST_AXES = (("wall_time_s", "wall time (s)"), ("peak_memory_mb", "peak memory (MB)"))
CSS = """body{font:14px/1.45 system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2}img{max-width:100%;height:auto}figure{margin:1em 0}
figcaption,.note{color:#666;font-style:italic}"""


def write_report(study_dir: str | Path) -> tuple[Path, Path]:
    """Write report.html (plots embedded) and report.md (plots in report_files/) in the study."""
    study_dir = Path(study_dir)
    results = load_results(study_dir)
    title = f"Study: {results.get('study') or study_dir.name}"
    blocks = build_blocks(study_dir, results)
    files = study_dir / "report_files"
    files.mkdir(exist_ok=True)
    for old in files.glob("*.png"):  # a re-render must not leave plots that no longer exist
        old.unlink()
    for _, name, _, png in (b for b in blocks if b[0] == "img"):
        (files / f"{name}.png").write_bytes(png)
    html_path, md_path = study_dir / "report.html", study_dir / "report.md"
    html_path.write_text(render_html(title, blocks))
    md_path.write_text(render_markdown(title, blocks, files.name))
    return html_path, md_path


def load_results(study_dir: Path) -> dict:
    """results.json with its rows and groups; groups are recomputed when the file lacks them."""
    path = study_dir / "results.json"
    if not path.exists():
        raise TunelabError(f"{path}: not found; run `tunelab study RECIPE --out {study_dir}` first")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TunelabError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
    rows = [r for r in results.get("rows") or [] if isinstance(r, dict)]
    for r in rows:
        r.update({k: r.get(k) or "" for k in GROUP_KEYS}, status=r.get("status") or "pending")
    groups = results.get("groups")
    if groups is None:
        groups = group_rows([{**r, "task": r.get("task", "finetune")} for r in rows])
    return {**results, "rows": rows, "groups": groups}


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """A run's training and validation records, one per step, sorted; none without the file."""
    train, val = {}, {}
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a run killed mid-write leaves a torn last line
            continue
        if isinstance(rec, dict) and is_num(rec.get("step")):
            # A resumed run logs the steps after its checkpoint again: the later record wins.
            (val if rec.get("split") == "val" else train)[rec["step"]] = rec
    return [train[s] for s in sorted(train)], [val[s] for s in sorted(val)]


# -- plots -------------------------------------------------------------------------------------
def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def _grid(n: int, cols: int, size: tuple[float, float]):
    # Figure() without pyplot renders with Agg and touches no global backend state.
    from matplotlib.figure import Figure

    cols = min(n, cols)
    rows = -(-n // cols)
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes


def loss_figure(runs: list[tuple[str, list[dict], list[dict]]]) -> bytes | None:
    """Train loss against step per run, validation loss dashed in the same colour."""
    fig, (ax,) = _grid(1, 1, (8, 3.8))
    drawn = False
    for i, (name, train, val) in enumerate(runs):
        tr = [(r["step"], r["loss"]) for r in train if is_num(r.get("loss"))]
        va = [(r["step"], r["val_loss"]) for r in val if is_num(r.get("val_loss"))]
        if tr:
            ax.plot(*zip(*tr), color=f"C{i % 10}", label=name)
        if va:
            ax.plot(*zip(*va), "--o", color=f"C{i % 10}", ms=3, label=f"{name} (val)")
        drawn = drawn or bool(tr or va)
    if not drawn:
        return None
    ax.set(xlabel="step", ylabel="loss")
    ax.legend(fontsize=7, loc="upper right")
    return _png(fig)


def bar_figure(panels: dict[tuple, list[dict]]) -> bytes:
    """The main metric per method/model, one panel per experiment, std over seeds as error bars."""
    fig, axes = _grid(len(panels), 3, (4.6, 3.6))
    for ax, ((exp, metric), ents) in zip(axes, panels.items()):
        many = len({e["model"] for e in ents}) > 1
        means, stds = zip(*(stat(e["stats"], "value") for e in ents))
        bars = ax.bar(
            range(len(ents)),
            means,
            yerr=stds if any(stds) else None,
            capsize=3,
            color=[f"C{i % 10}" for i in range(len(ents))],
        )
        ax.bar_label(bars, fmt="%.4g", fontsize=7)
        ax.set_xticks(range(len(ents)), [label(e, many) for e in ents], rotation=30, ha="right")
        ax.set_title(exp)
        ax.set_ylabel(metric + (" (lower is better)" if metric in LOWER_IS_BETTER else ""))
    return _png(fig)


def scatter_figure(panels: dict[tuple, list[dict]]) -> bytes | None:
    """Cost (wall time, peak memory) against the main metric, one labelled point per group."""
    costs = [c for c, _ in COST_AXES]
    panels = {k: v for k, v in panels.items() if any(stat(e["stats"], c) for e in v for c in costs)}
    if not panels:
        return None
    fig, axes = _grid(2 * len(panels), 2, (4.8, 3.4))
    for i, ((exp, metric), ents) in enumerate(panels.items()):
        many = len({e["model"] for e in ents}) > 1
        for ax, (key, xlabel) in zip(axes[2 * i : 2 * i + 2], COST_AXES):
            ax.set(xlabel=xlabel, ylabel=metric, title=exp)
            ax.margins(0.25)  # room for the point labels
            points = [(stat(e["stats"], key), stat(e["stats"], "value"), e) for e in ents]
            points = [(x[0], y[0], e) for x, y, e in points if x]
            if not points:
                ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
            for j, (x, y, e) in enumerate(points):
                ax.scatter([x], [y], color=f"C{j % 10}")
                ax.annotate(
                    label(e, many), (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points"
                )
    return _png(fig)


def preference_figure(runs: list[tuple[str, list[dict]]]) -> bytes:
    """Validation preference agreement (val_reward_accuracy) against step, one line per run."""
    fig, (ax,) = _grid(1, 1, (7, 3.4))
    for i, (name, val) in enumerate(runs):
        points = [(r["step"], r["val_reward_accuracy"]) for r in val]
        ax.plot(*zip(*points), "-o", color=f"C{i % 10}", ms=3, label=name)
    ax.set(xlabel="step", ylabel="preference agreement (val)", ylim=(-0.02, 1.02))
    ax.legend(fontsize=7)
    return _png(fig)


# -- the document ------------------------------------------------------------------------------
def build_blocks(study_dir: Path, results: dict) -> list[tuple]:
    """The report as a list of blocks (heading, paragraph, note, table, image), rendered twice."""
    rows, ents = results["rows"], entries(results)
    done = sum(r["status"] == "done" for r in rows)
    failed = [r for r in rows if r["status"] == "failed"]
    blocks: list[tuple] = [
        (
            "p",
            f"{len(rows)} runs: {done} finished, {len(failed)} failed, "
            f"{len(rows) - done - len(failed)} not run. Values are mean ± std over seeds; "
            "– means not measured; the best value of each experiment is in bold.",
        ),
        ("h2", "Results"),
        ("table", *results_table(ents)),
    ]
    if failed:
        blocks += [
            ("h2", "Failed runs"),
            (
                "table",
                ["Run", "Model", "Method", "Seed", "Error"],
                [
                    [
                        r.get("run", ""),
                        str(r["model"]),
                        r["method"],
                        str(r.get("seed", "")),
                        str(r.get("error") or "unknown error"),
                    ]
                    for r in failed
                ],
            ),
        ]
    headers, prompts = prompt_table(ents)
    if prompts:
        blocks += [
            ("h2", "Prompts"),
            (
                "p",
                "Accuracy per prompt and shot count: mean ± std over the demonstration "
                "seeds, the 95% bootstrap interval over the scored examples, the range "
                "over seeds, the range over the demonstration draws a k-shot score "
                "averages (each draw scored alone), and how often each label was "
                "predicted (a one-label collapse shows there).",
            ),
            ("table", headers, prompts),
        ]
    headers, ba = before_after_table(ents)
    if ba:
        blocks += [("h2", "Before and after"), ("table", headers, ba)]
    blocks += [("h2", "Techniques: what each cost and gained"), ("table", *technique_table(ents))]
    plots = importlib.util.find_spec("matplotlib") is not None
    blocks += instruction_blocks(study_dir, rows, plots)
    blocks += counting_blocks(study_dir, rows)
    if not plots:  # plots are an optional extra
        return blocks + [("note", "No plots: matplotlib is missing (pip install 'tunelab[plots]')")]
    return blocks + plot_blocks(study_dir, rows, ents)


def _figure(name: str, alt: str, png: bytes | None, note: str) -> tuple:
    return ("img", name, alt, png) if png else ("note", note)


def plot_blocks(study_dir: Path, rows: list[dict], ents: list[dict]) -> list[tuple]:
    """Every plot, or a note saying why it is missing."""
    logs = {}  # run -> (row, train records, validation records)
    for r in rows:
        if r["status"] == "done":
            run_dir = study_dir / (r.get("dir") or f"runs/{r.get('run')}")
            logs[r.get("run", "")] = (r, *read_metrics(run_dir))
    blocks: list[tuple] = [("h2", "Loss curves")]
    for exp in dict.fromkeys(r["experiment"] for r in rows):
        runs = [
            (run.split("/")[-1], tr, va)
            for run, (r, tr, va) in logs.items()
            if r["experiment"] == exp
        ]
        alt = f"Loss curves of experiment {exp}: train loss against step, validation loss dashed"
        note = f"{exp}: no loss curves (no run logged metrics.jsonl)."
        blocks.append(_figure(f"loss-{slug(exp)}", alt, loss_figure(runs), note))
    panels = by_metric(ents)
    alt = "Bar chart of the main metric per method and model, one panel per experiment"
    bars = bar_figure(panels) if panels else None
    blocks += [
        ("h2", "Main metric per method"),
        _figure("metric-bars", alt, bars, "No main metric was measured."),
    ]
    alt = "Wall time and peak memory against the main metric, one labelled point per group"
    note = "No group has both a cost and a main metric."
    blocks += [
        ("h2", "Cost against quality"),
        _figure("cost-quality", alt, scatter_figure(panels), note),
    ]
    pref = [
        (run, [v for v in va if is_num(v.get("val_reward_accuracy"))])
        for run, (_, _, va) in logs.items()
    ]
    pref = [p for p in pref if p[1]]
    alt = "Validation preference agreement against step for each alignment run"
    note = "No alignment run logged val_reward_accuracy."
    png = preference_figure(pref) if pref else None
    blocks += [("h2", "Preference agreement over steps"), _figure("preference", alt, png, note)]
    return blocks


def render_html(title: str, blocks: list[tuple]) -> str:
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    for kind, *rest in blocks:
        if kind == "h2":
            out.append(f"<h2>{esc(rest[0])}</h2>")
        elif kind in ("p", "note"):
            out.append(f"<p class='{kind}'>{esc(rest[0])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{esc(h)}</th>" for h in rest[0])
            body = "".join(f"<tr>{''.join(_html_cell(c) for c in r)}</tr>" for r in rest[1])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            _, alt, png = rest
            data = base64.b64encode(png).decode()
            out.append(
                f"<figure><img src='data:image/png;base64,{data}' alt='{esc(alt)}'>"
                f"<figcaption>{esc(alt)}</figcaption></figure>"
            )
    return "\n".join(out + ["</body></html>\n"])


def _html_cell(c: str) -> str:
    text = html.escape(c)
    return f"<td><b>{text}</b></td>" if isinstance(c, Best) else f"<td>{text}</td>"


def render_markdown(title: str, blocks: list[tuple], files: str) -> str:
    def md_cell(c: str) -> str:
        text = str(c).replace("|", "\\|").replace("\n", " ")
        return f"**{text}**" if isinstance(c, Best) else text

    out = [f"# {title}", ""]
    for kind, *rest in blocks:
        if kind == "h2":
            out += [f"## {rest[0]}", ""]
        elif kind in ("p", "note"):
            out += [f"*{rest[0]}*" if kind == "note" else rest[0], ""]
        elif kind == "table":
            out.append("| " + " | ".join(rest[0]) + " |")
            out.append("|" + "---|" * len(rest[0]))
            for r in rest[1]:
                out.append("| " + " | ".join(md_cell(c) for c in r) + " |")
            out.append("")
        elif kind == "img":
            out += [f"![{rest[1]}]({files}/{rest[0]}.png)", ""]
    return "\n".join(out)
