"""NF4 and int8 base weights: the code table, error bounds, storage, QLoRA training and merging."""

import json

import pytest
import torch
from batches import ListBatches  # noqa: I001 - tests/ is on sys.path
from torch import nn

from tunelab.adapt import apply_method
from tunelab.adapt.lora import apply_lora, lora_modules, merge_lora
from tunelab.adapt.quantize import (
    BLOCK,
    NF4_CODE,
    Int8Linear,
    NF4Linear,
    QuantLinear,
    quantize,
    storage_bytes,
)
from tunelab.errors import ConfigError
from tunelab.model.config import ModelConfig
from tunelab.model.heads import CausalLM
from tunelab.train.config import TrainConfig
from tunelab.train.loop import Trainer
from tunelab.train.objectives import causal_lm

HALF_GAP = max(b - a for a, b in zip(NF4_CODE, NF4_CODE[1:])) / 2


def tiny_model(seed=0, d=64):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        family="llama", vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, d_model=d, d_ff=2 * d
    )
    return CausalLM(cfg)


def _linear(out=96, inp=256, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out)
    with torch.no_grad():
        lin.weight[3, 5] = 1.5  # an outlier, as real weights have
    return lin


def test_nf4_table_is_qlora_normal_float():
    """Rebuild the table as QLoRA does: normal quantiles, 8 positive and 7 negative, plus 0."""
    normal, offset = torch.distributions.Normal(0.0, 1.0), 0.9677083
    pos = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    values = values / values.abs().max()
    assert len(NF4_CODE) == 16
    assert torch.allclose(values, torch.tensor(NF4_CODE, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("shape", [(96, 256), (7, 9)])  # (7, 9): padding to whole blocks
def test_nf4_error_within_bound(shape):
    lin = _linear(*shape)
    w = lin.weight.detach().flatten()
    pad = (-w.numel()) % BLOCK
    for double_quant in (False, True):
        q = NF4Linear(lin, double_quant=double_quant)
        err = (q.dequantize().flatten() - w).abs()
        err = torch.nn.functional.pad(err, (0, pad)).view(-1, BLOCK).amax(1)
        true_absmax = torch.nn.functional.pad(w.abs(), (0, pad)).view(-1, BLOCK).amax(1)
        used = q._absmax()  # equal to the true absmax unless double-quantized
        bound = used * HALF_GAP + (true_absmax - used).clamp(min=0)
        assert (err <= bound + 1e-6).all()
        if not double_quant:
            assert torch.equal(used, true_absmax)
        assert q.dequantize().shape == lin.weight.shape


def test_int8_error_within_half_step():
    lin = _linear()
    q = Int8Linear(lin)
    err = (q.dequantize() - lin.weight).abs().amax(1)
    assert (err <= q.scale / 2 + 1e-7).all()


def test_storage_bytes_per_param():
    lin = nn.Linear(512, 256, bias=False)
    n = lin.weight.numel()
    assert NF4Linear(lin, double_quant=True).storage_bytes() / n == pytest.approx(
        0.5 + 1 / 64 + 4 / (64 * 256), abs=1e-4
    )
    assert NF4Linear(lin, double_quant=False).storage_bytes() / n == pytest.approx(0.5 + 4 / 64)
    assert Int8Linear(lin).storage_bytes() / n == pytest.approx(1 + 4 / 512)
    model = quantize(tiny_model(), "nf4")
    linears = sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear)
    )
    assert 0.5 < storage_bytes(model) / linears < 0.52
    assert isinstance(model.lm_head, nn.Linear)  # skipped by default


