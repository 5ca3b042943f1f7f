"""The counting report's pictures and tables: a grid of the scored images with the counter's
boxes, counted/expected and pass (green) or fail (red), and the Markdown around it."""

from __future__ import annotations

from pathlib import Path

CELL = 160
PASS, FAIL = (40, 170, 60), (215, 45, 45)


def annotated_grid(scored: list[dict], folder: Path, limit: int = 48, columns: int = 8):
    """Up to `limit` images, spread over the prompts (first images of each prompt first)."""
    from PIL import Image, ImageDraw

    order = sorted(range(len(scored)), key=lambda i: (scored[i]["image"].rsplit("-", 1)[-1], i))
    shown = [scored[i] for i in order[:limit]]
    rows = max(1, -(-len(shown) // columns))
    label_h = 30
    grid = Image.new("RGB", (columns * CELL, rows * (CELL + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for k, r in enumerate(shown):
        image = Image.open(Path(folder) / r["image"]).convert("RGB")
        scale = CELL / max(image.size)
        small = image.size[0] <= 64  # tiny models' pixels stay sharp
        resample = Image.Resampling.NEAREST if small else Image.Resampling.BILINEAR
        image = image.resize((int(image.width * scale), int(image.height * scale)), resample)
        x, y = (k % columns) * CELL, (k // columns) * (CELL + label_h)
        grid.paste(image, (x, y))
        colour = PASS if r["correct"] else FAIL
        for box in r.get("boxes", []):
            x0, y0, x1, y1 = (int(v * scale) for v in box[:4])
            draw.rectangle([x + x0, y + y0, x + x1, y + y1], outline=(255, 220, 0), width=2)
        draw.rectangle([x, y, x + CELL - 1, y + CELL - 1], outline=colour, width=3)
        verdict = "pass" if r["correct"] else "fail"
        draw.text(
            (x + 4, y + CELL + 2),
            f"{r['counted']}/{r['expected']} {r['object']} {verdict}",
            fill=colour,
        )
        draw.text((x + 4, y + CELL + 15), str(r.get("variant", ""))[:24], fill=(90, 90, 90))
    return grid


def _table(title: str, groups: dict) -> list[str]:
    lines = [f"| {title} | accuracy | 95% interval | images |", "|---|---|---|---|"]
    for name, g in groups.items():
        lo, hi = g["interval"]
        lines.append(f"| {name} | {g['accuracy']:.3f} | [{lo:.3f}, {hi:.3f}] | {g['images']} |")
    return lines


def report_markdown(s: dict, grid: str | None) -> str:
    lo, hi = s["accuracy_interval"]
    c = s["counter"]
    threshold = f", threshold {c['threshold']}" if "threshold" in c else ""
    lines = [
        "# Counting: exact-count accuracy",
        "",
        f"**{s['accuracy']:.3f}** [{lo:.3f}, {hi:.3f}] over {s['images']} images of "
        f"{s['prompts']} prompts; counter `{c['name']}`{threshold}. {s['rule']}; intervals "
        "are 95% bootstrap intervals over the images.",
        "",
    ]
    if s.get("model"):
        lines += [f"Model `{s['model']}`, settings: {s.get('settings', {})}.", ""]
    for title, key in (
        ("expected count", "by_count"),
        ("class", "by_class"),
        ("prompt variant", "by_variant"),
    ):
        lines += _table(title, s[key]) + [""]
    lines += [
        "Counted for each expected number (where the misses go):",
        "",
        "| expected | counted |",
        "|---|---|",
    ]
    for expected, counted in s["counted"].items():
        lines.append(
            f"| {expected} | " + ", ".join(f"{k}: {v}" for k, v in sorted(counted.items())) + " |"
        )
    if grid:
        lines += ["", f"![annotated grid: boxes, counted/expected, pass or fail]({grid})"]
    return "\n".join(lines) + "\n"
