"""A tiny text-conditioned diffusion model, trained from scratch on the rendered domain:
diffusers' UNet2DConditionModel in pixel space, a word-level text encoder of our own, and a
diffusers scheduler. Saved as a folder (`tunelab_image.json`, `unet/`, `text_encoder.*`,
`scheduler/`) that `tunelab image generate` and `evaluate counting` read like any model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

MARKER = "tunelab_image.json"

# Small enough to train in minutes on two CPU cores: attention only at the lowest level (a
# quarter of the side), where one query sees the whole scene, which is what counting needs.
UNET = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 1,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 64,
    "attention_head_dim": 16,
    "norm_num_groups": 8,
}
TEXT = {"dim": 64, "layers": 2, "heads": 4, "max_len": 16}
SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
}


def plain_attention(unet) -> None:
    """Attention as plain matmuls: on CPU, torch's fused kernel is slower at these head sizes."""
    from diffusers.models.attention_processor import AttnProcessor

    unet.set_attn_processor(AttnProcessor())


class WordTokenizer:
    """Words to ids over a fixed vocabulary; 0 pads, 1 stands for a word it has not seen."""

    def __init__(self, vocab: list[str], max_len: int):
        self.vocab, self.max_len = list(vocab), max_len
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from tunelab.image.shapes import tokens

        ids = torch.zeros(len(texts), self.max_len, dtype=torch.long)
        for row, text in enumerate(texts):
            words = [self.ids.get(w, 1) for w in tokens(text)][: self.max_len]
            ids[row, : len(words)] = torch.tensor(words, dtype=torch.long)
        # the empty caption (classifier-free guidance) keeps one position so attention has a key
        mask = ids != 0
        mask[:, 0] = True
        return ids, mask


class TextEncoder(nn.Module):
    """Embeddings, learned positions and a few bidirectional transformer layers."""

    def __init__(self, vocab_size: int, dim: int, layers: int, heads: int, max_len: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(max_len, dim))
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim * 2, dropout=0.0, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.pos[: ids.shape[1]]
        return self.norm(self.layers(h, src_key_padding_mask=~mask))


class TinyDiffusion(nn.Module):
    """The UNet and the text encoder as one module (one optimizer, one checkpoint)."""

    def __init__(
        self,
        vocab: list[str],
        unet: dict | None = None,
        text: dict | None = None,
        scheduler: dict | None = None,
    ):
        from diffusers import UNet2DConditionModel

        super().__init__()
        self.unet_config = {**UNET, **(unet or {})}
        self.text_config = {**TEXT, **(text or {})}
        self.scheduler_config = {**SCHEDULER, **(scheduler or {})}
        self.tokenizer = WordTokenizer(vocab, self.text_config["max_len"])
        self.text_encoder = TextEncoder(len(vocab), **self.text_config)
        self.unet = UNet2DConditionModel(**self.unet_config)
        plain_attention(self.unet)

    @property
    def size(self) -> int:
        return int(self.unet_config["sample_size"])

    @property
    def train_timesteps(self) -> int:
        return int(self.scheduler_config["num_train_timesteps"])

    def add_noise(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x noised to step t by the training scheduler (DDPM, same betas as sampling)."""
        from diffusers import DDPMScheduler

        if getattr(self, "_noiser", None) is None:
            self._noiser = DDPMScheduler(**self.scheduler_config)
        return self._noiser.add_noise(x, noise, t)

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer(captions)
        device = self.unet.device
        ids, mask = ids.to(device), mask.to(device)
        return self.text_encoder(ids, mask), mask

    def forward(self, noisy, timesteps, captions: list[str]) -> torch.Tensor:
        hidden, mask = self.encode(captions)
        return self.unet(
            noisy, timesteps, encoder_hidden_states=hidden, encoder_attention_mask=mask
        ).sample

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(path / "unet")
        state = {k: v.contiguous() for k, v in self.text_encoder.state_dict().items()}
        save_file(state, str(path / "text_encoder.safetensors"))
        meta = {
            "kind": "tiny-diffusion",
            "vocab": self.tokenizer.vocab,
            "text": self.text_config,
            "scheduler": self.scheduler_config,
        }
        (path / MARKER).write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> TinyDiffusion:
        from diffusers import UNet2DConditionModel
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads((path / MARKER).read_text())
        model = cls(meta["vocab"], text=meta["text"], scheduler=meta["scheduler"])
        model.unet = UNet2DConditionModel.from_pretrained(path / "unet")
        plain_attention(model.unet)
        model.unet_config = dict(model.unet.config)
        model.text_encoder.load_state_dict(load_file(str(path / "text_encoder.safetensors")))
        return model.eval()


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats (N, 3, H, W) to uint8 (N, H, W, 3)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def from_pixels(images) -> torch.Tensor:
    """uint8 (N, H, W, 3) arrays to [-1, 1] floats (N, 3, H, W)."""
    x = torch.as_tensor(images).float().permute(0, 3, 1, 2)
    return x / 127.5 - 1


@torch.no_grad()
def sample(
    model: TinyDiffusion, prompt: str, seeds: list[int], steps: int, guidance: float
) -> list:
    """One image per seed for one prompt, denoised together as one batch (DDIM is
    deterministic, so image i depends only on its own seed's noise), with classifier-free
    guidance against the empty caption."""
    from diffusers import DDIMScheduler
    from PIL import Image

    scheduler = DDIMScheduler(**model.scheduler_config)
    scheduler.set_timesteps(steps)
    n = len(seeds)
    hidden, mask = model.encode([prompt, ""])
    hidden = hidden.repeat_interleave(n, 0)  # n conditional rows, then n unconditional ones
    mask = mask.repeat_interleave(n, 0)
    shape = (1, 3, model.size, model.size)
    x = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    for t in scheduler.timesteps:
        eps = model.unet(
            torch.cat([x, x]), t, encoder_hidden_states=hidden, encoder_attention_mask=mask
        ).sample
        cond, uncond = eps.chunk(2)
        x = scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    return [Image.fromarray(a.numpy()) for a in to_pixels(x)]
