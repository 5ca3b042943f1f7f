"""Never lose a user's files, never mix two runs: output folders, the run lock, study names,
interrupted temporaries, metrics on resume, SIGTERM, file modes."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from tiny import make_models, review

from tunelab.cli import main
from tunelab.errors import ConfigError
from tunelab.paths import slug
from tunelab.study.study import cells
from tunelab.train.rundir import check_run_dir, own_run_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import random

    root = tmp_path_factory.mktemp("reliab")
    saved = os.environ.get("TUNELAB_CACHE")
    os.environ["TUNELAB_CACHE"] = str(root / "cache")
    make_models(root)
    rng = random.Random(0)
    (root / "corpus.txt").write_text("\n\n".join(review(rng, i % 2) for i in range(60)))
    yield root
    if saved is None:
        os.environ.pop("TUNELAB_CACHE")
    else:
        os.environ["TUNELAB_CACHE"] = saved


def run_args(root, out, *extra):
    return [
        "pretrain",
        "--model",
        str(root / "decoder"),
        "--data",
        str(root / "corpus.txt"),
        "--out",
        str(out),
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        *extra,
    ]


def test_export_never_removes_a_users_files(setup, capsys):
    model = str(setup / "decoder")
    mine = setup / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    assert main(["export", "--model", model, "--out", str(mine), "--force"]) == 2
    assert "not a model" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "my notes" and len(list(mine.iterdir())) == 1

    a_file = setup / "a-file"
    a_file.write_text("keep")
    assert main(["merge", "--model", model, "--adapter", str(setup), "--out", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err and a_file.read_text() == "keep"

    out = setup / "exported"
    old = os.umask(0o022)
    try:
        assert main(["export", "--model", model, "--out", str(out)]) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755  # the user's umask, not mkdtemp's 0700
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644
    capsys.readouterr()
    assert main(["export", "--model", model, "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", "--model", model, "--out", str(out), "--force"]) == 0


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".hidden", "a\\b", ""])
def test_study_names_are_slugs(name):
    bad_experiment = {"experiments": [{"name": name or "-", "task": "pretrain"}]}
    with pytest.raises(ConfigError, match="experiment name"):
        cells(bad_experiment)
    bad_run = {"experiments": [{"name": "ok", "task": "pretrain", "runs": [{"name": name or "/"}]}]}
    with pytest.raises(ConfigError, match="run name"):
        cells(bad_run)
    assert cells(
        {"experiments": [{"name": "ok-1.5", "task": "pretrain", "runs": [{"name": "lora_r8+x"}]}]}
    )


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("HuggingFaceTB/SmolLM2-135M", "SmolLM2-135M"),
        ("Qwen/Qwen2.5-0.5B", "Qwen2.5-0.5B"),
        ("/models/tiny.gguf", "tiny.gguf"),
        ("${run:domain/decoder-lora}", "decoder-lora"),
        ("lora_r8+x", "lora-r8-x"),
        ("org/..hidden", "hidden"),
        ("a..b", "a.b"),
        ("a/..", ""),
    ],
)
def test_slug_names_a_folder_that_stays_in_its_parent(text, name):
    assert slug(text) == name
    grid = cells({"experiments": [{"name": "e", "task": "pretrain", "models": [text]}]})
    assert [c["cell"] for c in grid] == ([f"{name}-full"] if name else ["full"])


def test_lock_refuses_a_second_owner_and_never_goes_stale(tmp_path):
    out = tmp_path / "run"
    with own_run_dir(out):
        with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
            check_run_dir(out)
        with pytest.raises(ConfigError, match="in use"):
            with own_run_dir(out):
                pass
    check_run_dir(out)  # released: the pid left in .lock blocks nothing
    with own_run_dir(out):
        pass


def test_resume_cleans_temporaries_truncates_metrics_keeps_val_loss(setup, caplog):
    out = setup / "resumed"
    args = run_args(setup, out, "--max-steps", "6", "--save-every", "2", "--eval-every", "2")
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_val_loss"] is not None
    # A kill at step 5: the last checkpoint is step 4, metrics went on, writes were cut short.
    shutil.rmtree(out / "checkpoints" / "step-6")
    shutil.rmtree(out / "final")
    (out / "summary.json").unlink()
    for leftover in (out / "checkpoints" / ".step-6.x1", out / ".final.x2", out / ".final.old"):
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"\0" * 100)
    with caplog.at_level(logging.INFO, logger="tunelab"):
        assert main(["pretrain", "--resume", str(out)]) == 0
    assert f"from {out / 'checkpoints' / 'step-4'} (step 4)" in caplog.text
    assert not list(out.glob(".final.*")) and not list(out.glob("checkpoints/.step-*"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if r.get("split") == "val"] == [2, 4, 6]
    # A kill while final/ is written: the resumed run's summary keeps final_val_loss.
    shutil.rmtree(out / "final")
    (out / "summary.json").unlink()
    assert main(["pretrain", "--resume", str(out)]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["final_val_loss"] == pytest.approx(summary["final_val_loss"])


def test_two_runs_one_directory_and_sigterm(setup, capsys):
    out = setup / "busy"
    log = setup / "busy.log"
    cmd = [
        sys.executable,
        "-m",
        "tunelab",
        *run_args(setup, out, "--max-steps", "100000", "--save-every", "100000"),
    ]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() and proc.poll() is None:
            assert time.time() < deadline, "the first run never started training"
            time.sleep(0.05)
        assert main(run_args(setup, out, "--max-steps", "1")) == 2
        err = capsys.readouterr().err.strip()
        assert f"pid {proc.pid}" in err and len(err.splitlines()) == 1, err
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    last = log.read_text().strip().splitlines()[-1]
    assert last == f"terminated; resume with: tunelab pretrain --resume {out}", last
    assert not list(out.glob("checkpoints/.step-*"))
