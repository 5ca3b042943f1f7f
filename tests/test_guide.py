"""docs/from-scratch.md must keep working: its Python runs, its files exist, its commands parse."""

import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "from-scratch.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
# Repository paths the prose points at, e.g. `src/tunelab/train/loop.py` or bench/scratch.py.
PATH = re.compile(r"\b(?:src|tests|bench|docs|recipes)/[\w./-]*\w")

# What the guide walks through: each file and the names in it that the guide explains.
# A rename in src/ then fails here instead of leaving the guide pointing at nothing.
POINTERS = {
    "src/tunelab/tokenizer/bpe.py": ["BPETokenizer", "GPT2_SPLIT"],
    "src/tunelab/model/config.py": ["ModelConfig", "PRESETS", "preset"],
    "src/tunelab/model/transformer.py": ["Transformer", "Attention", "MLP", "Block", "KVCache"],
    "src/tunelab/model/heads.py": ["CausalLM", "build_model"],
    "src/tunelab/train/objectives.py": ["causal_lm"],
    "src/tunelab/train/loop.py": ["Trainer"],
    "src/tunelab/train/run.py": ["init_weights", "run_training"],
    "src/tunelab/data/batching.py": ["pack", "Batches"],
    "src/tunelab/generate.py": ["generate_ids", "Sampling", "next_token_scores", "pick"],
}


def blocks(kind: str) -> list[tuple[int, str]]:
    """(first line number, code) of each fenced block of this language, in order."""
    text = GUIDE.read_text(encoding="utf-8")
    found = []
    for m in FENCE.finditer(text):
        if m.group(1) == kind:
            found.append((text.count("\n", 0, m.start(2)) + 1, m.group(2)))
    return found


def test_guide_python_runs_in_order(tmp_path, monkeypatch):
    # The guide writes tok/, corpus/ and runs/ where it stands, and the encode cache follows
    # $TUNELAB_CACHE: both stay inside tmp_path.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    snippets = blocks("python")
    assert len(snippets) >= 8, "the guide lost its code"
    namespace: dict = {"__name__": "__guide__"}
    for line, code in snippets:
        # Padding with blank lines makes tracebacks name the guide's own line numbers.
        exec(compile("\n" * (line - 1) + code, str(GUIDE), "exec"), namespace)


def test_guide_points_at_files_and_names_that_exist():
    text = GUIDE.read_text(encoding="utf-8")
    mentioned = set(PATH.findall(text))
    missing = sorted(p for p in mentioned if not (ROOT / p).exists())
    assert not missing, f"the guide points at paths that do not exist: {missing}"
    for path, names in POINTERS.items():
        assert path in mentioned, f"the guide no longer mentions {path}"
        module = importlib.import_module(
            path.removeprefix("src/").removesuffix(".py").replace("/", ".")
        )
        for name in names:
            assert f"`{name}" in text, f"the guide no longer explains {name} ({path})"
            assert hasattr(module, name), f"{path} has no {name}, but the guide says it does"


def test_guide_commands_parse():
    from tunelab.cli import build_parser

    commands = []
    for _, code in blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("tunelab "):
                commands.append(shlex.split(line)[1:])
    assert any(c[:2] == ["tokenizer", "train"] for c in commands)
    assert any(c[0] == "pretrain" and "--arch" in c for c in commands)
    for argv in commands:
        try:
            build_parser().parse_args(argv)  # strict: a flag the CLI lost fails here
        except SystemExit:
            pytest.fail(f"`tunelab {shlex.join(argv)}` in the guide no longer parses")
