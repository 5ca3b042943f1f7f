"""Imports run downhill only: no module under src/tunelab imports from a higher layer.

The layers, lowest first, are in LAYERS (docs/architecture.md says why each sits where it does).
Every `tunelab...` import counts, module-level and inside functions alike. Same-layer imports
are allowed. Known exceptions are in ALLOWED, each with its reason; a new one fails the test.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tunelab"

# Rank of each top-level name under tunelab (a package or a module); higher may import lower.
LAYERS = {
    "errors": 0,
    "paths": 0,  # output-path checks shared by model, train and cli
    "files": 0,  # atomic writes and YAML reading, for every layer
    "tokenizer": 1,
    "hub": 1,
    # runtime/ prepares a built model's linears (FastLinear) and picks the attention backend
    # from model/varlen.py; generate uses its decode kernels. It sits beside model and generate;
    # model never imports it (the model is prepared from outside, like a method).
    "data": 2,
    "model": 2,
    "generate": 2,
    "runtime": 2,
    "allocator": 2,  # shim re-exporting runtime.allocator for the bench scripts
    "kernels": 2,  # shim re-exporting runtime.kernels for the bench scripts
    "demo": 2,  # writes demo data; imports nothing of tunelab
    "instructions": 2,  # IFEval's checkers: pure functions of text, scored by evaluate/
    "image": 3,  # text-to-image: pipelines, the tiny model, counters, counting (beside evaluate)
    "adapt": 3,
    "evaluate": 3,
    "loading": 3,  # tunelab.load: hub, model, quantization (adapt) and runtime put together
    "train": 4,
    "study": 5,
    "cli": 6,
    "": 7,  # tunelab/__init__.py: the public API, re-exporting tunelab.loading
    "__main__": 8,
}

# (importing file relative to src/tunelab, imported module) -> why it is allowed for now.
ALLOWED: dict[tuple[str, str], str] = {}


def layer_of(module: str) -> str:
    """'tunelab.train.run' -> 'train'; 'tunelab' -> '' (the package's __init__)."""
    parts = module.split(".")
    assert parts[0] == "tunelab", module
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def tunelab_imports(path: Path):
    """(line, imported module) for every tunelab import in the file, at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "tunelab":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] != "tunelab":
                continue
            if name == "tunelab":  # `from tunelab import x`: x may be a subpackage
                for alias in node.names:
                    sub = f"tunelab.{alias.name}"
                    yield node.lineno, sub if alias.name in LAYERS else "tunelab"
            else:
                yield node.lineno, name


def violations() -> list[tuple[str, int, str, str]]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        own = layer_of(module_name(path))
        for line, target in tunelab_imports(path):
            other = layer_of(target)
            assert own in LAYERS, f"{rel}: package {own!r} has no layer; add it to LAYERS"
            assert other in LAYERS, f"{rel}:{line}: {target} has no layer; add it to LAYERS"
            if LAYERS[other] > LAYERS[own]:
                found.append((rel, line, target, f"{own or 'tunelab'} -> {other or 'tunelab'}"))
    return found


def test_imports_run_downhill():
    new = [v for v in violations() if (v[0], layer_module(v[2])) not in ALLOWED]
    assert not new, "imports from a higher layer:\n" + "\n".join(
        f"  src/tunelab/{rel}:{line}: imports {target} ({why})" for rel, line, target, why in new
    )


def test_allow_list_has_no_stale_entries():
    """An exception that was fixed leaves the list, so it cannot come back unnoticed."""
    used = {(rel, layer_module(target)) for rel, _, target, _ in violations()}
    stale = sorted(set(ALLOWED) - used)
    assert not stale, f"fixed, remove from ALLOWED: {stale}"


def layer_module(target: str) -> str:
    """The allow-list key for an import: 'tunelab' or 'tunelab.<top-level name>'."""
    return ".".join(target.split(".")[:2])


def test_the_check_sees_function_level_and_upward_imports(tmp_path):
    """The walker finds imports inside functions and resolves relative ones."""
    pkg = tmp_path / "tunelab" / "adapt"
    pkg.mkdir(parents=True)
    (tmp_path / "tunelab" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    f = pkg / "x.py"
    f.write_text("def f():\n    from tunelab.train.optim import g\n    from ..study import s\n")
    global SRC
    saved, SRC = SRC, tmp_path / "tunelab"
    try:
        assert list(tunelab_imports(f)) == [(2, "tunelab.train.optim"), (3, "tunelab.study")]
    finally:
        SRC = saved
