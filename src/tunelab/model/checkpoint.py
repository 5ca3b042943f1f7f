"""Read and write model directories: HF layout in, tunelab format and HF export out.

Never unpickles: safetensors, or torch.load(weights_only=True) for old .bin files.
Writes go to a temporary directory that is renamed into place, so a kill never leaves half a model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from tunelab.errors import ModelError
from tunelab.files import umask
from tunelab.model.config import ModelConfig, from_hf_config
from tunelab.model.convert import hf_shapes, hf_tensor, to_hf_config, tunelab_to_hf
from tunelab.model.heads import EncoderModel, build_model
from tunelab.model.weights import hf_entries, materialize, read_tensors, write_shards
from tunelab.paths import check_folder_out
from tunelab.tokenizer.tokenizer import Tokenizer

CONFIG_FILE = "tunelab.json"  # marks a directory written by tunelab (tunelab weight names)


def is_model_dir(path: Path) -> bool:
    """A folder tunelab or Hugging Face wrote a model (or a PEFT adapter) into."""
    if (path / CONFIG_FILE).exists() or (path / "adapter_config.json").exists():
        return True
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    return (path / "config.json").exists() and any((path / w).exists() for w in weights)


def check_model_out(path: str | Path, force: bool = False) -> None:
    """Refuse an output folder whose replacement would remove what tunelab did not write:
    a file, a non-empty folder that is not a model, a model folder unless force."""
    path = Path(path)
    check_folder_out(path, "the model", error=ModelError)
    if path.is_dir() and any(path.iterdir()):
        if not is_model_dir(path):
            raise ModelError(
                f"--out {path} holds files that are not a model; choose a new or empty folder"
            )
        if not force:
            raise ModelError(f"--out {path} already holds a model; pass --force to replace it")


def _readable(folder: Path) -> None:
    """The user's umask on a folder and its files: mkdtemp (and safetensors) make them private."""
    mask = umask()
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_dir(target: str | Path):
    """Yield a temporary directory beside target; on success it replaces target in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        _readable(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _bin_tensors(path: Path) -> dict[str, torch.Tensor]:
    """An old pytorch_model.bin, memory-mapped and never unpickled beyond plain tensors."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ModelError(f"{path}: cannot read safely ({e})") from None


def _sources(path: Path):
    """(config, {tunelab name: shape}, tensors) of a model directory, tensors read lazily."""
    if (path / CONFIG_FILE).exists():
        cfg = ModelConfig.from_dict(json.loads((path / CONFIG_FILE).read_text())["model"])
        entries = hf_entries(path)
        return cfg, {n: e.shape for n, e in entries.items()}, read_tensors(entries)
    if not (path / "config.json").exists():
        raise ModelError(f"{path}: neither {CONFIG_FILE} nor config.json; not a model directory")
    try:
        cfg = from_hf_config(json.loads((path / "config.json").read_text()))
    except json.JSONDecodeError as e:
        raise ModelError(f"{path / 'config.json'}: invalid JSON at line {e.lineno}") from None
    safetensors = ("model.safetensors", "model.safetensors.index.json")
    if (path / "pytorch_model.bin").exists() and not any((path / f).exists() for f in safetensors):
        state = _bin_tensors(path / "pytorch_model.bin")
        shapes = {n: s for raw, t in state.items() for n, s in hf_shapes(raw, t.shape, cfg).items()}
        return cfg, shapes, (p for raw, t in state.items() for p in hf_tensor(raw, t, cfg))
    entries = hf_entries(path)
    shapes = {n: s for raw, e in entries.items() for n, s in hf_shapes(raw, e.shape, cfg).items()}
    tensors = (p for raw, t in read_tensors(entries) for p in hf_tensor(raw, t, cfg))
    return cfg, shapes, tensors


def check_names(model: nn.Module, shapes: dict[str, tuple], source: Path) -> None:
    """Name missing, unexpected or misshapen tensors before any is read."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in shapes and not _tied(model, k)]
    if missing:
        raise ModelError(f"{source}: checkpoint lacks {len(missing)} tensors, e.g. {missing[0]!r}")
    for name, shape in shapes.items():
        if name not in expected:
            raise ModelError(f"{source}: unexpected tensor {name!r}")
        if tuple(shape) != tuple(expected[name].shape):
            raise ModelError(
                f"{source}: {name} has shape {tuple(shape)}, the config says {tuple(expected[name].shape)}"
            )


def _tied(model: nn.Module, name: str) -> bool:
    return model.cfg.tie_embeddings and name in ("lm_head.weight", "mlm_head.decoder.weight")


def load_model_dir(
    path: str | Path, dtype: torch.dtype = torch.float32, device="cpu", on_linear=None
):
    """(model, tokenizer) from a tunelab or HF-layout directory, read one tensor at a time.

    Every floating-point tensor is stored in `dtype` as it is read; on_linear(name, linear)
    may replace each block linear once it is loaded (see weights.materialize)."""
    path = Path(path)
    cfg, shapes, tensors = _sources(path)
    with torch.device("meta"):
        model = build_model(cfg)
        if isinstance(model, EncoderModel) and any(k.startswith("mlm_head.") for k in shapes):
            model = EncoderModel(cfg, mlm=True)
    check_names(model, shapes, path)
    materialize(model, tensors, dtype, device, on_linear)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval(), Tokenizer.from_dir(path)


def save_model_dir(
    model: nn.Module,
    tokenizer: Tokenizer | None,
    path: str | Path,
    extra: dict | None = None,
    tensors=None,
) -> None:
    """Write a tunelab checkpoint directory atomically: weights (sharded past 512 MiB), config,
    tokenizer. tensors: (name, tensor) pairs to write instead of the model's state dict, e.g.
    a LoRA model's merged weights made one at a time."""
    check_model_out(path, force=True)
    if tensors is None:
        tensors = ((k, v) for k, v in model.state_dict().items() if not _tied(model, k))
    with atomic_dir(path) as tmp:
        write_shards(tensors, tmp)
        meta = {"format": 1, "model": model.cfg.to_dict(), **(extra or {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)


def export_hf(model: nn.Module, tokenizer: Tokenizer | None, path: str | Path) -> None:
    """Write an HF directory that transformers' AutoModel*.from_pretrained loads with equal logits:
    float32 tensors made and written one at a time into shards (HF's index past 512 MiB), so
    a 7B model is exported within a shard of memory over the model itself."""
    check_model_out(path, force=True)
    with atomic_dir(path) as tmp:
        state = ((k, v.detach().float()) for k, v in model.state_dict().items())
        write_shards(tunelab_to_hf(state, model.cfg), tmp, metadata={"format": "pt"})
        hf = to_hf_config(model.cfg)
        hf["torch_dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
