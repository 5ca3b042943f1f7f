"""bench/scale.py --smoke: both sides load and train a scaled-down shape and the section is written
(one shape, LoRA only, a few records: the whole smoke run is the benchmark's own CI)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two fresh processes importing torch, transformers and peft: ~15 s of CPU
def test_scale_smoke_writes_the_model_size_section(tmp_path):
    records = [
        {"instruction": f"Repeat the word number {i}.", "input": "", "output": f"word {i}"}
        for i in range(6)
    ]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n## Training\n\nkept\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "scale.py"),
        "--smoke",
        "--shapes",
        "gemma-2b",
        "--methods",
        "lora",
        "--data",
        str(data),
        "--cache",
        str(tmp_path / "shapes"),
        "--work",
        str(tmp_path),
        "--doc",
        str(doc),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = doc.read_text()
    assert "## Training\n\nkept" in text and "## Model size" in text
    rows = [line for line in text.splitlines() if line.startswith("| gemma-2b | lora |")]
    assert [row.split(" | ")[2] for row in rows] == ["tunelab", "transformers + peft"]
    assert all("exit" not in row and "stopped" not in row for row in rows)
    assert "the same batches (identical tokens per step)" in text
