"""The rendered domain: scenes of 1-4 simple shapes on a dark background, captioned in several
phrasings, with counts known exactly. The tiny diffusion model learns from these and the
connected-components counter (counters.py) is validated on them."""

from __future__ import annotations

import math
import random

import numpy as np

# One colour per class, far apart in RGB, so a blob's class is the nearest colour.
CLASSES = {"circle": (235, 64, 52), "square": (52, 200, 70), "triangle": (70, 110, 245)}
# The phrasings captions are drawn from; evaluate counting's default variants use the same.
PHRASINGS = {
    "word": "{number} {object}",
    "digit": "{digit} {object}",
    "photo": "a photo of {number} {object}",
    "exact": "exactly {number} {object}, no more, no fewer",
}
BACKGROUND = (16, 16, 16)
MAX_COUNT = 4


def phrase(template: str, count: int, obj: str) -> str:
    """The template filled for count objects of a class (singular for one)."""
    from tunelab.image.prompts import fill

    return fill(template, count, obj)


def _mask(kind: str, size: int, radius: float, cx: float, cy: float) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = x - cx, y - cy
    if kind == "circle":
        return dx * dx + dy * dy <= radius * radius
    if kind == "square":
        half = radius * 0.85
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # an upward triangle inscribed in the circle: below two edges, above the base
    base = cy + radius * 0.6
    slope = math.tan(math.radians(60))
    return (y <= base) & (y >= cy - radius + slope * np.abs(dx) * 0.95)


def render(count: int, obj: str, size: int = 32, rng: random.Random | None = None) -> np.ndarray:
    """An HxWx3 uint8 scene of `count` shapes of class `obj`, separated by at least two
    background pixels so that each is one connected component."""
    rng = rng or random.Random(0)
    radius = size / 9
    image = np.empty((size, size, 3), np.uint8)
    image[:] = BACKGROUND
    colour = np.array(CLASSES[obj], np.uint8)
    centres: list[tuple[float, float]] = []
    gap, tries = 2 * radius + 2.5, 0
    while len(centres) < count:  # rejection sampling, started over when it paints itself in
        c = (rng.uniform(radius + 1, size - radius - 1), rng.uniform(radius + 1, size - radius - 1))
        tries += 1
        if all(math.dist(c, o) >= gap for o in centres):
            centres.append(c)
        elif tries > 200:
            centres, tries = [], 0
    for cx, cy in centres:
        image[_mask(obj, size, radius, cx, cy)] = colour
    return image


def scene(index: int, seed: int = 0, size: int = 32) -> tuple[np.ndarray, str, int, str]:
    """The index-th training example of a seeded endless dataset: (image, caption, count,
    class); the same index always gives the same example, so a resumed run sees the same data."""
    rng = random.Random(seed * 1_000_003 + index)
    count, obj = rng.randint(1, MAX_COUNT), rng.choice(sorted(CLASSES))
    caption = phrase(PHRASINGS[rng.choice(sorted(PHRASINGS))], count, obj)
    return render(count, obj, size, rng), caption, count, obj


def vocabulary() -> list[str]:
    """Every word a caption can hold: the text encoder's vocabulary (0 pad, 1 unknown)."""
    words = set()
    for template in PHRASINGS.values():
        for obj in CLASSES:
            for count in range(1, 11):  # the spelled numbers prompts.fill knows
                words.update(tokens(phrase(template, count, obj)))
    return ["<pad>", "<unk>", *sorted(words)]


def tokens(text: str) -> list[str]:
    """Lower-case words and digits; punctuation dropped."""
    return "".join(c if c.isalnum() else " " for c in text.lower()).split()
