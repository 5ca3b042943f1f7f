"""A model source's config and stored weight sizes, read from headers alone: no tensor is loaded.

`tunelab estimate` and the pre-flight memory check use these, so a 70B model is sized in
seconds with almost no memory. Sources are those `hub.resolve` takes: a known name, an HF or
tunelab directory, a .gguf file, or a hub id (for which only config.json is fetched).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tunelab.errors import ModelError, TunelabError
from tunelab.model.checkpoint import CONFIG_FILE
from tunelab.model.config import ModelConfig, from_hf_config
from tunelab.model.weights import DTYPE_NAMES, hf_entries


def read_config(source: str | Path) -> ModelConfig:
    """The ModelConfig of a source, read from config.json, tunelab.json or a GGUF header."""
    path = _local_or_config(source)
    if path.suffix == ".gguf" and path.is_file():
        from tunelab.model.gguf import cache_dir, read_gguf_config

        if (cache_dir(path) / "config.json").exists():  # converted before: skip the slow header
            return read_config(cache_dir(path))
        return _mapped(read_gguf_config(path), path)
    if path.is_file():  # a config.json fetched alone for a hub id
        return _mapped(_read_json(path), path)
    if (path / CONFIG_FILE).exists():
        meta = _read_json(path / CONFIG_FILE)
        if not isinstance(meta.get("model"), dict):
            raise ModelError(f"{path / CONFIG_FILE}: no 'model' section; not a tunelab checkpoint")
        try:
            return ModelConfig.from_dict(meta["model"])
        except TunelabError as e:
            raise ModelError(f"{path / CONFIG_FILE}: {e}") from None
    if (path / "config.json").exists():
        return _mapped(_read_json(path / "config.json"), path / "config.json")
    raise ModelError(f"{path}: neither {CONFIG_FILE} nor config.json; not a model directory")


def weight_bytes(source: str | Path) -> dict:
    """Bytes and dtypes of the stored weights, from safetensors or GGUF headers (no tensor data).

    Returns total_bytes, params, by_dtype ({dtype: {params, bytes}}), largest (name, params,
    bytes) and files. Raises ModelError when the source holds no weight files.
    """
    path = _local_or_config(source)
    if path.suffix == ".gguf" and path.is_file():
        return _gguf_weights(path)
    if not path.is_dir():
        raise ModelError(f"{path}: no weight files beside this config (only the config was read)")
    entries = hf_entries(path, whole=False)
    by_dtype: dict[str, dict] = {}
    largest = dict(name=None, params=0, bytes=0)
    for name, e in entries.items():
        _add(by_dtype, largest, name, DTYPE_NAMES[e.dtype], math.prod(e.shape), e.nbytes)
    return _summary(by_dtype, largest, sorted({e.file for e in entries.values()}))


def _local_or_config(source: str | Path) -> Path:
    """A local path for source; for a hub id not present locally, its config.json alone."""
    from tunelab.hub import KNOWN, embedded_path, resolve

    text = str(source)
    if Path(text).expanduser().exists():
        return resolve(text)
    known = KNOWN.get(text)
    if known is not None:
        local = embedded_path(known)
        if local is not None:
            return local
        if known.package is None:
            return _hub_config(known.hub_id)
    elif "/" in text and text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return _hub_config(text)
    return resolve(text)  # a known wheel not installed, or an unknown name: resolve's message


def _hub_config(hub_id: str) -> Path:
    """Fetch only config.json of a hub repository (no weights)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ModelError(
            f"{hub_id}: reading its config needs `pip install huggingface_hub`"
        ) from None
    try:
        return Path(hf_hub_download(hub_id, "config.json"))
    except Exception as e:  # offline, unknown or gated repository: one line with the cause
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"{hub_id}: cannot fetch config.json from the hub ({reason[:160]})"
        ) from None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _mapped(hf: dict, path: Path) -> ModelConfig:
    """from_hf_config, with a missing or mistyped field named along with the file."""
    try:
        return from_hf_config(hf)
    except KeyError as e:
        raise ModelError(f"{path}: lacks {e.args[0]!r}, which this architecture needs") from None
    except (TypeError, ValueError) as e:
        raise ModelError(f"{path}: unusable value ({e})") from None
    except TunelabError as e:
        raise ModelError(f"{path}: {e}") from None


def _gguf_weights(path: Path) -> dict:
    """Tensor sizes and types from a GGUF tensor table (memory-mapped; data is not read)."""
    from tunelab.model.gguf import _open

    reader = _open(path)
    by_dtype: dict[str, dict] = {}
    largest = dict(name=None, params=0, bytes=0)
    for t in reader.tensors:
        _add(by_dtype, largest, t.name, t.tensor_type.name, int(t.n_elements), int(t.n_bytes))
    return _summary(by_dtype, largest, [path])


def _add(by_dtype: dict, largest: dict, name: str, dtype: str, params: int, size: int) -> None:
    row = by_dtype.setdefault(dtype, dict(params=0, bytes=0))
    row["params"] += params
    row["bytes"] += size
    if params > largest["params"]:
        largest.update(name=name, params=params, bytes=size)


def _summary(by_dtype: dict, largest: dict, files: list[Path]) -> dict:
    return dict(
        total_bytes=sum(r["bytes"] for r in by_dtype.values()),
        params=sum(r["params"] for r in by_dtype.values()),
        by_dtype=by_dtype,
        largest=largest,
        files=[str(f) for f in files],
    )


def bytes_per_param(weights: dict) -> float:
    """Average stored bytes per parameter (e.g. 2.0 for a bf16 checkpoint)."""
    return weights["total_bytes"] / max(weights["params"], 1)


def param_count(source: str | Path) -> int:
    """Parameters of the model `source` names, counted on the meta device from its config."""
    import torch

    from tunelab.model.heads import build_model

    with torch.device("meta"):
        return sum(p.numel() for p in build_model(read_config(source)).parameters())
