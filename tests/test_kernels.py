"""oneDNN linear layers (runtime/kernels.py) against F.linear: values, gradients, FastLinear."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from batches import ListBatches  # noqa: I001 - tests/ is on sys.path

from tunelab.model.config import ModelConfig
from tunelab.model.heads import CausalLM
from tunelab.runtime import kernels, prepare_runtime
from tunelab.runtime.kernels import (
    FastLinear,
    _OneDNNLinear,
    decode_kernel,
    decoding,
    onednn_works,
    prepare_linears,
    unprepare_linears,
)
from tunelab.train.config import TrainConfig
from tunelab.train.loop import Trainer
from tunelab.train.objectives import causal_lm

pytestmark = pytest.mark.skipif(
    not onednn_works(torch.float32), reason="no oneDNN linear in this torch build"
)


ONEDNN = {
    "train-fp32": "onednn",
    "train-bf16": "onednn",
    "decode-fp32": "packed+fused",
    "decode-bf16": "packed+fused",
}


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        family="llama",
        vocab_size=60,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        d_model=32,
        d_ff=64,
        qkv_bias=True,
    )
    return CausalLM(cfg)


@pytest.mark.parametrize("onednn_wgrad", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 24), (3, 5, 24), "strided"])
def test_onednn_linear_matches_f_linear_values_and_gradients(bias, shape, onednn_wgrad):
    g = torch.Generator().manual_seed(len(str(shape)) + bias)
    w = torch.randn(40, 24, generator=g, requires_grad=True)
    b = torch.randn(40, generator=g, requires_grad=True) if bias else None
    if shape == "strided":  # a non-contiguous input, as a slice of a bigger activation
        x = torch.randn(6, 48, generator=g)[:, ::2].requires_grad_(True)
    else:
        x = torch.randn(*shape, generator=g, requires_grad=True)
    upstream = torch.randn(*x.shape[:-1], 40, generator=g)
    grads = []
    for fn in (lambda *a: _OneDNNLinear.apply(*a, onednn_wgrad), F.linear):
        y = fn(x, w, b)
        inputs = [x, w] + ([b] if bias else [])
        grads.append((y, *torch.autograd.grad(y, inputs, upstream)))
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("onednn_wgrad, products", [(True, 3), (False, 2)])
def test_the_weight_grad_runs_where_the_kernel_says(monkeypatch, onednn_wgrad, products):
    calls = _count_onednn(monkeypatch)
    x, w = torch.randn(5, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    _OneDNNLinear.apply(x, w, None, onednn_wgrad).sum().backward()
    assert len(calls) == products  # forward and input grad always; weight grad on oneDNN or mm
    torch.testing.assert_close(w.grad, torch.ones(5, 6).t() @ x.detach())


def test_only_the_gradients_asked_for_are_computed():
    w = torch.randn(8, 4)  # a frozen base weight (LoRA): no weight gradient
    x = torch.randn(3, 4, requires_grad=True)
    y = _OneDNNLinear.apply(x, w, None)
    (gx,) = torch.autograd.grad(y.sum(), [x])
    torch.testing.assert_close(gx, torch.ones(3, 8) @ w)
    assert w.grad is None


def test_prepared_model_gives_the_same_loss_and_gradients_and_copies_compute_alone():
    model = _model()
    batch = ListBatches([[1, 5, 9, 3, 7], [2, 4, 6]], 2).next()
    names = list(model.state_dict())

    def loss_and_grads():
        model.zero_grad()
        loss, n, _ = causal_lm(model, batch)
        (loss / n).backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    ref_loss, ref = loss_and_grads()
    prepare_linears(model, ONEDNN)
    layer = model.transformer.layers[0].attn.q_proj
    assert isinstance(layer, FastLinear) and "forward" not in vars(layer)
    assert list(model.state_dict()) == names  # the same parameters, under the same names
    loss, grads = loss_and_grads()
    twin = copy.deepcopy(model)  # a frozen DPO reference is made like this
    with torch.no_grad():
        twin.transformer.layers[0].attn.q_proj.weight.zero_()
        mine, its = model(batch["input_ids"]), twin(batch["input_ids"])
    assert not torch.allclose(mine, its)  # the copy computes with its own weights
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for k, g in ref.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-4, atol=1e-6, msg=k)
    unprepare_linears(model)
    assert type(model.transformer.layers[0].attn.q_proj) is torch.nn.Linear


def _count_onednn(monkeypatch) -> list:
    calls = []
    real = kernels.onednn_linear
    monkeypatch.setattr(kernels, "onednn_linear", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("autocast", ["off", "bf16"])
def test_each_dtype_trains_on_the_kernel_chosen_for_it(tmp_path, monkeypatch, autocast):
    if autocast == "bf16" and not onednn_works(torch.bfloat16):
        pytest.skip("no bf16 oneDNN linear here")
    data = ListBatches([[1, 5, 9, 3, 7], [2, 4, 6], [8, 8, 1]], 2)
    cfg = TrainConfig(lr=1e-2, warmup_steps=0, schedule="constant", autocast=autocast)
    dtype, other = ("fp32", "bf16") if autocast == "off" else ("bf16", "fp32")
    grads, batch = {}, data.next()
    for kernel in ("torch", "onednn", "onednn+mm"):
        model = _model()
        prepare_linears(model, {f"train-{dtype}": kernel, f"train-{other}": "onednn"})
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast == "bf16"):
            loss, n, _ = causal_lm(model, batch)
        loss.backward()
        grads[kernel] = {k: p.grad.clone() for k, p in model.named_parameters()}
        model.zero_grad()
        calls = _count_onednn(monkeypatch)  # the trainer runs the same choice
        Trainer(model, causal_lm, data, cfg, tmp_path / kernel, total_steps=1).fit()
        assert bool(calls) == (kernel != "torch"), kernel
        monkeypatch.undo()
    tol = 1e-5 if autocast == "off" else 3e-2
    for k, g in grads["torch"].items():
        for kernel in ("onednn", "onednn+mm"):
            torch.testing.assert_close(grads[kernel][k], g, rtol=tol, atol=tol, msg=k)


def test_tunelab_onednn_overrides_the_configured_linear(monkeypatch):
    monkeypatch.setenv("TUNELAB_ONEDNN", "0")
    model = _model()
    rt = prepare_runtime(model, SimpleNamespace(linear="onednn"))
    assert set(rt.kernels.values()) == {"torch"} and "TUNELAB_ONEDNN" in rt.source
    monkeypatch.setenv("TUNELAB_ONEDNN", "1")
    rt = prepare_runtime(model, SimpleNamespace(linear="torch"))
    assert rt.kernels["train-fp32"] == "onednn"
    assert model.transformer.layers[0].attn.q_proj.choice == rt.kernels


def test_frozen_weight_keeps_no_input_and_empty_batches_work():
    saved = []
    w, x = torch.randn(8, 4), torch.randn(3, 4, requires_grad=True)  # a frozen weight (LoRA base)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _OneDNNLinear.apply(x, w, None).sum().backward()
    assert [t.shape for t in saved] == [w.shape]  # the weight for x's gradient, not x itself
    model = _model()
    prepare_linears(model, ONEDNN)
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


def test_fused_decoding_siblings_hold_no_activations_and_see_in_place_changes():
    model = _model()
    prepare_linears(model, ONEDNN)
    attn = model.transformer.layers[0].attn
    with torch.inference_mode(), decoding(model, rows=2):
        assert decode_kernel(attn.q_proj) == "packed+fused"
        group = attn.q_proj.decoder.__call__.__closure__  # the slot's shared group
        fused = next(c.cell_contents for c in group if isinstance(c.cell_contents, kernels._Fused))
        x = torch.randn(2, 1, 32)
        attn.q_proj(x), attn.k_proj(x)
        assert fused.ref() is x  # v has not read its slice yet; x is held weakly
        attn.v_proj(x)
        assert fused.ref is None and not fused.outputs
    assert attn.q_proj.decoder is None
    with torch.no_grad(), decoding(model, rows=2):  # not inference: tensors keep a version
        x = torch.randn(2, 1, 32)
        attn.q_proj(x)
        x.mul_(2)  # changed in place between the siblings: k computes again, on the new x
        torch.testing.assert_close(
            attn.k_proj(x), F.linear(x, attn.k_proj.weight, attn.k_proj.bias)
        )
    twin = copy.deepcopy(model)
    assert twin.transformer.layers[0].attn.q_proj.decoder is None
