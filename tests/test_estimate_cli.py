"""The `tunelab estimate` command and the check every training command runs before loading:
configs without weights, the settings it names when a run won't fit, recipes and flags."""

import json
import subprocess
import sys

import pytest
from test_estimate import SMALL  # tests/ is on sys.path: the same small config

from tunelab.adapt.estimate import estimate
from tunelab.errors import ConfigError
from tunelab.model.config import ModelConfig

LLAMA_70B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "torch_dtype": "bfloat16",
}
MEASURE_CLI = """
import contextlib, io, json, resource, sys
import tunelab.model.heads as heads
from tunelab.cli import main
built, build = [], heads.build_model
def build_model(*args, **kwargs):  # where each model built for the estimate holds its weights
    model = build(*args, **kwargs)
    built.append(sorted({p.device.type for p in model.state_dict().values()}))
    return model
heads.build_model = build_model
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = io.StringIO()
with contextlib.redirect_stdout(out):
    for method in ("qlora", "full"):
        main(["estimate", "--model", sys.argv[1], "--method", method, "--seq-len", "128",
              "--precision", "bf16", "--json"])
rows = [json.loads(line) for line in out.getvalue().splitlines()]
grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(json.dumps(dict(grew=grew, built=built, rows=rows)))
"""


def test_70b_config_without_weights_is_estimated_on_meta_with_little_memory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))
    out = subprocess.run(
        [sys.executable, "-c", MEASURE_CLI, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # no weight exists: both models were built on the meta device, and memory hardly grew
    assert result["built"] == [["meta"], ["meta"]] and result["grew"] < 2**30, result
    qlora, full = result["rows"]
    assert qlora["model"]["params"] == pytest.approx(70.55e9, rel=0.01)
    # NF4 block linears (~0.52 byte each) and bf16 embedding + head: ~37 GiB
    assert 35 * 2**30 < qlora["memory"]["weights"] < 39 * 2**30
    assert full["memory"]["total"] >= 16 * full["model"]["params"] and not full["fits"]


def test_check_memory_names_the_settings_that_fit(monkeypatch):
    from tunelab.adapt import estimate as est_mod
    from tunelab.adapt import memcheck
    from tunelab.errors import MemoryLimitError
    from tunelab.train.config import TrainConfig

    cfg = ModelConfig(**{**SMALL, "vocab_size": 32000})
    train = TrainConfig(seq_len=256, batch_size=8)
    run = dict(seq_len=256, batch=8)
    needs = {
        k: estimate(cfg, m, **{**run, **kw})["memory"]["total"]
        for k, m, kw in [
            ("full", "full", {}),
            ("qlora", "qlora", {}),
            ("lora", "lora", {}),
            ("bf16", "full", dict(precision="bf16")),
            ("ckpt", "full", dict(activation_checkpointing=True)),
            ("batch", "full", dict(batch=1)),
        ]
    }
    free = max(needs["qlora"], needs["lora"]) + 1
    monkeypatch.setattr(est_mod, "free_memory", lambda device: (free, 64 * 2**30))
    monkeypatch.delenv("TUNELAB_SKIP_MEMORY_CHECK", raising=False)
    with pytest.raises(MemoryLimitError) as info:
        memcheck.check_memory(cfg, "full", {}, train, "cpu")
    message = str(info.value)
    assert "\n" not in message and f"needs ~{needs['full'] / 2**30:.1f} GiB" in message
    expected = ["--method qlora", "--method lora"] + [
        flag
        for key, flag in [
            ("bf16", "--precision bf16"),
            ("ckpt", "--activation-checkpointing"),
            ("batch", "--batch-size 1"),
        ]
        if needs[key] <= free
    ]
    assert f"try {' or '.join(expected)} (" in message
    monkeypatch.setattr(est_mod, "free_memory", lambda device: (10, 64 * 2**30))
    with pytest.raises(MemoryLimitError, match="even --method qlora --precision bf16"):
        memcheck.check_memory(cfg, "full", {}, train, "cpu")
    monkeypatch.setenv("TUNELAB_SKIP_MEMORY_CHECK", "1")
    assert memcheck.check_memory(cfg, "full", {}, train, "cpu") == {}
    monkeypatch.delenv("TUNELAB_SKIP_MEMORY_CHECK")
    monkeypatch.setattr(est_mod, "free_memory", lambda device: (2**40, 2**40))
    fine = memcheck.check_memory(cfg, "lora", {"r": "16", "targets": "all-linear"}, train, "cpu")
    assert fine["fits"] and fine["options"] == {"r": "16", "targets": "all-linear"}
    with pytest.raises(ConfigError, match="rank"):
        memcheck.check_memory(cfg, "lora", {"rank": 16}, train, "cpu")


def _cli_estimate(capsys, *argv) -> dict:
    from tunelab.cli import main

    assert main(["estimate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_estimate_takes_the_training_commands_options_and_recipes(tmp_path, capsys):
    from tunelab.adapt.memcheck import run_settings
    from tunelab.model.inspect import read_config
    from tunelab.train.config import load_config

    small = {**LLAMA_70B, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2}
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**small, "num_attention_heads": 8}))
    recipe = tmp_path / "run.yaml"
    recipe.write_text(
        f"model: {model}\nmethod: {{name: qlora, r: 4, targets: all-linear}}\n"
        "train: {seq_len: 96, batch_size: 3, precision: bf16}\n"
    )
    spelled = ["--method", "qlora", "--method.r", "4", "--method.targets", "all-linear"]
    spelled += ["--seq-len", "96", "--batch-size", "3", "--precision", "bf16"]
    by_recipe = _cli_estimate(capsys, "--config", str(recipe), "--device", "cpu")
    by_flags = _cli_estimate(capsys, "--model", str(model), *spelled)
    older = ["--lora-r", "4", "--lora-targets", "all-linear", "--batch", "3"]
    by_older = _cli_estimate(capsys, "--model", str(model), "--method", "qlora", *older,
                             "--seq-len", "96", "--precision", "bf16")  # fmt: skip
    # what the training command's own check computes for the same recipe
    cfg = load_config(recipe, {"task": "finetune"})
    run = run_settings("qlora", cfg.method, cfg.train, "cpu")
    expected = estimate(read_config(str(model)), **run)
    for got in (by_recipe, by_flags, by_older):
        assert (got["seq_len"], got["batch"], got["method"]) == (96, 3, "qlora")
        assert got["memory"] == json.loads(json.dumps(expected["memory"]))
    # a flag overrides the recipe, as in the training commands
    longer = _cli_estimate(capsys, "--config", str(recipe), "--seq-len", "192")
    assert longer["seq_len"] == 192 and longer["memory"]["total"] > by_recipe["memory"]["total"]


@pytest.mark.parametrize(
    "config, message",
    [
        ("{tmp}", "a folder, not a config file"),
        ("recipes/quickstart.yaml", "a study recipe, not a run's: run it with `tunelab study"),
    ],
)
def test_estimate_and_training_name_a_config_that_is_no_run_recipe(
    tmp_path, capsys, config, message
):
    from pathlib import Path

    from tunelab.cli import main

    path = config.format(tmp=tmp_path)
    if not Path(path).is_absolute():
        path = str(Path(__file__).resolve().parents[1] / path)
    for command in ("estimate", "finetune"):
        assert main([command, "--config", path]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