def test_forward_and_input_gradient_match_dequantized_float():
    lin = _linear()
    q = NF4Linear(lin)
    ref = nn.Linear(256, 96)
    with torch.no_grad():
        ref.weight.copy_(q.dequantize())
        ref.bias.copy_(lin.bias)
    x1 = torch.randn(2, 5, 256, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = q(x1), ref(x2)
    assert (y1 - y2).abs().max() < 1e-5
    y1.square().sum().backward()
    y2.square().sum().backward()
    assert (x1.grad - x2.grad).abs().max() < 1e-4
    assert not any(p.requires_grad for p in q.parameters())


@pytest.mark.parametrize("bits,tol", [("nf4", 0.15), ("int8", 0.01)])
def test_quantized_logits_close_to_float(bits, tol):
    ref = tiny_model()
    model = quantize(tiny_model(), bits)
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        a, b = model(ids), ref(ids)
    assert (a - b).norm() / b.norm() < tol
    assert (a - b).abs().max() > 0  # really quantized


def test_state_dict_round_trip():
    a = quantize(tiny_model(0), "nf4")
    b = quantize(tiny_model(1), "nf4")
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


def test_merge_qlora_is_dequantized_plus_delta():
    model = apply_lora(quantize(tiny_model(), "nf4"), r=4, alpha=8, targets="all-linear")
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.1)
    lora = model.transformer.layers[0].mlp.down_proj
    expected = lora.base.dequantize() + lora.delta()
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        before = model(ids)
    merge_lora(model)
    merged = model.transformer.layers[0].mlp.down_proj
    assert type(merged) is nn.Linear and (merged.weight - expected).abs().max() < 1e-6
    with torch.no_grad():
        assert (model(ids) - before).abs().max() < 1e-5


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("targets", ["all-linear", ("q_proj", "v_proj")])
def test_merged_tensors_equal_merging_in_place_and_leave_the_model_alone(targets, tie):
    """save_final writes merged_tensors: LoRA folded in, quantized bases (LoRA-wrapped or not)
    dequantized, the tied head left out, names as a plain model's, the model itself unchanged."""
    import copy

    from tunelab.adapt.lora import merged_tensors

    model = tiny_model()
    if tie:
        model = CausalLM(ModelConfig(**{**model.cfg.to_dict(), "tie_embeddings": True}))
    model = apply_lora(quantize(model, "nf4"), r=4, alpha=8, targets=targets)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = dict(merged_tensors(model, torch.bfloat16))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    plain = merge_lora(copy.deepcopy(model))
    for m in list(plain.modules()):
        for child, sub in list(m.named_children()):
            if isinstance(sub, QuantLinear):
                setattr(m, child, sub.to_linear())
    tied = model.cfg.tie_embeddings
    expected = {k: v for k, v in plain.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k].dtype == torch.bfloat16
        torch.testing.assert_close(got[k], v.to(torch.bfloat16), atol=0, rtol=0)


def test_qlora_method_options():
    model = tiny_model()
    apply_method(model, {"name": "qlora", "bits": "int8", "r": "2", "targets": "all-linear"})
    lora = model.transformer.layers[1].attn.k_proj
    assert isinstance(lora.base, Int8Linear) and lora.r == 2
    with pytest.raises(ConfigError, match="bits"):
        quantize(tiny_model(), "fp3")
    with pytest.raises(ConfigError, match=r"'double_quantization'.*did you mean 'double_quant'"):
        apply_method(tiny_model(), {"name": "qlora", "double_quantization": "false"})


