"""The detector's confidence threshold, calibrated on images whose counts we know: copies of the
sample photos inside the scikit-image and matplotlib wheels (a cat, people, a horse, a
cup) composed 1-4 to a canvas. The threshold with the best exact-count accuracy
is kept, with the sweep that chose it, in calibration.json beside detector.py."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from tunelab.errors import ModelError

# (class, wheel, file): photos with one clear object each, as the detector sees them.
PHOTOS = [
    ("cat", "skimage", "chelsea.png"),
    ("person", "skimage", "astronaut.png"),
    ("person", "skimage", "camera.png"),
    ("person", "matplotlib", "grace_hopper.jpg"),
    ("horse", "skimage", "horse.png"),
    ("cup", "skimage", "coffee.png"),
]
THRESHOLDS = [round(0.1 + 0.05 * i, 2) for i in range(17)]  # 0.1 .. 0.9
CANVAS = 640


def photo_path(wheel: str, name: str) -> Path:
    """A sample photo's file inside its installed wheel (found by path, nothing downloaded)."""
    import importlib.util

    spec = importlib.util.find_spec(wheel)
    if spec is None:
        raise ModelError(
            f"calibration photos: {wheel} is not installed (pip install 'tunelab[image]')"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    path = root / "data" / name if wheel == "skimage" else root / "mpl-data" / "sample_data" / name
    if not path.exists():
        raise ModelError(f"calibration photo {path} is missing")
    return path


def photos(obj: str) -> list[np.ndarray]:
    from PIL import Image

    out = [Image.open(photo_path(w, f)).convert("RGB") for c, w, f in PHOTOS if c == obj]
    return [np.asarray(im) for im in out]


def compose(obj: str, count: int, seed: int, size: int = CANVAS) -> np.ndarray:
    """count copies of obj's photos, each in its own cell of a 2x2 grid, at a random scale and
    offset (flipped at random), on a plain grey canvas: the count is known by construction."""
    from PIL import Image

    rng = random.Random(f"{obj}-{count}-{seed}")
    sources = photos(obj)
    canvas = Image.new("RGB", (size, size), (200, 200, 200))
    cell = size // 2
    for slot in rng.sample(range(4), count):
        photo = Image.fromarray(rng.choice(sources))
        if rng.random() < 0.5:
            photo = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        scale = rng.uniform(0.75, 0.95) * cell / max(photo.size)
        photo = photo.resize((max(1, int(photo.width * scale)), max(1, int(photo.height * scale))))
        x = (slot % 2) * cell + rng.randint(0, cell - photo.width)
        y = (slot // 2) * cell + rng.randint(0, cell - photo.height)
        canvas.paste(photo, (x, y))
    return np.asarray(canvas)


def known_counts(classes, counts=(1, 2, 3, 4), seeds=range(3)):
    """(image, class, count) for every class x count x seed."""
    for obj in classes:
        for n in counts:
            for seed in seeds:
                yield compose(obj, n, seed), obj, n


def calibrate(detector, classes=("cat", "person", "horse", "cup"), seeds=range(3)) -> dict:
    """Sweep the threshold over composed images; keep the one with the best exact-count
    accuracy (the lowest of equals, so fewer objects are missed on harder images)."""
    from tunelab.image.counters import count
    from tunelab.image.detector import suppress

    cases = [(detector.raw(img), obj, n) for img, obj, n in known_counts(classes, seeds=seeds)]
    sweep = {}
    for t in THRESHOLDS:
        hits = [count(suppress(raw, t, detector.nms_iou), obj) == n for raw, obj, n in cases]
        sweep[t] = round(sum(hits) / len(hits), 4)
    best = max(sweep.values())
    threshold = min(t for t, acc in sweep.items() if acc == best)
    by_class = {}
    for raw, obj, n in cases:
        by_class.setdefault(obj, []).append(
            count(suppress(raw, threshold, detector.nms_iou), obj) == n
        )
    return {
        "threshold": threshold,
        "accuracy": best,
        "images": len(cases),
        "by_class": {k: round(sum(v) / len(v), 4) for k, v in by_class.items()},
        "sweep": {str(t): acc for t, acc in sweep.items()},
        "photos": [f"{w}:{f} ({c})" for c, w, f in PHOTOS if c in classes],
        "counts": [1, 2, 3, 4],
        "seeds": list(seeds),
        "nms_iou": detector.nms_iou,
        "rule": "exact count of the class's detections at or above the threshold, after NMS",
    }


def write_calibration(result: dict, path: Path) -> None:
    path.write_text(json.dumps(result, indent=1) + "\n")
