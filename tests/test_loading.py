"""Loading one tensor at a time: sharded bf16 checkpoints, dtypes as read, NF4 on read, memory."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import tunelab
from tunelab.adapt.quantize import NF4Linear, quantize
from tunelab.errors import ModelError

transformers = pytest.importorskip("transformers")


def _tokenizer(path):
    """Random checkpoints carry no tokenizer; a trivial one lets loading run end to end."""
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")).save(str(path / "tokenizer.json"))


def _sharded(tmp_path, family="llama", dtype=torch.bfloat16, **dims):
    """A random HF checkpoint in several safetensors shards with an index, stored in dtype."""
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=3, n_head=4, n_positions=64)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            **dims,
        )
        model = transformers.LlamaForCausalLM(cfg)
    model = model.to(dtype).eval()
    model.save_pretrained(tmp_path / family, max_shard_size="40KB")
    _tokenizer(tmp_path / family)
    return model, tmp_path / family


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sharded_checkpoint_loads_with_equal_logits(tmp_path, family):
    ref, path = _sharded(tmp_path, family, torch.float32)
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("*.safetensors"))) > 2
    lm = tunelab.load(path)
    ids = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids), ref(ids).logits, atol=1e-5, rtol=1e-4)


def test_precision_is_the_dtype_weights_are_stored_in(tmp_path):
    ref, path = _sharded(tmp_path)
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        model = tunelab.load(path, precision=precision).model
        assert {p.dtype for p in model.parameters()} == {dtype}
    ours = tunelab.load(path, precision="bf16").model
    w = ours.transformer.layers[1].mlp.down_proj.weight
    assert torch.equal(w, ref.model.layers[1].mlp.down_proj.weight)  # bf16 as stored, untouched


def test_nf4_on_read_equals_quantizing_after_loading(tmp_path):
    _, path = _sharded(tmp_path)
    on_read = tunelab.load(path, precision="bf16", quantize="nf4").model
    after = quantize(tunelab.load(path, precision="bf16").model, "nf4")
    blocks = on_read.transformer.layers
    assert not any(type(m) is nn.Linear for m in blocks.modules())
    pairs = [
        (a, b)
        for a, b in zip(blocks.modules(), after.transformer.layers.modules())
        if isinstance(a, NF4Linear)
    ]
    assert len(pairs) == 3 * 7
    for a, b in pairs:
        assert torch.equal(a.packed, b.packed) and torch.equal(a.absmax_q, b.absmax_q)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(on_read(ids), after(ids))


def test_saved_models_are_sharded_and_load_back_equal(tmp_path, monkeypatch):
    import tunelab.model.weights as weights

    _, path = _sharded(tmp_path, dtype=torch.float32)
    lm = tunelab.load(path)
    monkeypatch.setattr(weights, "SHARD_BYTES", 60_000)
    lm.save(tmp_path / "saved")
    shards = sorted((tmp_path / "saved").glob("model-*.safetensors"))
    assert len(shards) > 3 and (tmp_path / "saved" / "model.safetensors.index.json").exists()
    again = tunelab.load(tmp_path / "saved")
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        assert torch.equal(again.model(ids), lm.model(ids))
    monkeypatch.setattr(weights, "SHARD_BYTES", 2**30)
    lm.save(tmp_path / "one")
    assert [p.name for p in (tmp_path / "one").glob("*.safetensors")] == ["model.safetensors"]


def test_truncated_shard_and_missing_tensor_are_one_line_errors(tmp_path):
    _, path = _sharded(tmp_path)
    shard = sorted(path.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelError, match="truncated") as e:
        tunelab.load(path)
    assert str(shard) in str(e.value) and "\n" not in str(e.value)
    shard.write_bytes(data)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="lacks"):
        tunelab.load(path)


_PEAK = """
import resource, sys, torch, tunelab
big, small, precision, quant = sys.argv[1:5]
tunelab.load(small, precision=precision, quantize=quant or None)  # code paths and libraries paged in
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
lm = tunelab.load(big, precision=precision, quantize=quant or None)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
held = sum(t.numel() * t.element_size() for t in list(lm.model.parameters()) + list(lm.model.buffers()))
print(base * 1024, peak * 1024, held)
"""


def _peak(paths, precision, quant=""):
    out = subprocess.run(
        [sys.executable, "-c", _PEAK, *map(str, paths), precision, quant],
        capture_output=True,
        text=True,
        check=True,
    )
    return [int(v) for v in out.stdout.split()]


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """~130 MB of bf16 weights in 6 shards (big enough for memory to show above the noise),
    and a tiny model of the same family that each measurement loads first."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("wide")
    cfg = transformers.LlamaConfig(
        vocab_size=1024,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    for p in model.parameters():
        nn.init.normal_(p, std=0.02)
    model.save_pretrained(root / "wide", max_shard_size="30MB")
    _tokenizer(root / "wide")
    _, small = _sharded(root)
    return (root / "wide", small), sum(p.numel() for p in model.parameters())


def test_loading_peak_is_the_weights_plus_little(wide):
    path, n = wide
    for precision, size in (("bf16", 2), ("fp32", 4)):
        base, peak, held = _peak(path, precision)
        assert held == n * size
        # the target is 1.15 x weights + 0.5 GB; at this size hold it to a far tighter bound
        assert peak - base <= 1.15 * held + 40 * 2**20, (precision, peak - base, held)
        if precision == "bf16":  # stored as used: mapped, nothing read until it is touched
            assert peak - base < 0.25 * held, (peak - base, held)


def _mapped_ranges(files) -> list[tuple[int, int]]:
    names = {str(f.resolve()) for f in files}
    ranges = []
    for line in open("/proc/self/maps"):
        parts = line.split()
        if len(parts) >= 6 and parts[5] in names:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((lo, hi))
    return ranges


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: transposed, split Conv1D views
def test_weights_in_the_stored_dtype_are_mapped_in_place_and_private(tmp_path, family):
    import gc

    _, path = _sharded(tmp_path, family)  # bf16 shards
    files = sorted(path.glob("*.safetensors"))
    before = [f.read_bytes() for f in files]
    model = tunelab.load(path, precision="bf16").model
    ranges = _mapped_ranges(files)
    params = list(model.parameters())
    inside = [any(lo <= p.data_ptr() < hi for lo, hi in ranges) for p in params]
    assert all(inside), f"{inside.count(False)} of {len(params)} parameters were copied"
    with torch.no_grad():
        for p in params:  # an optimizer step writes to the process's own copy, never the file
            p.add_(1.0)
    assert [f.read_bytes() for f in files] == before
    del model, params, p
    gc.collect()
    assert _mapped_ranges(files) == []  # the mappings go with the tensors
    converted = tunelab.load(path, precision="fp32").model
    gc.collect()
    assert _mapped_ranges(files) == []  # converted as read: no mapping is kept
    assert {p.dtype for p in converted.parameters()} == {torch.float32}
    assert all(p.is_contiguous() for p in converted.parameters())


def test_gpt2_weights_used_as_stored_compute_like_transformers(tmp_path):
    """bf16 GPT-2 keeps its Conv1D weights as transposed views of the file: same logits as
    transformers, and a training step and a save work through the views."""
    from tunelab.model.checkpoint import save_model_dir

    ref, path = _sharded(tmp_path, "gpt2")
    lm = tunelab.load(path, precision="bf16")
    attn = lm.model.transformer.layers[0].attn
    assert not attn.q_proj.weight.is_contiguous()  # a view, not a copy
    ids = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(
            lm.model(ids).float(), ref(ids).logits.float(), atol=2e-2, rtol=0
        )
    out = lm.model(ids).float().logsumexp(-1).mean()
    out.backward()
    assert attn.q_proj.weight.grad.shape == attn.q_proj.weight.shape
    save_model_dir(lm.model, lm.tokenizer, tmp_path / "saved")
    again = tunelab.load(tmp_path / "saved", precision="bf16")
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids), lm.model(ids), atol=0, rtol=0)