def test_qlora_training_reduces_loss(tmp_path):
    model = tiny_model()
    apply_method(model, {"name": "qlora", "r": 4, "alpha": 8, "targets": "all-linear"})
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(1, 50, (10,), generator=g).tolist() for _ in range(4)]
    cfg = TrainConfig(
        lr=3e-2, weight_decay=0.0, warmup_steps=0, schedule="constant", batch_size=4, log_every=1
    )
    codes = model.transformer.layers[0].attn.q_proj.base.packed.clone()
    Trainer(model, causal_lm, ListBatches(data, 4), cfg, tmp_path, 40).fit()
    losses = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.7 * losses[0]
    assert torch.equal(model.transformer.layers[0].attn.q_proj.base.packed, codes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nf4_on_cuda_matches_cpu():
    lin = _linear()
    cpu = NF4Linear(lin)
    gpu = NF4Linear(lin.cuda())
    assert torch.equal(cpu.packed, gpu.packed.cpu())
    x = torch.randn(3, 256, requires_grad=True)
    xg = x.detach().cuda().requires_grad_()
    gpu(xg).sum().backward()
    cpu(x).sum().backward()
    assert (gpu(xg).cpu() - cpu(x)).abs().max() < 1e-3 and (
        xg.grad.cpu() - x.grad
    ).abs().max() < 1e-3


def test_codes_equal_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes.functional")
    lin = _linear()
    packed, state = bnb.quantize_4bit(
        lin.weight.data, blocksize=64, quant_type="nf4", compress_statistics=False
    )
    ours = NF4Linear(lin, double_quant=False)
    assert torch.equal(packed.flatten(), ours.packed)
    assert torch.equal(bnb.dequantize_4bit(packed, state), ours.dequantize())


def test_cast_to_bf16_keeps_scales_and_lora_stays_float():
    model = apply_lora(quantize(tiny_model(), "nf4"), r=2, targets="all-linear")
    quantize(model, "int8")  # nothing left to quantize: LoRA's own layers are never quantized
    q = model.transformer.layers[0].attn.q_proj.base
    before = q.dequantize()
    model.to(torch.bfloat16)
    assert q.code.dtype == q.absmax_scale.dtype == torch.float32
    assert torch.equal(q.dequantize(), before)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        assert model(ids).dtype == torch.bfloat16


def test_dequantize_rows_any_slice_and_threads_equal_the_whole():
    """Rows that start inside a 64-weight block (in_features 100), chunks smaller than the
    matrix, one thread or torch's: the same values as the whole weight, threads restored."""
    import tunelab.runtime.dequant as dmod

    torch.manual_seed(0)
    q = NF4Linear(nn.Linear(100, 37, bias=False))
    # by the definition, not the gather: a weight is its code's value times its block's absmax
    blocks = q.code[q.codes()].view(-1, 64) * q._absmax()[:, None]
    whole = blocks.flatten()[: 37 * 100].view(37, 100)
    before = torch.get_num_threads()
    for chunk in (dmod.CHUNK, 192):
        dmod.CHUNK, saved = chunk, dmod.CHUNK
        try:  # one thread gathers by index_select, more by rows: both paths
            for start, stop, threads in ((0, 37, 2), (3, 11, 1), (5, 37, 2), (36, 37, 1)):
                out = torch.empty(stop - start, 100)
                got = q.dequantize_rows(start, out, threads=threads)
                assert torch.equal(got, whole[start:stop]), (chunk, start, stop)
                assert torch.get_num_threads() == before
        finally:
            dmod.CHUNK = saved
    q.dequant_threads = 1
    assert torch.equal(q.dequantize(torch.bfloat16), whole.to(torch.bfloat16))


@pytest.mark.parametrize("layer", [NF4Linear, Int8Linear])
def test_autocast_forward_and_backward_use_the_autocast_dtype(layer):
    """Under bf16 autocast a float32 input is multiplied by the weight dequantized straight to
    bf16 (as F.linear would after casting both), through the buffer the layers share, and two
    layers of different sizes in a row do not see each other's weights."""
    import tunelab.adapt.quantize as qmod
    import tunelab.runtime.dequant as dmod

    torch.manual_seed(0)
    a, b = layer(nn.Linear(256, 96, bias=False)), layer(nn.Linear(96, 300, bias=False))
    x = torch.randn(7, 256, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        y = b(a(x))
    wa, wb = a.dequantize(torch.bfloat16), b.dequantize(torch.bfloat16)
    xr = x.detach().clone().requires_grad_()
    ref = (xr.to(torch.bfloat16) @ wa.T) @ wb.T
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref)
    g = torch.randn(7, 300)
    y.backward(g.to(torch.bfloat16))
    ref.backward(g.to(torch.bfloat16))
    assert torch.equal(x.grad, xr.grad)
    qmod.release_scratch()
    assert "weight" not in dmod._kept.__dict__


def test_dequantization_keeps_its_work_buffers_between_calls_until_released():
    """The gather's buffers are made once per thread and reused (made per call, their pages
    are faulted anew every time); release_scratch drops them with the weight buffer."""
    import tunelab.adapt.quantize as qmod
    import tunelab.runtime.dequant as dmod

    qmod.release_scratch()
    big, small = NF4Linear(nn.Linear(256, 64, bias=False)), NF4Linear(nn.Linear(64, 32, bias=False))
    big.dequantize()
    names = ("nf4-codes", "nf4-pairs")
    first = [dmod._kept.__dict__[k].data_ptr() for k in names]
    small.dequantize()
    assert [dmod._kept.__dict__[k].data_ptr() for k in names] == first  # big enough: reused
    qmod.release_scratch()
    assert not any(k in dmod._kept.__dict__ for k in names)


def test_the_shared_buffer_made_under_inference_mode_serves_training():
    """An evaluation before training (inference_mode) makes the shared dequantization buffer
    first; training then writes into it outside inference mode (the quickstart's QLoRA cell
    failed so: 'Inplace update to inference tensor outside InferenceMode')."""
    import tunelab.adapt.quantize as qmod

    qmod.release_scratch()
    torch.manual_seed(0)
    q = NF4Linear(nn.Linear(64, 32, bias=False))
    x = torch.randn(3, 64, requires_grad=True)
    with torch.inference_mode():
        before = q(x.detach())
    y = q(x)
    y.sum().backward()
    assert torch.equal(y.detach(), before) and x.grad is not None
    with torch.inference_mode():
        assert torch.equal(q(x.detach()), before)
