"""Read a llama.cpp GGUF file into a transformers-layout config, float32 weights and a tokenizer."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from tunelab.errors import ModelError
from tunelab.tokenizer.bpe import BYTE_TO_CHAR

# Bump when the conversion changes, so stale caches are rebuilt instead of reused.
CACHE_FORMAT = 1
SUPPORTED_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Tensors llama.cpp derives from the config (rope frequency tables); the HF model recomputes them.
_DERIVED = ("rope_freqs.weight", ".attn_rot_embd")

# Split regexes transformers pairs with `tokenizer.ggml.pre` for the supported archs' vocabularies;
# any other value (e.g. 'smollm', 'gpt2') gets GPT-2's regex, as in transformers.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    **dict.fromkeys(
        "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano dbrx "
        "smaug-bpe".split(),
        _LLAMA3,
    ),
    **dict.fromkeys("qwen2 deepseek-r1-qwen kormo f2llmv2 megrez".split(), _QWEN2),
    "tekken": _TEKKEN,
}
# llama.cpp's converter interleaves the rotary halves of these rows for llama only (not qwen2).
_PERMUTED = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


@dataclass
class GGUFContents:
    """What a GGUF file holds, in transformers' vocabulary."""

    hf_config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    tokenizer_config: dict[str, Any]


def read_gguf(path: str | os.PathLike) -> GGUFContents:
    """Read and dequantize a GGUF file into HF-named float32 tensors, config and tokenizer."""
    path = Path(path).expanduser()
    reader = _open(path)
    meta = {name: _field_value(field) for name, field in reader.fields.items()}
    config = _checked_config(reader, meta, path)
    tensors = {}
    for tensor in reader.tensors:
        if tensor.name.endswith(_DERIVED):
            continue
        name = _hf_name(tensor.name, path)
        tensors[name] = _unpermute_qk(name, _dequantize(tensor, path), config)
    _check_complete(tensors, config, path)
    tokenizer, tokenizer_config = _tokenizer(meta, path)
    return GGUFContents(config, tensors, tokenizer, tokenizer_config)


def read_gguf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The transformers config.json dict of a GGUF file, from its header alone (no tensor data)."""
    path = Path(path).expanduser()
    reader = _open(path)  # memory-maps the file: only the header and tensor table are read
    # Array fields (the vocabulary, merges) are large and not needed for the config.
    meta = {
        name: _field_value(field)
        for name, field in reader.fields.items()
        if not (field.types and field.types[0] == GGUFValueType.ARRAY)
    }
    return _checked_config(reader, meta, path)


def _checked_config(reader: GGUFReader, meta: dict, path: Path) -> dict[str, Any]:
    """The config dict for a supported architecture; a one-line ModelError for any other."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelError(
            f"{path}: architecture {arch!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHS)} (convert the original HF checkpoint instead)"
        )
    shapes = {t.name: tuple(reversed(t.shape.tolist())) for t in reader.tensors}
    return _hf_config(meta, arch, shapes, path)


def cache_dir(path: str | os.PathLike, cache_root: str | os.PathLike | None = None) -> Path:
    """Where gguf_to_hf_dir keeps (or will keep) the conversion of this GGUF file."""
    source = Path(path).expanduser().resolve()
    try:
        stat = source.stat()
    except OSError as error:
        raise ModelError(
            f"{source}: cannot read the GGUF file ({error.strerror}); check the path"
        ) from error
    root = Path(cache_root or os.environ.get("TUNELAB_CACHE") or "~/.cache/tunelab").expanduser()
    # Path, size and mtime identify the file well enough without hashing hundreds of megabytes.
    key = f"{source}\0{stat.st_size}\0{stat.st_mtime_ns}\0{CACHE_FORMAT}"
    return root / "gguf" / f"{source.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def gguf_to_hf_dir(path: str | os.PathLike, cache_root: str | os.PathLike | None = None) -> Path:
    """Convert a GGUF file once into a cached HF-layout directory and return that directory."""
    source, target = Path(path).expanduser().resolve(), cache_dir(path, cache_root)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    contents = read_gguf(source)
    # Everything goes into a sibling temp dir renamed at the end, so a kill leaves no half cache.
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        temp.chmod(0o755)  # mkdtemp makes it private; the finished cache should read like any dir
        _write_hf_dir(contents, temp)
        os.replace(temp, target)
    except OSError:
        shutil.rmtree(temp, ignore_errors=True)
        if not target.is_dir():  # a concurrent conversion that won the rename is fine
            raise
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return target


