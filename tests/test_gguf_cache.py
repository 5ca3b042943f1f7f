"""The GGUF conversion cache: reused without reading the file again, keyed by the file,
never left half written, and loadable by transformers."""

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf_files import KV_HEADS, forbid_conversion, vocab, write_tiny  # noqa: I001

from tunelab.model.gguf import gguf_to_hf_dir, read_gguf


def test_cache_is_reused_and_complete(tiny_gguf, tmp_path: Path, monkeypatch) -> None:
    path, originals = tiny_gguf
    first = gguf_to_hf_dir(path, cache_root=tmp_path / "cache")
    assert first.parent == tmp_path / "cache" / "gguf"
    names = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert {p.name for p in first.iterdir()} == names
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp dir left behind
    assert json.loads((first / "config.json").read_text())["num_key_value_heads"] == KV_HEADS
    with monkeypatch.context() as patch:
        calls = forbid_conversion(patch)
        second = gguf_to_hf_dir(str(path), cache_root=str(tmp_path / "cache"))
    assert second == first and calls == []

    from safetensors.torch import load_file

    saved = load_file(first / "model.safetensors")
    assert set(saved) == set(originals)
    assert torch.equal(
        saved["model.layers.1.self_attn.k_proj.weight"],
        read_gguf(path).tensors["model.layers.1.self_attn.k_proj.weight"],
    )


def test_cache_key_follows_file_changes_and_env(tiny_gguf, tmp_path, monkeypatch) -> None:
    path, _ = tiny_gguf
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "env-cache"))
    before = gguf_to_hf_dir(path)
    assert before.is_relative_to(tmp_path / "env-cache")
    write_tiny(path, Q.F32, tied=True)  # new content, size and mtime
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    after = gguf_to_hf_dir(path)
    assert after != before and after.parent == before.parent
    assert json.loads((after / "config.json").read_text())["tie_word_embeddings"] is True


def test_interrupted_conversion_leaves_no_cache(tiny_gguf, tmp_path, monkeypatch) -> None:
    import tunelab.model.gguf as module

    path, _ = tiny_gguf
    real_write = module._write_hf_dir

    def write_then_die(contents, directory):
        real_write(contents, directory)
        # Until the final rename only a hidden temp dir exists, so a SIGKILL here leaves no cache.
        visible = [p.name for p in directory.parent.iterdir() if not p.name.startswith(".")]
        assert visible == [] and directory.name.startswith(".")
        raise KeyboardInterrupt  # as if killed after the files were written but before the rename

    monkeypatch.setattr(module, "_write_hf_dir", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        gguf_to_hf_dir(path, cache_root=tmp_path / "cache")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []
    monkeypatch.setattr(module, "_write_hf_dir", real_write)
    done = gguf_to_hf_dir(path, cache_root=tmp_path / "cache")
    assert (done / "model.safetensors").is_file()


def test_stale_temp_dirs_are_removed_but_fresh_ones_kept(tiny_gguf, tmp_path) -> None:
    path, _ = tiny_gguf
    target = gguf_to_hf_dir(path, cache_root=tmp_path / "cache")
    shutil.rmtree(target)
    stale, fresh = (target.parent / f".{target.name}.{tag}" for tag in ("killed", "running"))
    stale.mkdir()
    fresh.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert gguf_to_hf_dir(path, cache_root=tmp_path / "cache") == target
    assert not stale.exists() and fresh.exists() and (target / "config.json").is_file()


def test_cached_tiny_dir_loads_in_transformers(tiny_gguf, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    path, _ = tiny_gguf
    directory = gguf_to_hf_dir(path, cache_root=tmp_path / "cache")
    ours = transformers.AutoModelForCausalLM.from_pretrained(directory)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    ids = transformers.AutoTokenizer.from_pretrained(directory)(
        "the then x 12", return_tensors="pt"
    )
    with torch.no_grad():
        a, b = ours(**ids).logits, reference(**ids).logits
    assert a.shape == (1, ids.input_ids.shape[1], len(vocab()[0]))
    assert torch.allclose(a, b, atol=1e-5)
