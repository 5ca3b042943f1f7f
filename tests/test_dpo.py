"""Alignment runs: the DPO reference model (precomputed or live, LoRA or full, cached), and
training end to end through the loop and the CLI."""

import json
from pathlib import Path

import pytest
import torch
from tiny_prefs import align_cfg  # noqa: I001 - tests/ is on sys.path

from tunelab.adapt import apply_method
from tunelab.cli import main
from tunelab.data import load_records
from tunelab.data.preference import collate_pairs, pair_logps
from tunelab.model.config import preset
from tunelab.model.heads import build_model
from tunelab.tokenizer.tokenizer import Tokenizer
from tunelab.train.align import AlignTask
from tunelab.train.config import load_config
from tunelab.train.pairs import encode_pairs
from tunelab.train.reference import REFERENCE_FILE, cached_reference, live_reference
from tunelab.train.run import run_training

# ---- the reference model ----------------------------------------------------------------------


def _losses(out):
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and r.get("split") != "val"], rows


@pytest.mark.parametrize("method", ["lora", "full"])
def test_precomputed_and_live_reference_give_the_same_losses(prefs, method):
    over = {"method.name": method, "train.lr": 1e-2 if method == "lora" else 1e-3}
    if method == "lora":
        over["method.r"] = 4
    runs = {}
    for pre in (True, False):
        out = prefs / f"ref-{method}-{pre}"
        task = AlignTask()
        run_training(align_cfg(prefs, out, **over, **{"align.precompute_ref": pre}), task=task)
        runs[pre], rows = _losses(out)
        assert rows[0]["reward_accuracy"] == 0.5  # step 1: every pair a tie, float noise aside
        assert ("precomputed" in task.info["reference"]) == pre
        assert (out / REFERENCE_FILE).exists() == pre
    assert runs[True][0] == pytest.approx(0.6931471805599453, abs=1e-5)  # policy == reference
    assert runs[True] == pytest.approx(runs[False], abs=1e-5)
    assert runs[True][-1] != pytest.approx(runs[True][0], abs=1e-4)  # the policy did move


