"""GGUF files tunelab cannot read: each a one-line ModelError naming the file."""

import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf_files import assert_one_line_naming, vocab, write_tiny  # noqa: I001

from tunelab.errors import ModelError
from tunelab.model.gguf import gguf_to_hf_dir, read_gguf


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.gguf"
    for call in (read_gguf, gguf_to_hf_dir):
        with pytest.raises(ModelError) as error:
            call(path)
        assert_one_line_naming(error, path)


@pytest.mark.parametrize(
    "content", [b"", b"GG", os.urandom(4096)], ids=["empty", "short", "random"]
)
def test_not_a_gguf_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bogus.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelError) as error:
        read_gguf(path)
    assert "not a GGUF file" in assert_one_line_naming(error, path)


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.3, 0.9, 0.999])
def test_truncated_synthetic_file(tiny_gguf, tmp_path: Path, fraction: float) -> None:
    source, _ = tiny_gguf
    data = source.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: max(8, int(len(data) * fraction))])
    with pytest.raises(ModelError) as error:
        read_gguf(path)
    assert_one_line_naming(error, path)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"arch": "mamba"}, "'mamba' is not supported"),
        ({"tokenizer_model": "llama"}, "tokenizer 'llama' is not supported"),
        ({"extra_tensor": ("blk.0.odd.weight", np.zeros((4, 64), np.float32), None)}, "blk.0.odd"),
        # Q8_1 (32 values in 40 bytes) is a type the gguf package cannot dequantize.
        (
            {"extra_tensor": ("output.weight", np.zeros((len(vocab()[0]), 80), np.uint8), Q.Q8_1)},
            "Q8_1",
        ),
    ],
    ids=["arch", "tokenizer", "unknown-tensor", "quant-type"],
)
def test_unsupported_content(tmp_path: Path, kwargs: dict, needle: str) -> None:
    path = tmp_path / "odd-model.gguf"
    write_tiny(path, **kwargs)
    with pytest.raises(ModelError) as error:
        read_gguf(path)
    assert needle in assert_one_line_naming(error, path)
