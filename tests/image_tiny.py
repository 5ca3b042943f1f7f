"""Tiny random image models built from configs, no hub: a Stable Diffusion pipeline (CLIP text
encoder, VAE, UNet, scheduler) and a tunelab tiny diffusion model, each saved to a folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("cv2")


def clip_tokenizer_files(folder: Path) -> None:
    """A byte-level vocabulary with no merges: every character is a token."""
    from tunelab.tokenizer.bpe import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def make_sd_pipeline(folder: Path) -> Path:
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=16,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=600,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        )
    )
    clip_tokenizer_files(folder / "tok")
    tokenizer = CLIPTokenizer(
        str(folder / "tok" / "vocab.json"), str(folder / "tok" / "merges.txt"), model_max_length=32
    )
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "sd")
    return folder / "sd"


def make_tiny_model(folder: Path, size: int = 16) -> Path:
    import torch

    from tunelab.image.shapes import vocabulary
    from tunelab.image.tiny import TinyDiffusion

    torch.manual_seed(0)
    unet = {
        "sample_size": size,
        "block_out_channels": [8, 16, 16],
        "norm_num_groups": 4,
        "attention_head_dim": 8,
        "cross_attention_dim": 16,
    }
    model = TinyDiffusion(vocabulary(), unet=unet, text={"dim": 16, "layers": 1, "heads": 2})
    model.save(folder / "tiny")
    return folder / "tiny"


class BrightBlobs:
    """A counter brought from outside (`--counter image_tiny:BrightBlobs`): it only needs the
    interface's name, classes, detect() and record(); this one calls every blob a circle."""

    name = "bright-blobs"
    classes = ("circle",)

    def __init__(self, threshold: float = 0.5):
        from tunelab.image.counters import ComponentCounter

        self.inner, self.threshold = ComponentCounter(), threshold

    def check_class(self, obj: str) -> None:
        pass

    def detect(self, image):
        from dataclasses import replace

        return [replace(d, label="circle") for d in self.inner.detect(image)]

    def record(self) -> dict:
        return {"name": self.name, "threshold": self.threshold}
