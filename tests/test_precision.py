"""--precision is the dtype weights are stored in; trainable ones get fp32 masters; --autocast."""

import json

import pytest
import torch
from tiny import make_models, write_reviews
from torch import nn

from tunelab.adapt.lora import LoRALinear
from tunelab.adapt.quantize import NF4Linear
from tunelab.cli import main
from tunelab.errors import ConfigError
from tunelab.model.checkpoint import save_model_dir
from tunelab.model.config import ModelConfig
from tunelab.model.heads import build_model
from tunelab.train.config import TrainConfig, check_options, compute_precision, load_config
from tunelab.train.optim import fp32_master_weights
from tunelab.train.run import load_for_training


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny decoder stored in bf16 (as real checkpoints are) and some SFT data."""
    root = tmp_path_factory.mktemp("precision")
    paths = make_models(root)
    model = build_model(
        ModelConfig.from_dict(json.loads((paths["decoder"] / "tunelab.json").read_text())["model"])
    )
    torch.manual_seed(1)
    for p in model.parameters():
        nn.init.normal_(p, std=0.05)
    from tunelab.tokenizer.tokenizer import Tokenizer

    save_model_dir(model.to(torch.bfloat16), Tokenizer.from_dir(paths["tok"]), root / "bf16")
    write_reviews(root / "reviews.jsonl", 24, seed=0)
    reviews = [
        json.loads(line)["review"] for line in (root / "reviews.jsonl").read_text().splitlines()
    ]
    (root / "text.txt").write_text("\n\n".join(reviews))
    return root


def _cfg(setup, method: dict, **train):
    overrides = {f"train.{k}": v for k, v in train.items()}
    cfg = load_config(None, {"model": str(setup / "bf16"), "task": "finetune", **overrides})
    cfg.method = method
    return cfg


def test_lora_on_bf16_weights_trains_fp32_adapters(setup):
    from tunelab.adapt import apply_method

    cfg = _cfg(setup, {"name": "lora", "targets": "all-linear"}, precision="bf16")
    model, _ = load_for_training(cfg, torch.device("cpu"))
    apply_method(model, cfg.method)
    assert fp32_master_weights(model) == 2 * 7 * 2  # A and B of 7 linears in 2 blocks
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    assert all(isinstance(m, LoRALinear) for m in [model.transformer.layers[0].attn.q_proj])


def test_qlora_base_is_quantized_as_it_is_read(setup):
    cfg = _cfg(setup, {"name": "qlora", "bits": "nf4"}, precision="bf16")
    model, _ = load_for_training(cfg, torch.device("cpu"))
    blocks = list(model.transformer.layers.modules())
    assert sum(isinstance(m, NF4Linear) for m in blocks) == 2 * 7
    assert not any(type(m) is nn.Linear for m in blocks)
    assert model.transformer.tok_embed.weight.dtype == torch.bfloat16


def test_bf16_weights_train_as_fp32_weights_with_bf16_autocast(setup, tmp_path, capsys):
    """A bf16 checkpoint: --precision bf16 (full fine-tuning upcasts every trainable weight)
    must train exactly as --precision fp32 --autocast bf16 on the same stored values."""
    losses = {}
    for name, extra in (
        ("bf16", ["--precision", "bf16"]),
        ("autocast", ["--precision", "fp32", "--autocast", "bf16"]),
        ("fp32", []),
    ):
        out = tmp_path / name
        args = [
            "pretrain",
            "--model",
            str(setup / "bf16"),
            "--data",
            str(setup / "text.txt"),
            "--out",
            str(out),
            "--max-steps",
            "4",
            "--batch-size",
            "4",
            "--lr",
            "1e-3",
            "--seq-len",
            "32",
            "--json",
            *extra,
        ]
        assert main(args) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        losses[name] = [
            json.loads(x)["loss"]
            for x in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(x)
        ]
        assert summary["precision"]["trainable"] == "fp32"
    assert summary["precision"] == {"weights": "fp32", "trainable": "fp32", "compute": "fp32"}
    assert losses["bf16"] == losses["autocast"]
    assert losses["bf16"] != losses["fp32"]  # bf16 compute really ran


def test_gradual_unfreezing_keeps_later_stages_in_fp32(setup):
    from tunelab.adapt import apply_method

    cfg = _cfg(setup, {"name": "freeze", "every_steps": 2}, precision="bf16")
    model, _ = load_for_training(cfg, torch.device("cpu"))
    callbacks = apply_method(model, cfg.method)
    fp32_master_weights(model, callbacks)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # every stage will train


def test_autocast_and_precision_choices():
    assert compute_precision(TrainConfig(precision="bf16")) == "bf16"
    assert compute_precision(TrainConfig(precision="fp32", autocast="bf16")) == "bf16"
    assert compute_precision(TrainConfig()) == "fp32"
    with pytest.raises(ConfigError, match="autocast off needs precision fp32"):
        compute_precision(TrainConfig(precision="bf16", autocast="off"))
    for key, bad in (("train.precision", "fp64"), ("train.autocast", "yes")):
        with pytest.raises(ConfigError, match=f"'{bad}': expected one of"):
            check_options(load_config(None, {key: bad}))


@pytest.mark.parametrize("amx", [True, False])
def test_precision_auto_takes_bf16_only_where_the_cpu_has_amx(
    setup, tmp_path, capsys, monkeypatch, amx
):
    import yaml

    import tunelab
    from tunelab.runtime import precision

    monkeypatch.setattr(precision, "has_amx", lambda: amx)
    want = "bf16" if amx else "fp32"
    out = tmp_path / "run"
    args = [
        "pretrain",
        "--model",
        str(setup / "bf16"),
        "--data",
        str(setup / "text.txt"),
        "--out",
        str(out),
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--precision",
        "auto",
        "--json",
    ]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["precision"]["weights"] == want
    assert ("AMX (amx_bf16)" if amx else "no AMX") in summary["precision"]["auto"]
    # the run's config holds the dtype chosen, so a resume elsewhere keeps it
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["precision"] == want
    model = tunelab.load(setup / "bf16", precision="auto", runtime=None).model
    assert next(model.parameters()).dtype == (torch.bfloat16 if amx else torch.float32)
