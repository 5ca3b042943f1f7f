"""Freezing by layers/patterns and gradual unfreezing on tiny models, resume included."""

import pytest
import torch
from test_loop import ListBatches, examples, run, tiny_model

from tunelab.adapt import apply_method
from tunelab.adapt.freeze import GradualUnfreezing, freeze, parse_layers
from tunelab.errors import ConfigError
from tunelab.model.config import ModelConfig
from tunelab.model.heads import CausalLM
from tunelab.train.checkpoints import latest_checkpoint
from tunelab.train.config import TrainConfig
from tunelab.train.loop import Trainer
from tunelab.train.objectives import causal_lm
from tunelab.train.schedule import lr_factor


def snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def trainable(model) -> set:
    return {n for n, p in model.named_parameters() if p.requires_grad}


class Recorder:
    """Snapshots the weights before each step, and the learning rate of every group."""

    def __init__(self):
        self.weights, self.lrs = {}, {}

    def on_start(self, trainer):
        pass

    def on_step(self, trainer, step):
        self.weights[step] = snapshot(trainer.model)
        self.lrs[step] = [g["lr"] for g in trainer.optimizer.param_groups]

    def on_resume(self, trainer, step):
        pass

    def on_optimizer(self, trainer):
        pass


def test_parse_layers_forms():
    assert parse_layers("top:2", 6) == [4, 5]
    assert parse_layers("bottom:1", 6) == [0]
    assert parse_layers("0-2,5", 6) == [0, 1, 2, 5]
    assert parse_layers([1, "3"], 6) == [1, 3]
    assert parse_layers(4, 6) == [4]
    assert parse_layers("all", 3) == [0, 1, 2]
    assert parse_layers("none", 3) == parse_layers(None, 3) == []
    assert parse_layers("top:9", 3) == [0, 1, 2]


@pytest.mark.parametrize("spec", ["top2", "3-1", "0-9", "x", "top:-1", "-1", [0.5], True, 1.5])
def test_bad_layer_specs_name_the_value_and_forms(spec):
    with pytest.raises(ConfigError, match=r"train_layers=.*expected 'all', 'none', 'top:K'"):
        freeze(tiny_model(), train_layers=spec)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match=r"match no parameter name"):
        freeze(tiny_model(), patterns="*.q_prj.*")
    with pytest.raises(ConfigError, match=r"did you mean 'train_layers'"):
        apply_method(tiny_model(), {"name": "freeze", "train_layer": "top:1"})
    with pytest.raises(ConfigError, match=r"cannot be combined"):
        apply_method(tiny_model(), {"name": "freeze", "every_steps": 2, "train_layers": "0"})
    with pytest.raises(ConfigError, match=r"exactly one"):
        GradualUnfreezing()
    with pytest.raises(ConfigError, match=r"lr_decay"):
        GradualUnfreezing(every_steps=1, lr_decay=2.0)
    with pytest.raises(ConfigError, match=r"did you mean 'top'"):
        GradualUnfreezing(every_steps=1, start="tops")


def test_freeze_selects_blocks_patterns_head_and_norm():
    model = freeze(tiny_model(), train_layers="0", patterns=["*.layers.1.*.q_proj.*"])
    assert trainable(model) == {
        *(n for n, _ in model.named_parameters() if n.startswith("transformer.layers.0.")),
        "transformer.layers.1.attn.q_proj.weight",
        "transformer.norm.weight",
        "lm_head.weight",
    }
    model = freeze(tiny_model(), "none", train_head=False, train_norm=False, train_embeddings=True)
    assert trainable(model) == {"transformer.tok_embed.weight"}


def test_tied_head_trains_with_the_embeddings_when_either_asks(caplog):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, n_layer=2, n_head=4, d_model=32, d_ff=64, tie_embeddings=True)
    model = freeze(CausalLM(cfg), "none", train_norm=False)  # head yes, embeddings no
    assert trainable(model) == {"transformer.tok_embed.weight"}
    assert "share one tensor" in caplog.text
    model = freeze(CausalLM(cfg), "none", train_head=False, train_norm=False)
    assert trainable(model) == set()


def test_frozen_weights_stay_bit_identical_and_chosen_ones_change(tmp_path):
    model = tiny_model()
    assert apply_method(model, {"name": "freeze", "train_layers": "top:1"}) == []
    before = snapshot(model)
    run(tmp_path, model, ListBatches(examples(), 4), steps=3, batch_size=4)
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == name.startswith(("transformer.layers.1.", "transformer.norm", "lm_head"))


