"""Tests run on oneDNN where it works (runtime.linear onednn), as the runs they check did before
the kernels were measured per machine: no test measures this machine (a few seconds each time
$TUNELAB_CACHE moves). Tests of `auto` set their own environment."""

import os
from contextlib import contextmanager

import pytest

os.environ.setdefault("TUNELAB_ONEDNN", "1")


@pytest.fixture
def tiny_gguf(tmp_path):
    """A tiny Q8_0 GGUF file with an untied head, and the HF weights it was written from."""
    from gguf import GGMLQuantizationType as Q
    from gguf_files import write_tiny

    path = tmp_path / "tiny-q8.gguf"
    return path, write_tiny(path, Q.Q8_0, tied=False)


@contextmanager
def cache_in(root):
    """$TUNELAB_CACHE inside root while a module's fixture lives, restored after."""
    saved = os.environ.get("TUNELAB_CACHE")
    os.environ["TUNELAB_CACHE"] = str(root / "cache")
    try:
        yield root
    finally:
        if saved is None:
            os.environ.pop("TUNELAB_CACHE")
        else:
            os.environ["TUNELAB_CACHE"] = saved


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    """A folder with a tiny tokenizer, base model and preference pairs (tests/tiny_prefs.py),
    with the encoding cache inside it."""
    from tiny_prefs import write_preference_setup

    with cache_in(tmp_path_factory.mktemp("dpo")) as root:
        write_preference_setup(root)
        yield root


@pytest.fixture(scope="module")
def icl_setup(tmp_path_factory):
    """A tiny tokenizer and decoder, 24 demonstration reviews (train.jsonl) and 8 to score
    (test.jsonl), with the encoding cache inside the folder (test_icl*.py)."""
    from tiny import make_models, write_reviews

    with cache_in(tmp_path_factory.mktemp("icl")) as root:
        make_models(root)
        write_reviews(root / "train.jsonl", 24, 1)
        write_reviews(root / "test.jsonl", 8, 2)
        yield root
