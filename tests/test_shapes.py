"""bench/shapes.py: the real shapes' parameter counts, and scaled-down checkpoints of each that
transformers loads and tunelab loads with equal logits (the parity test of sharded loading)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import tunelab

transformers = pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shapes = _bench("shapes")
NAMES = list(shapes.CONFIGS)
# The published parameter counts of the real models.
PARAMS = {"gpt2-large": 774_030_080, "gemma-2b": 2_506_172_416, "mistral-7b": 7_241_732_096}


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return {name: shapes.write_shape(name, root / name, scale=True) for name in NAMES}


def test_real_shapes_have_the_published_parameter_counts():
    assert {name: shapes.n_params(name) for name in NAMES} == PARAMS
    shards = {
        name: len(shapes.plan_shards(shapes.tensor_specs(shapes.hf_config(name)), int(4e9)))
        for name in NAMES
    }
    assert shards == {"gpt2-large": 1, "gemma-2b": 2, "mistral-7b": 4}


@pytest.mark.parametrize("name", NAMES)
def test_scaled_checkpoint_is_sharded_bf16_with_hf_names(name, scaled):
    path = scaled[name]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == shapes.CONFIGS[name]["model_type"]
    assert cfg["architectures"] == shapes.CONFIGS[name]["architectures"]
    assert cfg["torch_dtype"] == "bfloat16"
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3
    expected = {n: s for n, s, _ in shapes.tensor_specs(cfg)}
    seen = {}
    for file in files:
        with safe_open(str(path / file), "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                assert t.dtype == torch.bfloat16 and index["weight_map"][key] == file
                seen[key] = tuple(t.shape)
    assert seen == expected
    assert index["metadata"]["total_size"] == 2 * sum(torch.Size(s).numel() for s in seen.values())


@pytest.mark.parametrize("name", NAMES)
def test_scaled_checkpoint_loads_in_transformers_and_tunelab_with_equal_logits(name, scaled):
    path = scaled[name]
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    assert type(theirs).__name__ == shapes.CONFIGS[name]["architectures"][0]
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    theirs.eval()
    ours = tunelab.load(path)  # fp32
    text = "A shy librarian in a haunted hotel finds a message in a bottle. I saw this film twice."
    ids = ours.tokenizer.encode(text)
    assert ids == transformers.AutoTokenizer.from_pretrained(path)(text)["input_ids"]
    assert name != "mistral-7b" or len(ids) > theirs.config.sliding_window  # the window acts
    batch = torch.tensor([ids, ids[::-1]])
    mask = torch.ones_like(batch)
    mask[1, -5:] = 0  # a right-padded row
    with torch.no_grad():
        a = ours.model(batch, attention_mask=mask)
        b = theirs(input_ids=batch, attention_mask=mask).logits
    valid = mask.bool()
    assert (a[valid] - b[valid]).abs().max() < 1e-5
    assert b.abs().max() > 0.1  # random weights of std 0.02 still give a non-trivial output


@pytest.mark.parametrize("name", NAMES)
def test_tokenizer_ids_fit_and_special_tokens_agree(name, scaled):
    path = scaled[name]
    cfg = json.loads((path / "config.json").read_text())
    tok = tunelab.load(path).tokenizer
    assert tok.vocab_size <= cfg["vocab_size"]
    assert tok.eos_id == cfg["eos_token_id"] and tok.pad_id == cfg["pad_token_id"]
    assert tok.bos_id == cfg["bos_token_id"]


def test_write_is_seeded_and_kept_when_already_written(tmp_path, scaled):
    path = shapes.write_shape("mistral-7b", tmp_path / "again", scale=True)
    for file in path.glob("*.safetensors"):
        assert file.read_bytes() == (scaled["mistral-7b"] / file.name).read_bytes()
    stamp = (path / "shapes.json").stat().st_mtime_ns
    shapes.write_shape("mistral-7b", path, scale=True)
    assert (path / "shapes.json").stat().st_mtime_ns == stamp
