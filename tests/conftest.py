"""Tests run on oneDNN where it works (runtime.linear onednn), as the runs they check did before
the kernels were measured per machine: no test measures this machine (a few seconds each time
$TUNELAB_CACHE moves). Tests of `auto` set their own environment."""

import os

import pytest

os.environ.setdefault("TUNELAB_ONEDNN", "1")


@pytest.fixture
def tiny_gguf(tmp_path):
    """A tiny Q8_0 GGUF file with an untied head, and the HF weights it was written from."""
    from gguf import GGMLQuantizationType as Q
    from gguf_files import write_tiny

    path = tmp_path / "tiny-q8.gguf"
    return path, write_tiny(path, Q.Q8_0, tied=False)


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    """A folder with a tiny tokenizer, base model and preference pairs (tests/tiny_prefs.py),
    with the encoding cache inside it."""
    from tiny_prefs import write_preference_setup

    root = tmp_path_factory.mktemp("dpo")
    saved = os.environ.get("TUNELAB_CACHE")
    os.environ["TUNELAB_CACHE"] = str(root / "cache")
    write_preference_setup(root)
    yield root
    if saved is None:
        os.environ.pop("TUNELAB_CACHE")
    else:
        os.environ["TUNELAB_CACHE"] = saved
