"""The training loop on tiny random models: accumulation, NaN stop, learning, schedules."""

import copy
import json
import math

import pytest
import torch
from batches import ListBatches  # noqa: I001 - tests/ is on sys.path

from tunelab.data.batching import Batches
from tunelab.model.config import ModelConfig
from tunelab.model.heads import CausalLM
from tunelab.train.config import TrainConfig
from tunelab.train.loop import Trainer, TrainingError
from tunelab.train.objectives import causal_lm
from tunelab.train.schedule import lr_factor


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        family="llama", vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64
    )
    return CausalLM(cfg)


def examples(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(1, 50, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def run(tmp_path, model, data, steps=1, **train):
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1, warmup_steps=0, schedule="constant", **train)
    trainer = Trainer(model, causal_lm, data, cfg, tmp_path, total_steps=steps)
    return trainer, trainer.fit()


def test_accumulation_equals_one_big_batch(tmp_path):
    data = examples()  # different lengths, so averaging per micro-batch would differ
    a, b = tiny_model().double(), tiny_model().double()  # float64: Adam amplifies rounding
    run(tmp_path / "a", a, ListBatches(data, 8), batch_size=8, grad_accum=1)
    run(tmp_path / "b", b, ListBatches(data, 2), batch_size=2, grad_accum=4)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert (pa - pb).abs().max() < 1e-6, name
    start = tiny_model().double()
    assert any((p - q).abs().max() > 1e-4 for p, q in zip(a.parameters(), start.parameters()))


def test_loss_falls_on_memorisable_data(tmp_path):
    data = examples(4)
    trainer, summary = run(
        tmp_path, tiny_model(), ListBatches(data, 4), steps=60, batch_size=4, log_every=1
    )
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert losses[-1] < 0.3 * losses[0]
    assert summary["steps"] == 60 and summary["tokens"] == 60 * sum(len(x) for x in data)
    assert summary["trainable_params"] == summary["total_params"] > 0


def test_nan_loss_stops_with_step_and_checkpoint(tmp_path):
    model = tiny_model()
    data = ListBatches(examples(), 2)
    cfg = TrainConfig(lr=1e-3, save_every=1, warmup_steps=0)
    trainer = Trainer(model, causal_lm, data, cfg, tmp_path, total_steps=5)
    trainer.save_checkpoint()
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"step 1; last good checkpoint: .*step-0"):
        trainer.fit()


def test_schedule_shapes():
    assert lr_factor(0, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 100, 10, "linear", 0.0) == pytest.approx(0.5)
    mid = lr_factor(55, 100, 10, "cosine", 0.0)
    assert mid == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_frozen_parameters_stay_put(tmp_path):
    model = tiny_model()
    for p in model.transformer.layers[0].parameters():
        p.requires_grad_(False)
    before = copy.deepcopy(model.transformer.layers[0].state_dict())
    _, summary = run(tmp_path, model, ListBatches(examples(), 4), steps=3, batch_size=4)
    for k, v in model.transformer.layers[0].state_dict().items():
        assert torch.equal(v, before[k]), k
    assert summary["trainable_params"] < summary["total_params"]


def test_early_stopping_stops_when_validation_stalls(tmp_path):
    data = examples(4)
    cfg = TrainConfig(lr=0.0, warmup_steps=0, schedule="constant", eval_every=1, early_stopping=2)
    trainer = Trainer(
        tiny_model(),
        causal_lm,
        ListBatches(data, 4),
        cfg,
        tmp_path,
        total_steps=20,
        val_batches=ListBatches(data, 4),
    )
    summary = trainer.fit()  # lr 0: the validation loss never improves after the first eval
    assert summary["stop_reason"] == "early_stopping" and summary["steps"] == 3


def test_capped_evaluation_sees_the_same_batches_each_time(tmp_path):
    val = [{"input_ids": x, "labels": x} for x in examples(12, seed=3)]
    cfg = TrainConfig(lr=0.0, warmup_steps=0, schedule="constant", eval_batches=1)
    trainer = Trainer(
        tiny_model(),
        causal_lm,
        ListBatches(examples(), 4),
        cfg,
        tmp_path,
        total_steps=1,
        val_batches=Batches(val, 4, pad_id=0, shuffle=False),
    )
    first = trainer.evaluate()["val_loss"]
    assert [trainer.evaluate()["val_loss"] for _ in range(3)] == [first] * 3


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no bf16 CPU kernels")
def test_bf16_autocast_trains_close_to_fp32(tmp_path):
    data = examples(4)
    _, a = run(tmp_path / "a", tiny_model(), ListBatches(data, 4), steps=5, batch_size=4)
    _, b = run(
        tmp_path / "b", tiny_model(), ListBatches(data, 4), steps=5, batch_size=4, precision="bf16"
    )
    la = [
        json.loads(x)["loss"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    ]
    lb = [
        json.loads(x)["loss"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    ]
    assert la != lb  # autocast really ran in bf16
    assert all(abs(x - y) < 0.05 * x for x, y in zip(la, lb))


def test_evaluation_discards_a_ranks_filler_batch(tmp_path):
    """Rank 1 of 2 on 5 examples scores 1 and 3, then a filler that must not count."""
    val = [{"input_ids": x, "labels": x} for x in examples(5, seed=4)]
    cfg = TrainConfig(lr=0.0, warmup_steps=0, schedule="constant")

    def loss(batches):
        trainer = Trainer(
            tiny_model(),
            causal_lm,
            ListBatches(examples(), 4),
            cfg,
            tmp_path,
            total_steps=1,
            val_batches=batches,
        )
        return trainer.evaluate()["val_loss"]

    shard = Batches(val, 2, pad_id=0, shuffle=False, rank=1, world_size=2, keep_all=True)
    assert loss(shard) == pytest.approx(loss(Batches([val[1], val[3]], 2, pad_id=0)), rel=1e-6)
