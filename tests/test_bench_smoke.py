"""Every benchmark script's --smoke mode (tiny random models, 2 steps), so bench/ cannot rot.

One subprocess runs them all (`python bench/run_all.py --smoke`): torch, transformers and TRL
are imported once. The figures mean nothing; the checks are that each script runs end to end,
that the reference runs were given the settings the tables claim, and that both frameworks saw
the same tokens.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_output() -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run_all.py"), "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    return out


def test_every_bench_script_smokes(smoke_output):
    names = [
        "gemm",
        "tokenizer",
        "generate",
        "train",
        "dpo",
        "classify",
        "checkpointing",
        "scratch",
    ]
    for name in names:
        assert f"=== smoke {name}: ok" in smoke_output, name
    assert f"smoke: {len(names)} of {len(names)} ok" in smoke_output


def test_reference_runs_state_what_they_ran(smoke_output):
    # like for like: TRL without gradient checkpointing, precision set; and TRL as it ships
    assert "same work (gradient_checkpointing=False, bf16=False, fp16=False)" in smoke_output
    assert "as its defaults ship (gradient_checkpointing=True, bf16=True" in smoke_output
    assert "precompute_ref_log_probs=True" in smoke_output  # DPO: precomputed on both sides
    assert "(identical real tokens per batch)" in smoke_output  # SFT and MiniLM, same batches
    assert "(identical per batch in every row)" in smoke_output  # DPO
    assert "training peak RSS (MiB)" in smoke_output  # MiniLM memory against HF Trainer


def test_sections_describe_their_sitting(smoke_output):
    assert "Load average" in smoke_output and "torch threads" in smoke_output
    assert "; git " in smoke_output
