"""Packed rows of unequal length (model/varlen.py): every backend gives the per-row answer."""

import pytest
import torch

from tunelab.errors import ConfigError
from tunelab.model import varlen
from tunelab.model.config import ModelConfig
from tunelab.model.varlen import backend_for, nested_works, varlen_attention

LENGTHS = [5, 1, 8, 3]
D = 8


def qkv(kv_heads: int):
    gen = torch.Generator().manual_seed(0)
    n = sum(LENGTHS)
    return [torch.randn(n, h, D, generator=gen).requires_grad_() for h in (4, kv_heads, kv_heads)]


def run(backend: str, causal: bool, kv_heads: int):
    q, k, v = qkv(kv_heads)
    y = varlen_attention(q, k, v, LENGTHS, causal, enable_gqa=kv_heads != 4, backend=backend)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), q.grad, k.grad, v.grad


def nested_on_cpu_runs(causal: bool) -> bool:
    """torch's CPU fallback for jagged SDPA (math) runs bidirectional rows only."""
    q = torch.zeros(3, 2, D)
    try:
        varlen_attention(q, q, q, [2, 1], causal, backend="nested")
    except RuntimeError:
        return False
    return True


# that fallback warns about the older nested layout it uses inside
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("backend", ["mask", "nested"])
def test_backend_equals_one_call_per_row(backend, causal, kv_heads):
    if backend == "nested" and not nested_on_cpu_runs(causal):
        pytest.skip(
            f"this torch ({torch.__version__}) has no CPU kernel for jagged nested "
            f"SDPA with is_causal={causal}"
        )
    want = run("rows", causal, kv_heads)
    got = run(backend, causal, kv_heads)
    for name, a, b in zip(("output", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_rows_backend_alone_equals_sdpa_on_each_row():
    """The reference itself: row i of the packed result is SDPA on row i's tokens."""
    q, k, v = qkv(4)
    y = varlen_attention(q, k, v, LENGTHS, True, backend="rows")
    start = 0
    for n in LENGTHS:
        rows = [t[start : start + n].transpose(0, 1) for t in (q, k, v)]
        alone = torch.nn.functional.scaled_dot_product_attention(*rows, is_causal=True)
        torch.testing.assert_close(y[start : start + n], alone.transpose(0, 1))
        start += n


def test_backend_choice_per_device_and_override(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.delenv("TUNELAB_VARLEN", raising=False)
    assert backend_for(cpu, torch.float32, D, True) == "rows"
    monkeypatch.setattr(varlen, "nested_works", lambda *a: True)
    assert backend_for(cuda, torch.bfloat16, 64, True) == "nested"
    monkeypatch.setattr(varlen, "nested_works", lambda *a: False)  # e.g. an old torch
    assert backend_for(cuda, torch.bfloat16, 64, True) == "mask"
    monkeypatch.setenv("TUNELAB_VARLEN", "mask")
    assert backend_for(cpu, torch.float32, D, True) == "mask"
    monkeypatch.undo()  # the real probe: the CPU has no fused kernel, so nested means mask
    assert not nested_works(cpu, torch.float32, D, False)
    monkeypatch.setenv("TUNELAB_VARLEN", "nested")
    assert backend_for(cpu, torch.float32, D, False) == "mask"
    monkeypatch.setenv("TUNELAB_VARLEN", "rowz")
    with pytest.raises(ConfigError, match="rows, mask, nested"):
        backend_for(cpu, torch.float32, D, True)


@pytest.mark.parametrize("backend", ["rows", "mask"])
def test_padded_batch_through_the_model_with_each_backend(backend, monkeypatch):
    """The transformer's Packed path (a padded batch) gives the same hidden states either way."""
    from tunelab.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=40, n_layer=2, n_head=4, n_kv_head=2, d_model=16, d_ff=32)
    )
    ids = torch.randint(1, 40, (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] + [0] * 6])
    want = torch.cat([model(ids[i : i + 1, :n])[0] for i, n in enumerate((7, 4, 1))])
    monkeypatch.setenv("TUNELAB_VARLEN", backend)
    out = model(ids, mask)
    torch.testing.assert_close(out[mask.bool()], want, rtol=1e-5, atol=1e-5)
