"""bench/scale.py's two tables, loading and training, from its measurements: medians with the
range where a side ran more than once, and a side's failure or skip reason in its row."""

from __future__ import annotations

import statistics

from common import spread  # bench/ is on sys.path: scale.py runs from there


def _gib(mb_values) -> list[float]:
    return [v / 1024 for v in mb_values]


def _side_rows(row: dict):
    """(row head, successful runs) per side; a side with none gets its reason in the row."""
    for side, runs in row["sides"].items():
        ok = [r for r in runs if "failed" not in r]
        how = next((r["how"] for r in ok if r.get("how")), None)
        method = f"{row['method']} ({how})" if how else row["method"]
        reason = (runs[0]["failed"] if runs else row.get("skipped", "not run")) if not ok else ""
        yield f"| {row['shape']} | {method} | {side} ", ok, reason


def load_table(rows: list[dict]) -> str:
    lines = [
        "| shape | load | side | storage | seconds | RSS before (GiB) | peak while loading "
        "(GiB) | RSS after (GiB) | peak − before (GiB) | weights (GiB) | target (GiB) |",
        "|:---|:---|:---|:---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        for head, ok, reason in _side_rows(row):
            if not ok:
                lines.append(head + f"| {reason} | | | | | | | |")
                continue
            grow = [r["peak_mb"] - r["rss_before_mb"] for r in ok]
            target = (
                f"{1.15 * row['weights_gib'] + 0.5e9 / 2**30:.2f}"
                if row["method"] == "load"
                else "–"
            )
            lines.append(
                head + f"| {ok[0]['storage']} | {spread([r['seconds'] for r in ok], '{:.1f}')} "
                f"| {spread(_gib(r['rss_before_mb'] for r in ok), '{:.2f}')} "
                f"| {spread(_gib(r['peak_mb'] for r in ok), '{:.2f}')} "
                f"| {spread(_gib(r['rss_after_mb'] for r in ok), '{:.2f}')} "
                f"| {spread(_gib(grow), '{:.2f}')} | {row['weights_gib']:.3g} | {target} |"
            )
    return "\n".join(lines)


def train_table(rows: list[dict], warmup: int) -> str:
    lines = [
        "| shape | method | side | frozen / trainable | trainable | ready (s) | load-phase "
        "peak (GiB) | training peak (GiB) | command peak (GiB) | s/step | real tok/s | "
        "loss first → last |",
        "|:---|:---|:---|:---|---:|---:|---:|---:|---:|---:|---:|:---|",
    ]
    for row in rows:
        for head, ok, reason in _side_rows(row):
            if not ok:
                lines.append(head + f"| {reason} | | | | | | | | |")
                continue
            step = [statistics.median(r["step_s"][warmup:]) for r in ok]
            tps = [sum(r["tokens"][warmup:]) / sum(r["step_s"][warmup:]) for r in ok]
            n = ok[0]["trainable"]
            cmd_peak = spread(_gib(r["process_peak_mb"] for r in ok), "{:.2f}")
            cmd_peak += "".join(f" ({r['after']})" for r in ok[:1] if r.get("after"))
            lines.append(
                head + f"| {ok[0]['storage']} | {f'{n / 1e6:.2f}M' if isinstance(n, int) else n} "
                f"| {spread([r['ready_s'] for r in ok], '{:.1f}')} "
                f"| {spread(_gib(r['load_peak_mb'] for r in ok), '{:.2f}')} "
                f"| {spread(_gib(r['train_peak_mb'] for r in ok), '{:.2f}')} "
                f"| {cmd_peak} | {spread(step, '{:.2f}')} | {spread(tps, '{:.1f}')} "
                f"| {ok[0]['losses'][0]:.3f} → {ok[0]['losses'][-1]:.3f} |"
            )
    return "\n".join(lines)