def test_gradual_unfreezing_keeps_blocks_bit_identical_until_their_step(tmp_path):
    model, rec = tiny_model(), Recorder()
    [gradual] = apply_method(model, {"name": "freeze", "every_steps": 2, "lr_decay": 0.5})
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1, warmup_steps=2, schedule="cosine", batch_size=4)
    trainer = Trainer(
        model, causal_lm, ListBatches(examples(), 4), cfg, tmp_path, 8, callbacks=[gradual, rec]
    )
    start = snapshot(model)
    trainer.fit()
    rec.weights[8] = snapshot(model)
    # Block 1 trains from step 2 (0-based), block 0 from step 4, the embeddings from step 6.
    for prefix, first in [
        ("lm_head", 0),
        ("transformer.layers.1.", 2),
        ("transformer.layers.0.", 4),
        ("transformer.tok_embed", 6),
    ]:
        names = [n for n in start if n.startswith(prefix)]
        for step in range(9):
            same = all(torch.equal(rec.weights[step][n], start[n]) for n in names)
            assert same == (step <= first), (prefix, step)
    # Two groups per stage (decayed matrices, undecayed vectors); the embeddings have no vector.
    factors = [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.25]
    groups = trainer.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] * 3 + [0.1]
    assert [g["initial_lr"] for g in groups] == pytest.approx([1e-2 * f for f in factors])
    for step in range(8):  # the schedule scales every group, unfrozen or not yet
        expected = [1e-2 * f * lr_factor(step, 8, 2, "cosine", 0.1) for f in factors]
        assert rec.lrs[step] == pytest.approx(expected), step


def test_gradual_unfreezing_start_top_and_epochs(tmp_path):
    model = tiny_model()
    gradual = GradualUnfreezing(every_epochs=1, start="top", embeddings=False)

    class Sized(ListBatches):
        def __len__(self):
            return 2

    cfg = TrainConfig(lr=1e-2, batch_size=4, warmup_steps=0)
    trainer = Trainer(
        model, causal_lm, Sized(examples(8), 4), cfg, tmp_path, 4, callbacks=[gradual]
    )
    assert gradual.every == 2 and len(gradual.stages) == 2
    assert trainable(model) == {
        n
        for n, _ in model.named_parameters()
        if not n.startswith(("transformer.layers.0.", "transformer.tok"))
    }
    trainer.fit()
    assert "transformer.tok_embed.weight" not in trainable(model)
    assert "transformer.layers.0.attn.q_proj.weight" in trainable(model)


@pytest.mark.parametrize("every, kill_at", [(2, 5), (2, 7), (3, 5)])
def test_gradual_unfreezing_resumes_bit_identical(tmp_path, every, kill_at):
    """Checkpoints right before an unfreeze step (every=2) and in the middle of a stage."""
    cfg = TrainConfig(
        lr=1e-2,
        weight_decay=0.1,
        warmup_steps=2,
        schedule="cosine",
        batch_size=2,
        save_every=2,
        keep_checkpoints=8,
    )
    options = {"name": "freeze", "every_steps": every, "lr_decay": 0.7}

    def trainer(run_dir, extra=()):
        model = tiny_model()
        callbacks = apply_method(model, options)
        data = ListBatches(examples(), 2)
        return Trainer(model, causal_lm, data, cfg, run_dir, 10, callbacks=[*callbacks, *extra])

    straight = trainer(tmp_path / "straight")
    straight.fit()

    class Kill(Recorder):
        def on_step(self, trainer, step):
            if step == kill_at:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path / "killed", [Kill()]).fit()
    resumed = trainer(tmp_path / "killed")
    checkpoint = latest_checkpoint(tmp_path / "killed")
    assert checkpoint.name == f"step-{kill_at - 1}"
    resumed.load_checkpoint(checkpoint)
    resumed.fit()
    a, b = snapshot(straight.model), snapshot(resumed.model)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    sa, sb = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        assert all(torch.equal(sa["state"][k][x], sb["state"][k][x]) for x in sa["state"][k])


def test_not_yet_unfrozen_blocks_have_no_optimizer_state(tmp_path):
    model = tiny_model()
    callbacks = apply_method(model, {"name": "freeze", "every_steps": 100})
    cfg = TrainConfig(lr=1e-2, batch_size=2, warmup_steps=0, weight_decay=0.1)
    trainer = Trainer(
        model, causal_lm, ListBatches(examples(), 2), cfg, tmp_path, 3, callbacks=callbacks
    )
    before = snapshot(model)
    trainer.fit()
    with_state = {n for n, p in model.named_parameters() if p in trainer.optimizer.state}
    assert with_state == trainable(model) == {"transformer.norm.weight", "lm_head.weight"}
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(before)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == (name not in with_state), name
