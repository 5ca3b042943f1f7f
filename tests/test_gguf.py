"""GGUF reading on synthetic files: dequantized values, tensor names, configs and tokenizers,
against transformers' own GGUF loader."""

from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf_files import (  # noqa: I001 - tests/ is on sys.path
    FFN,
    HEADS,
    HIDDEN,
    KV_HEADS,
    LAYERS,
    SPECIALS,
    TEMPLATE,
    TEXTS,
    vocab,
    write_tiny,
)

from tunelab.model.gguf import read_gguf

# Worst-case error of each format relative to the largest |value| (Q4_1: of the value range).
TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 8e-3, Q.Q8_0: 1 / 127, Q.Q4_0: 1 / 8, Q.Q4_1: 1 / 15}


@pytest.mark.parametrize("qtype", list(TOLERANCE), ids=lambda q: q.name)
def test_dequantized_values_within_quant_error(tmp_path: Path, qtype: Q) -> None:
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    originals = write_tiny(path, qtype, tied=False)
    tensors = read_gguf(path).tensors
    assert set(tensors) == set(originals)
    for name, original in originals.items():
        got = tensors[name]
        assert got.dtype == torch.float32 and got.shape == original.shape, name
        error = (got - original).abs().max().item()
        if qtype == Q.F32 or original.ndim == 1:
            assert error == 0.0, name
            continue
        span = (original.max() - original.min()) if qtype == Q.Q4_1 else original.abs().max()
        assert error <= TOLERANCE[qtype] * span.item(), (name, error)
        if qtype in (Q.Q4_0, Q.Q4_1):
            assert error > 0.0  # the round trip really went through the quantizer


def test_qk_permutation_is_undone_exactly(tmp_path: Path) -> None:
    path = tmp_path / "tiny-f32.gguf"
    originals = write_tiny(path, Q.F32)
    tensors = read_gguf(path).tensors
    for i in range(LAYERS):
        for proj in ("q_proj", "k_proj"):
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            assert torch.equal(tensors[name], originals[name]), name


def test_qwen2_is_not_permuted_and_keeps_biases(tmp_path: Path) -> None:
    path = tmp_path / "tiny-qwen2.gguf"
    originals = write_tiny(path, Q.F32, arch="qwen2")
    contents = read_gguf(path)
    assert set(contents.tensors) == set(originals)
    for name, original in originals.items():
        assert torch.equal(contents.tensors[name], original), name
    assert contents.hf_config["model_type"] == "qwen2"
    assert contents.hf_config["architectures"] == ["Qwen2ForCausalLM"]


def test_tiny_config_and_tokenizer_config(tmp_path: Path) -> None:
    untied, tied = tmp_path / "untied.gguf", tmp_path / "tied.gguf"
    write_tiny(untied, tied=False)
    write_tiny(tied, tied=True, add_bos=True)
    config = read_gguf(untied).hf_config
    expected = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HIDDEN // HEADS,
        "rope_theta": 50000.0,
        "max_position_embeddings": 256,
        "vocab_size": len(vocab()[0]),
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }
    assert {k: config[k] for k in expected} == expected
    assert config["rms_norm_eps"] == pytest.approx(1e-6)
    contents = read_gguf(tied)
    assert contents.hf_config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in contents.tensors
    tc = contents.tokenizer_config
    assert [tc["bos_token"], tc["eos_token"], tc["pad_token"]] == SPECIALS[1:] + SPECIALS[:1]
    assert tc["chat_template"] == TEMPLATE and tc["add_bos_token"] is True
    assert contents.tokenizer.encode("the x").ids[0] == 1  # BOS added by the post-processor


def test_tiny_tokenizer_merges_specials_and_respelling(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny(path)
    tokenizer = read_gguf(path).tokenizer
    tokens, _ = vocab()
    encoding = tokenizer.encode("the then x<|im_end|>12<think>")
    assert encoding.tokens == ["t", "he", "Ġthe", "n", "Ġx", "<|im_end|>", "12", "<think>"]
    assert encoding.ids[4] == tokens.index(" x")  # the raw-space token answers to its byte spelling
    assert encoding.ids[-1] == tokens.index("<think>")
    text = "the then x<|im_end|>12<think>"
    assert tokenizer.decode(encoding.ids, skip_special_tokens=False) == text
    # control tokens are special and dropped; the user-defined one is not special
    assert tokenizer.decode(encoding.ids) == "the then x12<think>"


def test_tiny_matches_transformers_gguf_loader(tiny_gguf: tuple[Path, dict]) -> None:
    transformers = pytest.importorskip("transformers")
    path, _ = tiny_gguf
    ours = read_gguf(path)
    kwargs = {"gguf_file": path.name}
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, **kwargs)
    reference = model.state_dict()
    assert set(reference) == set(ours.tensors)
    for name, tensor in ours.tensors.items():
        assert torch.equal(tensor, reference[name]), name
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, **kwargs)
    for text in TEXTS:
        assert ours.tokenizer.encode(text).ids == tokenizer(text).input_ids, text


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "tekken", "smollm"])
def test_pre_tokenizer_variants_match_transformers(tmp_path: Path, pre: str) -> None:
    transformers = pytest.importorskip("transformers")
    path = tmp_path / f"tiny-{pre}.gguf"
    write_tiny(path, pre=pre)
    ours = read_gguf(path).tokenizer
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        assert ours.encode(text).ids == reference(text).input_ids, text
