"""tunelab.files: writes that are whole or absent, and YAML errors of one line."""

import os

import pytest

from tunelab.errors import ConfigError
from tunelab.files import atomic_file, atomic_write, read_yaml, temporary_pattern


def test_atomic_write_replaces_whole_with_the_users_umask(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")
    old = os.umask(0o022)
    try:
        atomic_write(path, "new ✓")
        assert path.read_text(encoding="utf-8") == "new ✓"
        assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
        atomic_write(path, b"\x00\x01")
        assert path.read_bytes() == b"\x00\x01"
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("kept")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        assert tmp.parent == tmp_path and tmp.match(temporary_pattern("results.csv"))
        raise RuntimeError("killed")
    assert path.read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_read_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("a: 1\nb: [2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML \(.+\)$") as e:
        read_yaml(path)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such recipe$"):
        read_yaml(tmp_path / "nope.yaml", "recipe")
    path.write_text("a: [1, 2]\n")
    assert read_yaml(path) == {"a": [1, 2]}
