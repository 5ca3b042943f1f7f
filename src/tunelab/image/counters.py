"""Counters: what finds the objects in an image. One small interface, so the rendered domain's
connected components, the SSD-MobileNet detector (detector.py) and a stronger detector a user
brings (`--counter package.module:Class`) are used alike by evaluate counting and the report.

A counter's `detect(image)` returns Detections (box in pixels, class name, score); the count of
a class is how many of its detections there are (the counter applies its own threshold), and an
image passes when that count equals the expected one exactly (GenEval's counting rule)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np

from tunelab.errors import ConfigError, closest


@dataclass
class Detection:
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels
    label: str
    score: float


class Counter:
    """The interface: a name, the classes it can count, and detect()."""

    name = "counter"
    classes: tuple[str, ...] = ()

    def detect(self, image) -> list[Detection]:
        raise NotImplementedError

    def record(self) -> dict:
        """What a report needs to reproduce the counting: name, threshold, calibration."""
        return {"name": self.name}

    def check_class(self, obj: str) -> None:
        if obj not in self.classes:
            raise ConfigError(
                f"object {obj!r}: the {self.name} counter does not know it"
                f"{closest(obj, self.classes)}; it counts {', '.join(self.classes)}"
            )


def count(detections: list[Detection], obj: str) -> int:
    return sum(d.label == obj for d in detections)


def exact(counted: int, expected: int) -> bool:
    """GenEval's rule: the count of the target class is exactly the one asked for."""
    return counted == expected


def as_array(image) -> np.ndarray:
    """An HxWx3 uint8 RGB array from a PIL image, a path or an array."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        return image
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    return np.asarray(image.convert("RGB"))


class ComponentCounter(Counter):
    """The rendered domain's counter (image/shapes.py): each shape is one blob of its class's
    colour on a dark background, so a class's count is its connected components. Pixels take
    the nearest class colour when close enough to it; specks under min_area are noise."""

    name = "components"

    def __init__(self, min_area: int = 6, max_distance: float = 110.0):
        from tunelab.image.shapes import CLASSES

        self.palette = CLASSES
        self.classes = tuple(CLASSES)
        self.min_area, self.max_distance = min_area, max_distance

    def detect(self, image) -> list[Detection]:
        import cv2

        pixels = as_array(image).astype(np.float32)
        colours = np.array(list(self.palette.values()), np.float32)
        distance = np.linalg.norm(pixels[:, :, None, :] - colours[None, None], axis=-1)
        nearest, best = distance.argmin(-1), distance.min(-1)
        scale = pixels.shape[0] / 32  # min_area is given for 32-pixel images
        found = []
        for k, name in enumerate(self.palette):
            mask = ((nearest == k) & (best <= self.max_distance)).astype(np.uint8)
            n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
            for x, y, w, h, area in stats[1:n]:
                if area >= self.min_area * scale * scale:
                    found.append(Detection((int(x), int(y), int(x + w), int(y + h)), name, 1.0))
        return found

    def record(self) -> dict:
        return {"name": self.name, "min_area": self.min_area, "max_distance": self.max_distance}


def make_counter(spec: str, **options) -> Counter:
    """`components`, `ssd-mobilenet`, or `package.module:Class` (a Counter subclass taking the
    same keyword options): a stronger detector where its weights exist."""
    if spec == "components":
        return ComponentCounter(**options)
    if spec == "ssd-mobilenet":
        from tunelab.image.detector import SSDMobileNet

        return SSDMobileNet(**options)
    if ":" in spec:
        module, _, cls = spec.partition(":")
        try:
            return getattr(importlib.import_module(module), cls)(**options)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"--counter {spec}: cannot load it ({e})") from None
    names = ("components", "ssd-mobilenet")
    raise ConfigError(
        f"--counter {spec!r}: expected components, ssd-mobilenet or module:Class"
        f"{closest(spec, names)}"
    )