def _write_hf_dir(contents: GGUFContents, directory: Path) -> None:
    """Write config, weights and tokenizer files the way `from_pretrained` expects them."""
    from tunelab.model.weights import write_file

    (directory / "config.json").write_text(json.dumps(contents.hf_config, indent=2) + "\n")
    write_file(contents.tensors, directory / "model.safetensors", {"format": "pt"})
    contents.tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(contents.tokenizer_config, indent=2, ensure_ascii=False) + "\n"
    )


def _remove_stale_temps(target: Path, max_age_s: float = 3600.0) -> None:
    """Delete temp dirs that killed conversions left behind; recent ones may still be in use."""
    for stale in target.parent.glob(f".{target.name}.*"):
        with contextlib.suppress(OSError):  # another process may remove it first
            if time.time() - stale.stat().st_mtime > max_age_s:
                shutil.rmtree(stale, ignore_errors=True)


def _open(path: Path) -> GGUFReader:
    """Open a GGUF file, turning every way it can be unreadable into a one-line ModelError."""
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as error:
        raise ModelError(
            f"{path}: cannot read the GGUF file ({error.strerror}); check the path"
        ) from error
    if magic != b"GGUF":
        raise ModelError(
            f"{path} is not a GGUF file (starts with {magic!r}, not b'GGUF'); pass a llama.cpp .gguf file"
        )
    try:
        return GGUFReader(path)
    except Exception as error:  # the gguf package signals damage with assorted exception types
        raise ModelError(
            f"{path} is truncated or damaged ({_one_line(error)}); download it again"
        ) from error


