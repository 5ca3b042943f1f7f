"""Text-to-image generation: a diffusers pipeline (Stable Diffusion 1.x/2.x/XL/turbo from a
local folder, or a hub id when online) or a tunelab tiny diffusion model (tiny.py), behind one
`generate`. Every image has its own seed (seed + i), so any one of them can be made again."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tunelab.errors import ConfigError, ModelError
from tunelab.image.tiny import MARKER


@dataclass
class Settings:
    """Everything that decides the images; written to the JSON sidecar."""

    prompt: str
    n: int = 4
    steps: int | None = None  # None: the pipeline's default (tiny: 20, diffusers: 25)
    size: int | None = None  # None: the model's native size
    guidance: float | None = None  # None: tiny 3.0, diffusers 7.5
    seed: int = 0
    negative_prompt: str | None = None


class Pipeline:
    """A loaded model that makes images: `kind`, `source`, `defaults`, `__call__`."""

    kind = "pipeline"
    defaults = {"steps": 25, "guidance": 7.5}

    def __init__(self, source: str):
        self.source = source

    def resolved(self, s: Settings) -> Settings:
        return Settings(
            s.prompt,
            s.n,
            s.steps or self.defaults["steps"],
            s.size or self.native_size,
            self.defaults["guidance"] if s.guidance is None else s.guidance,
            s.seed,
            s.negative_prompt,
        )

    def describe(self) -> dict:
        return {"source": self.source, "kind": self.kind}

    def images(self, s: Settings, on_image=None) -> list:
        out = []
        for i in range(s.n):
            out.append(self.image(s, i))
            if on_image:
                on_image(i)
        return out


class TinyPipeline(Pipeline):
    kind = "tunelab-tiny"
    defaults = {"steps": 20, "guidance": 3.0}

    def __init__(self, source: str, model=None):
        from tunelab.image.tiny import TinyDiffusion

        super().__init__(source)
        self.model = model if model is not None else TinyDiffusion.load(source)
        self.native_size = self.model.size

    def images(self, s: Settings, on_image=None) -> list:
        """All n at once: a tiny model's step costs little more for n images than for one."""
        from tunelab.image.tiny import sample

        if s.size != self.native_size:
            raise ConfigError(f"--size {s.size}: this model makes {self.native_size}-pixel images")
        images = sample(self.model, s.prompt, [s.seed + i for i in range(s.n)], s.steps, s.guidance)
        for i in range(s.n):
            if on_image:
                on_image(i)
        return images


class DiffusersPipeline(Pipeline):
    kind = "diffusers"

    def __init__(self, source: str, pipe):
        super().__init__(source)
        self.pipe = pipe
        pipe.set_progress_bar_config(disable=True)  # ours counts images, theirs steps
        unet = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        scale = getattr(pipe, "vae_scale_factor", 8)
        self.native_size = int(getattr(unet.config, "sample_size", 64)) * scale if unet else 512

    def image(self, s: Settings, i: int):
        g = torch.Generator(self.pipe.device).manual_seed(s.seed + i)
        return self.pipe(
            s.prompt,
            negative_prompt=s.negative_prompt,
            num_inference_steps=s.steps,
            guidance_scale=s.guidance,
            height=s.size,
            width=s.size,
            generator=g,
        ).images[0]

    def describe(self) -> dict:
        return {
            **super().describe(),
            "pipeline": type(self.pipe).__name__,
            "scheduler": type(self.pipe.scheduler).__name__,
        }


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_pipeline(source: str, device: str = "cpu") -> Pipeline:
    """A folder with tunelab_image.json (tiny) or model_index.json (diffusers), or a hub id."""
    path = Path(source)
    if path.is_dir() and (path / MARKER).exists():
        return TinyPipeline(source)
    if path.is_dir() and (path / "model_index.json").exists():
        return DiffusersPipeline(source, _from_pretrained(source, device))
    if path.exists():
        raise ModelError(
            f"--model {source}: not an image model (no model_index.json for a "
            f"diffusers pipeline, no {MARKER} for a tunelab one)"
        )
    if not HUB_ID.match(source) or Path(source.split("/")[0]).exists():
        raise ModelError(f"--model {source}: no such model folder")
    return DiffusersPipeline(source, _from_pretrained(source, device))


def _from_pretrained(source: str, device: str):
    try:
        from diffusers import DiffusionPipeline
        from diffusers.utils import logging as diffusers_logging
    except ImportError:
        raise ModelError("image generation needs diffusers: pip install 'tunelab[image]'") from None
    diffusers_logging.set_verbosity_error()  # one line per image is ours to print
    diffusers_logging.disable_progress_bar()
    try:
        pipe = DiffusionPipeline.from_pretrained(source)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"--model {source}: cannot load the pipeline ({first})") from None
    return pipe.to(device)


def generate(pipeline: Pipeline, settings: Settings, on_image=None) -> tuple[list, Settings]:
    """settings.n images for settings.prompt, image i seeded with seed + i; on_image(i) after
    each. Returns the images and the settings with every default filled in."""
    s = pipeline.resolved(settings)
    return pipeline.images(s, on_image), s


def write_images(
    images: list, out: Path, s: Settings, pipeline: Pipeline, wall: float, stem: str = "image"
) -> dict:
    """PNGs and images.json, the sidecar with every setting and each file's seed."""
    import diffusers

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, image in enumerate(images):
        name = f"{stem}-{i:03d}.png"
        image.save(out / name)
        files.append({"file": name, "seed": s.seed + i})
    sidecar = {
        **asdict(s),
        "model": pipeline.describe(),
        "images": files,
        "wall_time_s": round(wall, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }
    (out / "images.json").write_text(json.dumps(sidecar, indent=1) + "\n")
    return sidecar


def check_out(out: Path, flag: str = "--out") -> None:
    """A new or empty folder, checked before any work."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"{flag} {out} holds files; choose a new or empty folder")
