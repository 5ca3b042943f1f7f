"""Counting, GenEval's way: generate several images per prompt, count the target objects with a
separate counter, and report exact-count accuracy overall, per expected number, per class and
per prompt variant, each with a 95% bootstrap interval over the images.

An evaluation folder holds images/ with manifest.jsonl (`{"image", "object", "expected", ...}`
per line, the same format `--images DIR` reads), scores.jsonl (one verdict per image),
summary.json, grid.png (boxes, counts, pass/fail) and report.md."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tunelab.errors import DataError
from tunelab.evaluate.classification import bootstrap_interval
from tunelab.image.counters import count, exact


def generate_set(
    pipeline, prompts, n: int, out: Path, seed: int = 0, steps=None, guidance=None, progress=None
) -> list[dict]:
    """n images per prompt into out/images with manifest.jsonl; prompt k's image i has seed
    seed + 1000 k + i, so a sweep over settings sees the same noise for the same prompt."""
    from tunelab.image.pipeline import Settings, generate

    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(folder / "manifest.jsonl", "w") as manifest:
        for k, p in enumerate(prompts):
            s = Settings(p.text, n, steps, None, guidance, seed + 1000 * k)
            images, used = generate(pipeline, s, on_image=progress)
            for i, image in enumerate(images):
                name = f"{k:04d}-{i:02d}.png"
                image.save(folder / name)
                row = {
                    "image": name,
                    "object": p.object,
                    "expected": p.expected,
                    "prompt": p.text,
                    "variant": p.variant,
                    "seed": used.seed + i,
                    "steps": used.steps,
                    "guidance": used.guidance,
                }
                manifest.write(json.dumps(row) + "\n")
                rows.append(row)
    return rows


def read_manifest(folder: Path) -> list[dict]:
    """The manifest.jsonl of a folder of images made elsewhere, checked line by line."""
    path = Path(folder) / "manifest.jsonl"
    if not path.exists():
        raise DataError(
            f"--images {folder}: no manifest.jsonl (one JSON line per image: "
            f'{{"image": "file.png", "object": "cat", "expected": 3}})'
        )
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{line_no}: not JSON") from None
        missing = [k for k in ("image", "object", "expected") if k not in row]
        if missing:
            raise DataError(f"{path}:{line_no}: missing {', '.join(missing)}")
        if not isinstance(row["expected"], int) or row["expected"] < 0:
            raise DataError(f"{path}:{line_no}: expected {row['expected']!r} is not a count")
        if not (Path(folder) / row["image"]).exists():
            raise DataError(f"{path}:{line_no}: image {row['image']} not found in {folder}")
        rows.append({"variant": "-", **row})
    if not rows:
        raise DataError(f"{path}: no images listed")
    return rows


def score(rows: list[dict], folder: Path, counter, progress=None) -> list[dict]:
    """Each row with its detections of the target class, the count and the verdict."""
    scored = []
    for row in rows:
        found = [d for d in counter.detect(Path(folder) / row["image"]) if d.label == row["object"]]
        counted = count(found, row["object"])
        boxes = [[*d.box, round(d.score, 4)] for d in found]
        scored.append(
            {**row, "counted": counted, "correct": exact(counted, row["expected"]), "boxes": boxes}
        )
        if progress:
            progress(len(scored))
    return scored


def group(scored: list[dict], key: str) -> dict:
    out = {}
    for value in sorted({r[key] for r in scored}, key=str):
        hits = [int(r["correct"]) for r in scored if r[key] == value]
        out[str(value)] = {
            "accuracy": round(sum(hits) / len(hits), 4),
            "interval": bootstrap_interval(hits),
            "images": len(hits),
        }
    return out


def summarize(scored: list[dict], counter) -> dict:
    hits = [int(r["correct"]) for r in scored]
    counted = {}
    for r in scored:  # what was counted for each expected number: where the misses go
        row = counted.setdefault(str(r["expected"]), {})
        row[str(r["counted"])] = row.get(str(r["counted"]), 0) + 1
    return {
        "accuracy": round(sum(hits) / len(hits), 4),
        "accuracy_interval": bootstrap_interval(hits),
        "images": len(hits),
        "prompts": len({(r.get("prompt"), r["object"], r["expected"]) for r in scored}),
        "by_count": group(scored, "expected"),
        "by_class": group(scored, "object"),
        "by_variant": group(scored, "variant"),
        "counted": counted,
        "counter": counter.record(),
        "rule": "exact count: an image passes when the counter finds exactly the number asked for",
    }


def evaluate(
    folder: Path, rows: list[dict], counter, out: Path, extra: dict | None = None, progress=None
) -> dict:
    """Score the images, write scores.jsonl, summary.json, grid.png and report.md to out."""
    t0 = time.perf_counter()
    scored = score(rows, folder, counter, progress)
    summary = {**(extra or {}), **summarize(scored, counter)}
    summary["count_time_s"] = round(time.perf_counter() - t0, 3)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "scores.jsonl", "w") as f:
        for r in scored:
            f.write(json.dumps(r) + "\n")
    from tunelab.image.grid import annotated_grid, report_markdown

    annotated_grid(scored, folder).save(out / "grid.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(summary, "grid.png"))
    return summary


def summary_text(s: dict) -> str:
    lo, hi = s["accuracy_interval"]
    lines = [
        f"exact-count accuracy {s['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] over {s['images']} "
        f"images ({s['counter']['name']} counter)"
    ]
    for title, key in (("count", "by_count"), ("class", "by_class"), ("variant", "by_variant")):
        parts = [f"{k} {g['accuracy']:.2f}" for k, g in s[key].items()]
        lines.append(f"  by {title}: " + ", ".join(parts))
    return "\n".join(lines)
