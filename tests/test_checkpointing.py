"""Activation checkpointing (train.activation_checkpointing): the same losses, gradients and
random stream as without it, for every method and batch layout, with less saved by autograd."""

import importlib.util
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from saved import saved_bytes  # tests/ is on sys.path
from tiny import make_models, review

from tunelab.adapt.freeze import freeze
from tunelab.adapt.lora import apply_lora, lora_method
from tunelab.cli import main
from tunelab.model import transformer
from tunelab.model.config import ModelConfig
from tunelab.model.heads import CausalLM, SequenceClassifier
from tunelab.train.objectives import causal_lm
from tunelab.train.run import set_dropout

SMALL = dict(vocab_size=64, n_layer=3, n_head=4, n_kv_head=2, d_model=32, d_ff=64)
ROOT = Path(__file__).resolve().parents[1]


def make_model(method: str, dropout: float = 0.1):
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(**SMALL))
    if method == "lora":
        apply_lora(model, r=4, targets="all-linear", dropout=dropout)
    elif method == "qlora":
        lora_method(model, {"r": 4, "targets": "all-linear"}, quantized=True)
    elif method == "freeze":
        freeze(model, "top:1")
    set_dropout(model, dropout)
    return model.train()


def make_batch(layout: str) -> dict:
    """padded: rows of 12, 5 and 1 real tokens (the Packed path); packed: documents side by
    side in full rows (segment_ids, positions restarting per document)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, SMALL["vocab_size"], (3, 12), generator=gen)
    if layout == "padded":
        mask = torch.zeros(3, 12, dtype=torch.long)
        for i, n in enumerate((12, 5, 1)):
            mask[i, :n] = 1
        return {
            "input_ids": ids,
            "labels": ids.masked_fill(mask == 0, -100),
            "attention_mask": mask,
        }
    cuts = ((5, 7), (12,), (1, 3, 8))
    segments = torch.tensor([[s for s, n in enumerate(row) for _ in range(n)] for row in cuts])
    positions = torch.tensor([[p for n in row for p in range(n)] for row in cuts])
    return {
        "input_ids": ids,
        "labels": ids.clone(),
        "segment_ids": segments,
        "position_ids": positions,
        "attention_mask": torch.ones_like(ids),
    }


def loss_and_grads(model, batch, checkpointing: bool):
    model.transformer.checkpoint_blocks = checkpointing
    torch.manual_seed(7)  # dropout masks from the same stream
    model.zero_grad(set_to_none=True)
    loss, _, _ = causal_lm(model, batch)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, torch.rand(4)  # the stream as the next step finds it


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("method", ["full", "lora", "qlora", "freeze"])
def test_same_loss_gradients_and_random_stream(method, layout):
    model, batch = make_model(method), make_batch(layout)
    loss, grads, after = loss_and_grads(model, batch, checkpointing=False)
    loss_c, grads_c, after_c = loss_and_grads(model, batch, checkpointing=True)
    assert grads and grads.keys() == grads_c.keys()
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)
    torch.testing.assert_close(after_c, after, rtol=0, atol=0)
    model.transformer.checkpoint_blocks = False  # dropout really draws: another seed differs
    torch.manual_seed(8)
    assert not torch.equal(causal_lm(model, batch)[0].detach(), loss)


def test_classifier_reading_one_position_per_row():
    """The last block computes the pooled positions alone (keep), after the Packed blocks."""
    torch.manual_seed(0)
    model = SequenceClassifier(ModelConfig(**SMALL, labels=["a", "b"])).train()
    set_dropout(model, 0.1)
    batch = make_batch("padded")
    results = []
    for on in (False, True):
        model.transformer.checkpoint_blocks = on
        model.zero_grad()
        torch.manual_seed(7)
        logits = model(batch["input_ids"], batch["attention_mask"])
        logits.square().sum().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_saved_activations_drop_and_evaluation_is_untouched():
    torch.manual_seed(0)
    cfg = ModelConfig(**{**SMALL, "n_layer": 6, "vocab_size": 32})
    model = CausalLM(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 64))
    batch = {"input_ids": ids, "labels": ids}
    plain = saved_bytes(model, lambda: causal_lm(model, batch))
    model.transformer.checkpoint_blocks = True
    # What is left: the head's input and logits, the final norm's; each block keeps only its
    # input (held by the checkpoint, not saved through autograd's hooks).
    assert saved_bytes(model, lambda: causal_lm(model, batch)) < 0.2 * plain
    assert (
        saved_bytes(model.eval(), lambda: causal_lm(model, batch)) == plain
    )  # evaluation never checkpoints


def test_run_records_the_option_and_trains_as_without_it(tmp_path, monkeypatch):
    """Through the CLI with dropout and packed documents: the switch lands in config.yaml, the
    final weights equal a run without it, and so do those of a run resumed at step 2 of 4."""
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    paths = make_models(tmp_path)
    rng = random.Random(0)
    (tmp_path / "corpus.txt").write_text("\n\n".join(review(rng, i % 2) for i in range(60)))
    common = [
        "pretrain",
        "--model",
        str(paths["decoder"]),
        "--data",
        str(tmp_path / "corpus.txt"),
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--max-steps",
        "4",
        "--save-every",
        "2",
        "--train.dropout",
        "0.1",
        "--data.pack",
        "true",
        "--lr",
        "1e-3",
    ]
    calls = []  # blocks run through torch.utils.checkpoint, counted
    real = transformer.checkpoint
    monkeypatch.setattr(transformer, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert not calls
    assert main([*common, "--out", str(tmp_path / "ckpt"), "--activation-checkpointing"]) == 0
    assert len(calls) == 4 * 2  # steps x blocks (no evaluation in between)

    def recorded(run: str):
        config = yaml.safe_load((tmp_path / run / "config.yaml").read_text())
        return config["train"]["activation_checkpointing"]

    assert recorded("ckpt") is True and recorded("plain") is False
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "ckpt" / "config.yaml", resumed / "config.yaml")
    shutil.copytree(
        tmp_path / "ckpt" / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2"
    )
    assert main(["pretrain", "--resume", str(resumed)]) == 0
    assert len(calls) == 6 * 2 and recorded("resumed") is True
    want = load_file(str(tmp_path / "plain" / "final" / "model.safetensors"))
    for run in ("ckpt", "resumed"):
        got = load_file(str(tmp_path / run / "final" / "model.safetensors"))
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=f"{run} {k}")


def test_benchmark_smoke_mode_runs(capsys, monkeypatch):
    """bench/checkpointing.py --smoke (a tiny random model, 2 steps each way), so it cannot rot."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(
        "bench_checkpointing", ROOT / "bench" / "checkpointing.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--smoke"])
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["checkpointing"] for r in rows] == [False, True]
    assert rows[0]["losses"] == rows[1]["losses"] and len(rows[0]["losses"]) == 2
    assert all(r["peak_rss_mb"] > 0 and r["s_per_step"] > 0 for r in rows)
