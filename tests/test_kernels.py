"""oneDNN linear layers (kernels.py) against F.linear: values, gradients, the training context."""

import copy

import pytest
import torch
import torch.nn.functional as F
from batches import ListBatches  # noqa: I001 - tests/ is on sys.path

from tunelab.kernels import _OneDNNLinear, onednn_linears, onednn_works
from tunelab.model.config import ModelConfig
from tunelab.model.heads import CausalLM
from tunelab.train.config import TrainConfig
from tunelab.train.loop import Trainer
from tunelab.train.objectives import causal_lm

pytestmark = pytest.mark.skipif(
    not onednn_works(torch.float32), reason="no oneDNN linear in this torch build"
)


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(family="llama", vocab_size=60, n_layer=2, n_head=4, n_kv_head=2,
                      d_model=32, d_ff=64, qkv_bias=True)  # fmt: skip
    return CausalLM(cfg)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 24), (3, 5, 24), "strided"])
def test_onednn_linear_matches_f_linear_values_and_gradients(bias, shape):
    g = torch.Generator().manual_seed(len(str(shape)) + bias)
    w = torch.randn(40, 24, generator=g, requires_grad=True)
    b = torch.randn(40, generator=g, requires_grad=True) if bias else None
    if shape == "strided":  # a non-contiguous input, as a slice of a bigger activation
        x = torch.randn(6, 48, generator=g)[:, ::2].requires_grad_(True)
    else:
        x = torch.randn(*shape, generator=g, requires_grad=True)
    upstream = torch.randn(*x.shape[:-1], 40, generator=g)
    grads = []
    for fn in (_OneDNNLinear.apply, F.linear):
        y = fn(x, w, b)
        inputs = [x, w] + ([b] if bias else [])
        grads.append((y, *torch.autograd.grad(y, inputs, upstream)))
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_only_the_gradients_asked_for_are_computed():
    w = torch.randn(8, 4)  # a frozen base weight (LoRA): no weight gradient
    x = torch.randn(3, 4, requires_grad=True)
    y = _OneDNNLinear.apply(x, w, None)
    (gx,) = torch.autograd.grad(y.sum(), [x])
    torch.testing.assert_close(gx, torch.ones(3, 8) @ w)
    assert w.grad is None


def test_training_context_gives_the_same_loss_and_gradients_and_cleans_up():
    model = _model()
    batch = ListBatches([[1, 5, 9, 3, 7], [2, 4, 6]], 2).next()

    def loss_and_grads():
        model.zero_grad()
        loss, n, _ = causal_lm(model, batch)
        (loss / n).backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    ref_loss, ref = loss_and_grads()
    layer = model.transformer.layers[0].attn.q_proj
    with onednn_linears(model):
        assert "forward" in vars(layer)
        loss, grads = loss_and_grads()
        twin = copy.deepcopy(model)  # a frozen DPO reference is made like this
        with torch.no_grad():
            twin.transformer.layers[0].attn.q_proj.weight.zero_()
        with torch.no_grad():
            mine, its = model(batch["input_ids"]), twin(batch["input_ids"])
        assert not torch.allclose(mine, its)  # the copy computes with its own weights
    assert "forward" not in vars(layer)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for k, g in ref.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-4, atol=1e-6, msg=k)


def test_trainer_uses_onednn_for_fp32_only(tmp_path):
    seen = []

    class Spy:
        def on_start(self, trainer):
            pass

        def on_step(self, trainer, step):
            seen.append("forward" in vars(trainer.model.transformer.layers[0].mlp.up_proj))

    data = ListBatches([[1, 5, 9, 3, 7], [2, 4, 6], [8, 8, 1]], 2)
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(lr=1e-2, warmup_steps=0, schedule="constant", precision=precision)
        Trainer(_model(), causal_lm, data, cfg, tmp_path / precision, total_steps=1,
                callbacks=[Spy()]).fit()  # fmt: skip
    assert seen == [True, False]


def test_tunelab_onednn_0_turns_it_off(monkeypatch):
    model = _model()
    layer = model.transformer.layers[0].attn.q_proj
    monkeypatch.setenv("TUNELAB_ONEDNN", "0")
    onednn_works.cache_clear()
    try:
        with onednn_linears(model):
            assert "forward" not in vars(layer)
    finally:
        monkeypatch.undo()
        onednn_works.cache_clear()
    with onednn_linears(model):
        assert "forward" in vars(layer)


def test_frozen_weight_keeps_no_input_and_empty_batches_work():
    saved = []
    w, x = torch.randn(8, 4), torch.randn(3, 4, requires_grad=True)  # a frozen weight (LoRA base)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _OneDNNLinear.apply(x, w, None).sum().backward()
    assert [t.shape for t in saved] == [w.shape]  # the weight for x's gradient, not x itself
    model = _model()
    with onednn_linears(model):
        empty = model.lm_head(torch.randn(0, 32, requires_grad=True))  # no rows: F.linear
        empty.sum().backward()
    assert empty.shape == (0, 60)


def test_the_kernel_check_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    onednn_works.cache_clear()
    assert onednn_works(torch.float32)
    assert torch.equal(torch.rand(3), want)  # a resumed run draws the same dropout masks


def test_fused_decoding_siblings_hold_no_activations_after_the_last_read():
    from tunelab.kernels import _FusedGroup, packed_linears

    model = _model()
    attn = model.transformer.layers[0].attn
    with torch.inference_mode(), packed_linears(model, rows=2):
        group = next(c.cell_contents for c in attn.q_proj.forward.__closure__
                     if isinstance(c.cell_contents, _FusedGroup))  # fmt: skip
        x = torch.randn(2, 1, 32)
        attn.q_proj(x), attn.k_proj(x)
        assert group.input is x  # v has not read its slice yet
        attn.v_proj(x)
        assert group.input is None and not group.outputs
