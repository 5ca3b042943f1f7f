"""From scratch for images: the tiny text-to-image model (image/tiny.py) trained on rendered
shapes (image/shapes.py) by the one training loop, as `tunelab pretrain --arch` trains a small
GPT. The run directory is a training run's: config.yaml, metrics.jsonl, checkpoints/, final/
(the model `image generate` and `evaluate counting` read) and summary.json.

    data: {size: 16, seed: 0, caption_dropout: 0.1}
    model: {unet: {...}, text: {...}}      # overrides of image/tiny.py's UNET and TEXT
    train: {max_steps: 1500, batch_size: 32, lr: 1.0e-3, ...}   # train/config.py's TrainConfig
    ema: 0.995                              # the saved model is the weights' moving average
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from tunelab.errors import ConfigError
from tunelab.runtime import threads
from tunelab.train.config import TrainConfig, _build, opt, set_dotted

log = logging.getLogger("tunelab")


@dataclass
class ImageData:
    size: int = opt(16, "image side in pixels")
    seed: int = opt(0, "seed of the rendered scenes (the dataset is endless and deterministic)")
    caption_dropout: float = opt(0.1, "share of empty captions: classifier-free guidance")


@dataclass
class ImageModel:
    unet: dict = opt({}, "UNet2DConditionModel options over image/tiny.py's UNET")
    text: dict = opt({}, "text encoder options over image/tiny.py's TEXT")


@dataclass
class ImageConfig:
    out: str | None = opt(None, "run directory; default runs/image-<timestamp>")
    resume: bool = opt(False, "continue the run in `out` from its latest checkpoint")
    ema: float = opt(0.995, "decay of the weights' moving average that is saved (0: none)")
    threads: int | None = opt(None, "torch CPU threads; default torch's own")
    data: ImageData = field(default_factory=ImageData)
    model: ImageModel = field(default_factory=ImageModel)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_image_config(path: str | None, overrides: dict) -> ImageConfig:
    """An ImageConfig from YAML plus dotted overrides; unknown keys name the closest one."""
    data = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError:
            raise ConfigError(f"{path}: invalid YAML") from None
    for dotted, value in overrides.items():
        set_dotted(data, dotted, value)
    sections = {"data": ImageData, "model": ImageModel, "train": TrainConfig}
    plain = {k: v for k, v in data.items() if k not in sections}
    cfg = _build(ImageConfig, plain, "")
    for name, cls in sections.items():
        if name in data:
            setattr(cfg, name, _build(cls, data[name] or {}, f"{name}."))
    return cfg


class Scenes:
    """Endless seeded batches of rendered scenes for the loop: resumable by position."""

    def __init__(self, cfg: ImageData, batch_size: int):
        self.cfg, self.batch_size, self.position = cfg, batch_size, 0

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])

    def forever(self):
        import numpy as np

        from tunelab.image.shapes import scene
        from tunelab.image.tiny import from_pixels

        while True:
            first = self.position * self.batch_size
            examples = [
                scene(first + i, self.cfg.seed, self.cfg.size) for i in range(self.batch_size)
            ]
            drop = random.Random(f"drop-{self.cfg.seed}-{self.position}")
            captions = ["" if drop.random() < self.cfg.caption_dropout else e[1] for e in examples]
            self.position += 1
            # attention_mask: one per image, so the loop's "tokens" count images
            yield {
                "pixels": from_pixels(np.stack([e[0] for e in examples])),
                "captions": captions,
                "attention_mask": torch.ones(len(examples)),
            }


class EMA:
    """A loop callback keeping the moving average of the weights (what gets saved): one
    noisy step matters less to a diffusion model's samples than to its loss."""

    def __init__(self, decay: float):
        self.decay, self.shadow = decay, None

    def on_start(self, trainer) -> None:
        self.shadow = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    def on_resume(self, trainer, step: int) -> None:
        self.shadow = None  # checkpoints hold the weights, not their average: restart it

    def on_optimizer(self, trainer) -> None:
        pass

    def on_step(self, trainer, step: int) -> None:
        if self.shadow is None:  # resumed: the checkpoint's weights have loaded by now
            self.on_start(trainer)
        d = min(self.decay, (1 + step) / (10 + step))  # warm up: early weights are noise
        with torch.no_grad():
            for k, v in trainer.model.state_dict().items():
                if v.dtype.is_floating_point:
                    self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)


def run_image_training(cfg: ImageConfig) -> dict:
    """Train the tiny model as cfg says; returns summary.json's contents."""
    from tunelab.image.shapes import vocabulary
    from tunelab.image.tiny import TinyDiffusion
    from tunelab.train.checkpoints import latest_checkpoint
    from tunelab.train.loop import Trainer
    from tunelab.train.objectives import denoising
    from tunelab.train.run import resume_notes, write_summary
    from tunelab.train.rundir import check_run_dir, own_run_dir

    out = Path(cfg.out or f"runs/image-{time.strftime('%Y%m%d-%H%M%S')}")
    check_run_dir(out)
    if cfg.resume and (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    if not cfg.resume and out.is_dir() and any(p.name != ".lock" for p in out.iterdir()):
        raise ConfigError(
            f"--out {out} holds files; choose a new or empty folder "
            f"(or continue an interrupted run with --resume {out})"
        )
    if not cfg.train.max_steps:
        raise ConfigError("train.max_steps: the rendered dataset is endless; say how many steps")
    torch.manual_seed(cfg.train.seed)
    unet = {"sample_size": cfg.data.size, **cfg.model.unet}
    model = TinyDiffusion(vocabulary(), unet=unet, text=cfg.model.text)
    callbacks = [EMA(cfg.ema)] if cfg.ema else []
    with ExitStack() as owned:
        owned.enter_context(threads(cfg.threads))  # restored after: the setting is this run's
        owned.enter_context(own_run_dir(out))
        cfg.out = str(out)
        (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        batches = Scenes(cfg.data, cfg.train.batch_size)
        trainer = Trainer(
            model, denoising, batches, cfg.train, out, cfg.train.max_steps, callbacks=callbacks
        )
        checkpoint = latest_checkpoint(out) if cfg.resume else None
        if checkpoint is not None:
            trainer.load_checkpoint(checkpoint)
        if cfg.resume:
            resume_notes(out, checkpoint, trainer.step)
        summary = trainer.fit()
        if callbacks:
            model.load_state_dict(callbacks[0].shadow)
        model.eval().save(out / "final")
        losses = [
            json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
        ]
        summary.update(
            task="image",
            final_loss=round(sum(losses[-20:]) / len(losses[-20:]), 5),
            images=summary.pop("tokens"),
            images_per_s=round(summary.pop("tokens_per_s"), 2),
            threads=torch.get_num_threads(),
            data=dataclasses.asdict(cfg.data),
        )
        write_summary(out, summary)
        (out / "final" / "training.json").write_text(json.dumps(summary, indent=1))
    return summary
