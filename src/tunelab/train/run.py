"""A training run from a RunConfig: model, method, data, loop, evaluation, run directory.

Commands differ only in the objective and the data template they plug in here.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import yaml

from tunelab.errors import ConfigError
from tunelab.train.config import RunConfig, load_config


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_for_training(cfg: RunConfig, device: torch.device):
    """(model, tokenizer): a pretrained model, or a fresh one from an architecture preset."""
    import tunelab
    from tunelab.model.config import preset
    from tunelab.model.heads import build_model
    from tunelab.tokenizer.tokenizer import Tokenizer

    if cfg.arch:
        if not cfg.tokenizer:
            raise ConfigError(
                "training from scratch (arch) needs a tokenizer: --tokenizer DIR_OR_MODEL"
            )
        path = Path(cfg.tokenizer)
        tokenizer = (
            Tokenizer.from_dir(path) if path.is_dir() else tunelab.load(cfg.tokenizer).tokenizer
        )
        ids = {
            "eos_token_id": tokenizer.eos_id,
            "bos_token_id": tokenizer.bos_id,
            "pad_token_id": tokenizer.pad_id,
        }
        mcfg = preset(
            cfg.arch, vocab_size=tokenizer.vocab_size, max_seq_len=max(cfg.train.seq_len, 64), **ids
        )
        torch.manual_seed(cfg.train.seed)
        model = build_model(mcfg)
        init_weights(model)
        return model.to(device), tokenizer
    lm = tunelab.load(cfg.model, device=str(device))
    return lm.model, lm.tokenizer


def init_weights(model) -> None:
    """GPT-2's initialisation: N(0, 0.02), zero biases, residual projections scaled by depth."""
    n_layer = model.cfg.n_layer
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            std = (
                0.02 / math.sqrt(2 * n_layer)
                if name.endswith(("o_proj.weight", "down_proj.weight"))
                else 0.02
            )
            torch.nn.init.normal_(p, 0.0, std)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)


def set_dropout(model, p: float) -> None:
    for block in getattr(model.transformer, "layers", []):
        block.dropout.p = p


def prepare_run_dir(cfg: RunConfig) -> Path:
    """The run directory with config.yaml written; an existing finished run is not overwritten."""
    out = Path(cfg.out or f"runs/{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}")
    if not cfg.resume and (out / "summary.json").exists():
        raise ConfigError(
            f"{out} holds a finished run; choose another --out or pass --resume {out}"
        )
    out.mkdir(parents=True, exist_ok=True)
    cfg.out = str(out)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return out


def config_for_resume(run_dir: str | Path, overrides: dict) -> RunConfig:
    """The stored config of a run, with the command line's overrides on top."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise ConfigError(f"{run_dir}: no config.yaml, so nothing to resume")
    cfg = load_config(path, {k: v for k, v in overrides.items() if k not in ("resume", "out")})
    cfg.out, cfg.resume = str(run_dir), True
    return cfg


def write_summary(run_dir: Path, summary: dict) -> None:
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(run_dir / "summary.json")
