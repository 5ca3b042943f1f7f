"""The report's counting section: exact-count accuracy of every counting cell with its
interval, by expected number and by prompt variant, and the best cell's annotated grid."""

from __future__ import annotations

import json
from pathlib import Path


def _acc(g: dict) -> str:
    lo, hi = g.get("interval") or g.get("accuracy_interval")
    return f"{g['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"


def measured(study_dir: Path, rows: list[dict]) -> list[tuple[dict, dict, Path]]:
    out = []
    for r in rows:
        run_dir = Path(study_dir) / (r.get("dir") or f"runs/{r.get('run')}")
        if r.get("task") == "counting" and r.get("status") == "done":
            out.append((r, json.loads((run_dir / "summary.json").read_text()), run_dir))
    return out


def blocks(study_dir: Path, rows: list[dict]) -> list[tuple]:
    """The section's blocks, or none when no cell counted objects."""
    cells = measured(study_dir, rows)
    if not cells:
        return []
    counts = sorted({k for _, s, _ in cells for k in s["by_count"]}, key=int)
    variants = sorted({k for _, s, _ in cells for k in s["by_variant"]})
    table = []
    for r, s, _ in cells:
        table.append(
            [
                r["run"],
                str(s["images"]),
                _acc(s),
                *(_acc(s["by_count"][k]) if k in s["by_count"] else "–" for k in counts),
                *(_acc(s["by_variant"][k]) if k in s["by_variant"] else "–" for k in variants),
            ]
        )
    counter = cells[0][1]["counter"]
    out = [
        ("h2", "Counting"),
        (
            "p",
            f"Exact-count accuracy (an image passes when the {counter['name']} counter finds "
            "exactly the number asked for) with 95% bootstrap intervals over the images, "
            "overall, per expected number and per prompt variant.",
        ),
        ("table", ["Run", "Images", "accuracy", *(f"n={k}" for k in counts), *variants], table),
    ]
    r, _, run_dir = max(cells, key=lambda c: c[1]["accuracy"])  # the best cell's images
    if (run_dir / "grid.png").is_file():
        alt = (
            f"{r['run']} (the most accurate cell): generated images with the counter's "
            "boxes, counted/expected, pass or fail"
        )
        out.append(("img", "counting-grid", alt, (run_dir / "grid.png").read_bytes()))
    return out
