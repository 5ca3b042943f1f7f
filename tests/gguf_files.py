"""Tiny GGUF files written as llama.cpp writes them, and checks shared by the GGUF tests.

The writer is independent of tunelab.model.gguf (its own name table and q/k permutation), so
reading its files back tests the module rather than restating it."""

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

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


def _byte_alphabet() -> list[str]:
    """GPT-2's 256-character byte alphabet, computed independently of the module under test."""
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def vocab() -> tuple[list[str], list[int]]:
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
    tokens, types = vocab()
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


def assert_one_line_naming(error: pytest.ExceptionInfo, path: Path) -> str:
    message = str(error.value)
    assert path.name in message and "\n" not in message, message
    return message