def test_nf4_on_read_never_holds_the_float_model(wide):
    path, n = wide
    base, peak, held = _peak(path, "bf16", "nf4")
    assert held < 0.3 * 2 * n  # embeddings and head stay bf16, the blocks are 4-bit
    # measured 55 MB over the 37 MB kept, for 132 MB of bf16 weights: never the float model
    assert peak - base < 0.6 * 2 * n, (peak - base, 2 * n)


def test_our_safetensors_writer_is_read_back_by_safetensors_itself(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from tunelab.model.weights import read_header, write_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "w.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "b.f32": torch.randn(7, generator=g),
        "i.i64": torch.randint(-9, 9, (2, 2, 3), generator=g),
        "m.bool": torch.rand(5, generator=g) > 0.5,
        "h.f16": torch.randn(4, 1, generator=g).half(),
        "s.scalar": torch.tensor(2.5),
        "e.empty": torch.zeros(0, 4),
        "t.strided": torch.randn(6, 4, generator=g).t(),  # a transposed view is written as laid out
    }
    write_file(tensors, tmp_path / "x.safetensors", {"format": "pt", "n": 3})
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "n": "3"}
    entries = read_header(tmp_path / "x.safetensors")  # and by our reader, every offset aligned
    assert all(e.offset % 8 == 0 for n, e in entries.items() if n == "w.bf16")