def test_lora_reference_is_the_merged_sft_model_not_the_base(prefs):
    import tunelab

    sft = prefs / "sft"
    records = [json.loads(x) for x in (prefs / "prefs.jsonl").read_text().splitlines()]
    with open(prefs / "sft.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({"instruction": r["prompt"], "output": r["chosen"]}) + "\n")
    cfg = align_cfg(
        prefs,
        sft,
        **{
            "task": "finetune",
            "data.path": str(prefs / "sft.jsonl"),
            "method.name": "lora",
            "method.r": 4,
            "train.lr": 3e-2,
            "train.max_steps": 10,
            "train.seq_len": 256,
        },
    )
    run_training(cfg)  # writes sft/final: the merged SFT weights
    cfg = align_cfg(
        prefs,
        prefs / "after-sft",
        **{"model": str(sft / "final"), "method.name": "lora", "method.r": 4},
    )
    start = tunelab.load(sft / "final")
    task = AlignTask()
    model = task.prepare(start.model, start.tokenizer, cfg)
    apply_method(model, cfg.method)
    parts = {"train": encode_pairs(load_records(prefs / "prefs.jsonl")[:8], start.tokenizer, cfg)}
    precomputed = cached_reference(model, parts, cfg, 0, prefs / "ref.safetensors")["train"]
    reference, how = live_reference(model)
    assert "LoRA disabled" in how
    with torch.no_grad():  # training moves the adapter; the reference must not move with it
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = collate_pairs(parts["train"], 0)
    sft_model = tunelab.load(sft / "final").model.eval()
    base_model = tunelab.load(prefs / "base").model.eval()
    with torch.no_grad():
        live = torch.stack(reference(batch))
        expected = torch.stack(pair_logps(sft_model, batch))
        base = torch.stack(pair_logps(base_model, batch))
        policy = torch.stack(pair_logps(model.eval(), batch))
    assert torch.allclose(live, expected, atol=1e-4)
    assert torch.allclose(torch.stack(precomputed), expected, atol=1e-4)
    assert (base - expected).abs().max() > 0.1  # the SFT run really changed the model
    assert (policy - expected).abs().max() > 0.1


def test_a_frozen_adapter_is_never_disabled_for_the_reference():
    from tunelab.adapt.lora import apply_lora
    from tunelab.train.reference import only_lora_trains

    model = build_model(preset("llama-tiny", vocab_size=50, n_layer=1, d_model=32, d_ff=64))
    apply_lora(model, r=2)
    assert only_lora_trains(model)
    model.transformer.layers[0].attn.q_proj.lora_A.weight.requires_grad_(
        False
    )  # e.g. a loaded SFT adapter
    assert not only_lora_trains(model)
    assert live_reference(model)[1].startswith("frozen copy")


def test_reference_cache_is_reused_and_keyed(prefs, monkeypatch):
    import tunelab.train.reference as reference

    cfg = align_cfg(prefs, prefs / "unused")
    lm_model = build_model(preset("llama-tiny", vocab_size=300, n_layer=1, d_model=32, d_ff=64))
    parts = {
        "train": encode_pairs(
            load_records(prefs / "prefs.jsonl")[:4], Tokenizer.from_dir(prefs / "tok"), cfg
        )
    }
    path = prefs / "cache-test.safetensors"
    first = cached_reference(lm_model, parts, cfg, 0, path)
    monkeypatch.setattr(reference, "compute_reference", lambda *a: pytest.fail("recomputed"))
    again = cached_reference(lm_model, parts, cfg, 0, path)
    assert torch.equal(first["train"][0], again["train"][0])
    cfg.align.beta = 0.5  # not part of the key: the loss changes, the reference does not
    cached_reference(lm_model, parts, cfg, 0, path)
    cfg.train.seed = 1  # a different start model: recomputed
    with pytest.raises(pytest.fail.Exception):
        cached_reference(lm_model, parts, cfg, 0, path)


# ---- end to end -------------------------------------------------------------------------------


def test_agreement_rises_on_a_learnable_preference(prefs):
    out = prefs / "learn"
    cfg = align_cfg(
        prefs,
        out,
        **{"train.max_steps": 30, "train.lr": 3e-3, "train.eval_every": 10, "align.beta": 0.5},
    )
    summary = run_training(cfg, task=AlignTask())
    acc, margin = summary["preference_accuracy"], summary["reward_margin"]
    assert acc["before"] == 0.5 and margin["before"] == 0.0  # policy == reference: all ties
    assert acc["after"] >= 0.9 and margin["after"] > 0.5
    losses, rows = _losses(out)
    assert losses[-1] < 0.5 * losses[0]
    train = rows[-2] if rows[-1].get("split") == "val" else rows[-1]
    val = [r for r in rows if r.get("split") == "val"]
    assert len(val) == 3
    for key in (
        "reward_accuracy",
        "reward_margin",
        "reward_chosen",
        "reward_rejected",
        "logp_chosen",
        "logp_rejected",
    ):
        assert key in train and f"val_{key}" in val[-1]
    assert val[-1]["val_reward_accuracy"] == pytest.approx(acc["after"])
    assert summary["align"]["loss"] == "dpo" and summary["data"]["kind"] == "preference"


@pytest.mark.parametrize("loss", ["ipo", "hinge"])
def test_cli_align_on_a_tiny_model_dir(prefs, capsys, loss):
    out = prefs / f"cli-{loss}"
    args = [
        "align",
        "--model",
        str(prefs / "base"),
        "--data",
        str(prefs / "prefs.jsonl"),
        "--method",
        "lora",
        "--method.r",
        "4",
        "--loss",
        loss,
        "--beta",
        "0.1",
        "--label-smoothing",
        "0",
        "--precompute-ref",
        "--max-steps",
        "2",
        "--seq-len",
        "64",
        "--out",
        str(out),
        "--train.device",
        "cpu",
        "--json",
    ]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["align"]["loss"] == loss
    assert set(summary["preference_accuracy"]) == {"before", "after"}
    assert set(summary["reward_margin"]) == {"before", "after"}
    assert (out / REFERENCE_FILE).exists() and (out / "adapter" / "adapter_config.json").exists()
    assert main(["align", "--resume", str(out), "--json"]) == 0  # finished: returns the summary


@pytest.mark.parametrize("recipe", ["dpo.yaml", "dpo-hh.yaml"])
def test_recipe_is_a_valid_align_config(recipe):
    cfg = load_config(Path(__file__).resolve().parents[1] / "recipes" / recipe)
    assert cfg.task == "align" and cfg.align.loss in ("dpo", "ipo", "hinge")
