"""Reading a model source's config and weight sizes from headers alone (model/inspect.py)."""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tunelab.errors import ModelError
from tunelab.model import inspect
from tunelab.model.checkpoint import save_model_dir
from tunelab.model.config import ModelConfig
from tunelab.model.heads import CausalLM
from tunelab.model.inspect import read_config, weight_bytes

HF = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}


def hf_dir(tmp_path: Path, shards: int = 1) -> Path:
    """An HF directory: config.json and bf16 + fp32 tensors, in one file or a sharded index."""
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(HF))
    tensors = {
        "model.embed_tokens.weight": torch.zeros(100, 64, dtype=torch.bfloat16),
        "model.norm.weight": torch.ones(64),
    }
    if shards == 1:
        save_file(tensors, str(d / "model.safetensors"))
    else:
        weight_map = {}
        for i, (name, t) in enumerate(tensors.items()):
            save_file({name: t}, str(d / f"model-{i}.safetensors"))
            weight_map[name] = f"model-{i}.safetensors"
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return d


@pytest.mark.parametrize("shards", [1, 2])
def test_hf_directory_config_and_weight_bytes(tmp_path, shards):
    d = hf_dir(tmp_path, shards)
    cfg = read_config(d)
    assert (cfg.family, cfg.d_model, cfg.n_layer, cfg.n_kv_head, cfg.vocab_size) == (
        "llama",
        64,
        2,
        2,
        100,
    )
    w = weight_bytes(d)
    assert w["by_dtype"] == {
        "BF16": dict(params=6400, bytes=12800),
        "F32": dict(params=64, bytes=256),
    }
    assert w["total_bytes"] == 13056 and w["params"] == 6464 and len(w["files"]) == shards
    assert w["largest"] == dict(name="model.embed_tokens.weight", params=6400, bytes=12800)
    assert inspect.bytes_per_param(w) == pytest.approx(13056 / 6464)


def test_weight_bytes_reads_headers_only(tmp_path):
    d = hf_dir(tmp_path)
    f = d / "model.safetensors"
    (length,) = np.frombuffer(f.read_bytes()[:8], "<u8")
    f.write_bytes(f.read_bytes()[: 8 + int(length)])  # the tensor data is gone
    assert weight_bytes(d)["total_bytes"] == 13056
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ModelError, match="model.safetensors: cannot read safetensors header"):
        weight_bytes(d)


def test_tunelab_directory(tmp_path):
    cfg = ModelConfig(vocab_size=100, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128)
    model = CausalLM(cfg)
    save_model_dir(model, None, tmp_path / "tl")
    assert read_config(tmp_path / "tl") == cfg
    n = sum(p.numel() for p in model.parameters())
    assert weight_bytes(tmp_path / "tl")["total_bytes"] == 4 * n  # the tied head stored once


def write_gguf(path: Path) -> None:
    """A tiny llama GGUF: the metadata the config needs, an F16 embedding and a Q8_0 linear."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_token_list([f"t{i}" for i in range(100)])  # an array field: skipped for the config
    w.add_tensor("token_embd.weight", np.zeros((100, 64), np.float16))
    q = gguf.quants.quantize(np.zeros((128, 64), np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.ffn_up.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_header(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path)
    cfg = read_config(path)
    assert (cfg.d_model, cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.d_ff, cfg.vocab_size) == (
        64,
        1,
        4,
        2,
        128,
        100,
    )
    assert cfg.tie_embeddings  # no output.weight
    w = weight_bytes(path)
    assert w["by_dtype"]["F16"] == dict(params=6400, bytes=12800)
    assert w["by_dtype"]["Q8_0"] == dict(params=8192, bytes=8192 // 32 * 34)


def test_known_name_and_hub_id(tmp_path, monkeypatch):
    d = hf_dir(tmp_path)
    fetched = []
    monkeypatch.setattr(
        inspect, "_hub_config", lambda hub_id: fetched.append(hub_id) or d / "config.json"
    )
    assert read_config("some-org/some-model").d_model == 64  # only config.json is fetched
    assert read_config("gpt2").d_model == 64 and fetched == [
        "some-org/some-model",
        "openai-community/gpt2",
    ]
    with pytest.raises(ModelError, match="no weight files"):
        weight_bytes("some-org/some-model")
    with pytest.raises(ModelError, match="unknown model 'smollm2-135m-instruc'"):
        read_config("smollm2-135m-instruc")


def test_embedded_known_name(tmp_path, monkeypatch):
    import tunelab.hub

    path = tmp_path / "tiny.gguf"
    write_gguf(path)
    monkeypatch.setattr(tunelab.hub, "embedded_path", lambda known: path)  # as an installed wheel
    assert read_config("smollm2-135m-instruct").d_model == 64
    assert weight_bytes("smollm2-135m-instruct")["files"] == [str(path)]


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "neither tunelab.json nor config.json"),
        ('{"model_type": "llama",', r"config.json: invalid JSON at line 1"),
        ("[1, 2]", "config.json: expected a JSON object"),
        ('{"model_type": "llama", "vocab_size": 10}', "config.json: lacks 'num_attention_heads'"),
        ('{"model_type": "t5", "vocab_size": 10}', "config.json: unsupported architecture 't5'"),
    ],
)
def test_bad_directories_are_one_line_errors_naming_the_file(tmp_path, content, match):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(ModelError, match=match) as info:
        read_config(tmp_path)
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)