def _one_line(error: BaseException) -> str:
    """An exception as a short single line, for embedding in our own messages."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:160]


def _field_value(field: Any) -> Any:
    """A metadata field as a Python value: str, int, float, bool, or a list of those."""

    def scalar(part: np.ndarray, kind: GGUFValueType) -> Any:
        return bytes(part).decode("utf-8") if kind == GGUFValueType.STRING else part[0].item()

    if field.types and field.types[0] == GGUFValueType.ARRAY:
        return [scalar(field.parts[i], field.types[-1]) for i in field.data]
    return scalar(field.parts[field.data[0]], field.types[0])


def _hf_config(meta: dict, arch: str, shapes: dict[str, tuple], path: Path) -> dict[str, Any]:
    """The transformers config.json dict for this file's metadata and tensors."""

    def need(key: str) -> Any:
        if f"{arch}.{key}" not in meta:
            raise ModelError(f"{path}: metadata lacks '{arch}.{key}'; the file is incomplete")
        return meta[f"{arch}.{key}"]

    hidden, heads = need("embedding_length"), need("attention.head_count")
    if "token_embd.weight" not in shapes:
        raise ModelError(f"{path}: no 'token_embd.weight' tensor; the file is incomplete")
    config = {
        "model_type": arch,
        "architectures": [SUPPORTED_ARCHS[arch]],
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv", heads),
        "hidden_act": "silu",
        "rms_norm_eps": need("attention.layer_norm_rms_epsilon"),
        "rope_theta": meta.get(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": need("context_length"),
        # The embedding's row count is what the weights need, whatever the vocabulary says.
        "vocab_size": shapes["token_embd.weight"][0],
        # llama.cpp omits the output projection exactly when it is the embedding matrix.
        "tie_word_embeddings": "output.weight" not in shapes,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    if arch == "llama":
        rope_dims = meta.get(f"{arch}.rope.dimension_count", hidden // heads)
        config["head_dim"] = meta.get(f"{arch}.attention.key_length", rope_dims)
        config["attention_bias"] = "blk.0.attn_q.bias" in shapes
        config["mlp_bias"] = "blk.0.ffn_up.bias" in shapes
    return config


def _hf_name(gguf_name: str, path: Path) -> str:
    """The transformers parameter name for a GGUF tensor name (`blk.3.attn_q.weight` etc.)."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if len(parts) == 1 and parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{suffix}"
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    raise ModelError(
        f"{path}: unexpected tensor {gguf_name!r} for this architecture; cannot map it"
    )


def _dequantize(tensor: Any, path: Path) -> torch.Tensor:
    """One tensor as float32 in torch order, dequantized by the gguf package itself."""
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as error:
        raise ModelError(
            f"{path}: tensor {tensor.name} uses {tensor.tensor_type.name}, which the gguf package "
            "cannot dequantize; use a file quantized as Q4_0/Q4_1/Q8_0/K-quants/F16/BF16/F32"
        ) from error
    # GGUF lists dimensions fastest-first; torch wants them slowest-first.
    shape = tuple(reversed(tensor.shape.tolist()))
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))


def _unpermute_qk(name: str, weight: torch.Tensor, config: dict) -> torch.Tensor:
    """Undo llama.cpp's q/k row interleaving for rotary halves, as transformers' reverse_permute."""
    if config["model_type"] != "llama" or not name.endswith(_PERMUTED):
        return weight
    heads = config["num_attention_heads" if ".q_proj." in name else "num_key_value_heads"]
    rows = weight.shape[0]
    per_head = weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
    return per_head.transpose(1, 2).reshape(weight.shape).contiguous()


def _check_complete(tensors: dict[str, torch.Tensor], config: dict, path: Path) -> None:
    """Fail now, naming the tensor, rather than later inside from_pretrained."""
    needed = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{leaf}.weight"
        for i in range(config["num_hidden_layers"])
        for leaf in _LAYER_NAMES.values()
    ]
    missing = [name for name in needed if name not in tensors]
    if missing:
        raise ModelError(f"{path}: missing tensor {missing[0]} ({len(missing)} missing in all)")


def _tokenizer(meta: dict, path: Path) -> tuple[Tokenizer, dict[str, Any]]:
    """A byte-level BPE tokenizer built as transformers builds it from GGUF metadata."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind != "gpt2" or not tokens or "tokenizer.ggml.merges" not in meta:
        raise ModelError(
            f"{path}: tokenizer {kind!r} is not supported (only byte-level BPE, 'gpt2', with merges); "
            "use the model's HF tokenizer.json instead"
        )
    table = BYTE_TO_CHAR  # GPT-2's byte alphabet, which byte-level BPE vocabularies are spelled in
    alphabet = set(table.values())
    # Some converters store a token as raw text instead of in the byte alphabet; respell it.
    vocab = {
        tok if set(tok) <= alphabet else "".join(table[b] for b in tok.encode("utf-8")): i
        for i, tok in enumerate(tokens)
    }
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    bpe = BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    tokenizer = Tokenizer(bpe)
    split = _SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokenizer.decoder = decoders.ByteLevel()

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    named = {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
    }
    # A "control" token outside the byte alphabet is a llama.cpp mislabel; transformers skips it.
    types = meta.get("tokenizer.ggml.token_type") or []
    special = [t for t, kind in zip(tokens, types) if kind == _CONTROL and set(t) <= alphabet]
    special += [t for t in named.values() if t is not None and t not in special]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    user = [t for t, kind in zip(tokens, types) if kind == _USER_DEFINED and t in vocab]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    add_bos = (
        bool(meta.get("tokenizer.ggml.add_bos_token", False)) and named["bos_token"] is not None
    )
    add_eos = (
        bool(meta.get("tokenizer.ggml.add_eos_token", False)) and named["eos_token"] is not None
    )
    if add_bos or add_eos:
        bos, eos = named["bos_token"], named["eos_token"]
        head, tail = (f"{bos}:0 " if add_bos else ""), (f" {eos}:0" if add_eos else "")
        pair_b = (f" {bos}:1" if add_bos else "") + " $B:1" + (f" {eos}:1" if add_eos else "")
        used = [(t, tokenizer.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{head}$A:0{tail}", pair=f"{head}$A:0{tail}{pair_b}", special_tokens=used
        )
    config = {
        **named,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "chat_template": meta.get("tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    return tokenizer, config
