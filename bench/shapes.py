"""Random-weight checkpoints shaped exactly like GPT-2 large, Gemma-2B and Mistral-7B; nothing
is downloaded.

    python bench/shapes.py [gpt2-large gemma-2b mistral-7b] [--scale] [--cache DIR | --out DIR]
                           [--seed 0] [--shard-gb 4] [--force]

Each is an HF directory as the hub has it: config.json with the real model_type, architectures
and dimensions (torch_dtype bfloat16), bf16 safetensors shards with model.safetensors.index.json
and transformers' tensor names (one model.safetensors where the whole model fits in one shard,
as for GPT-2 large), and a small byte-level BPE tokenizer (tokenizer.json, trained here on a few
KB of tunelab's demo text) whose ids all fit in the vocabulary, its special tokens given the ids
config.json names. Weights are N(0, 0.02), seeded per tensor name; norm scales are 1 + N(0, 0.02)
(Gemma's, which scale by 1 + w, N(0, 0.02)), so every tensor matters to the output. Shards are
written tensor by tensor: the writer holds one tensor in memory, never a shard.

--scale writes the same families with tiny dimensions, several shards each (tests use these:
the same sharded, bf16 code paths in seconds). Default folder: ~/.cache/tunelab/shapes/<name>
(<name>-scaled with --scale); a folder already written with the same settings is kept.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import struct
import sys
import time
import zlib
from pathlib import Path

import torch

CACHE = Path.home() / ".cache" / "tunelab" / "shapes"
STD = 0.02
SHARD_GB = 4.0  # Mistral-7B: 4 shards of <= 4 GB, as the checkpoint in issue 16

# The hub's config.json of each model, with torch_dtype bfloat16; token ids are our tokenizer's.
CONFIGS: dict[str, dict] = {
    "gpt2-large": dict(
        architectures=["GPT2LMHeadModel"], model_type="gpt2", activation_function="gelu_new",
        attn_pdrop=0.1, embd_pdrop=0.1, resid_pdrop=0.1, initializer_range=0.02,
        layer_norm_epsilon=1e-5, n_ctx=1024, n_embd=1280, n_head=20, n_layer=36,
        n_positions=1024, summary_activation=None, summary_first_dropout=0.1,
        summary_proj_to_labels=True, summary_type="cls_index", summary_use_proj=True,
        tie_word_embeddings=True, vocab_size=50257,
    ),
    "gemma-2b": dict(
        architectures=["GemmaForCausalLM"], model_type="gemma", attention_bias=False,
        attention_dropout=0.0, head_dim=256, hidden_act="gelu_pytorch_tanh",
        hidden_activation="gelu_pytorch_tanh", hidden_size=2048, initializer_range=0.02,
        intermediate_size=16384, max_position_embeddings=8192, num_attention_heads=8,
        num_hidden_layers=18, num_key_value_heads=1, rms_norm_eps=1e-6, rope_scaling=None,
        rope_theta=10000.0, tie_word_embeddings=True, vocab_size=256000,
    ),
    "mistral-7b": dict(
        architectures=["MistralForCausalLM"], model_type="mistral", hidden_act="silu",
        hidden_size=4096, initializer_range=0.02, intermediate_size=14336,
        max_position_embeddings=32768, num_attention_heads=32, num_hidden_layers=32,
        num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096,
        tie_word_embeddings=False, vocab_size=32000,
    ),
}  # fmt: skip

# --scale: the same families with tiny dimensions (head_dim apart from hidden/heads for Gemma,
# grouped-query attention for both, a sliding window shorter than the test sequences).
SCALED: dict[str, dict] = {
    "gpt2-large": dict(n_embd=64, n_head=4, n_layer=3, n_positions=256, n_ctx=256, vocab_size=512),
    "gemma-2b": dict(hidden_size=64, head_dim=32, intermediate_size=256, num_attention_heads=4,
                     num_key_value_heads=1, num_hidden_layers=3, max_position_embeddings=256,
                     vocab_size=512),
    "mistral-7b": dict(hidden_size=128, intermediate_size=448, num_attention_heads=8,
                       num_key_value_heads=2, num_hidden_layers=3, max_position_embeddings=256,
                       sliding_window=16, vocab_size=512),
}  # fmt: skip
SCALED_SHARDS = 3  # a scaled model is split into about this many shards

# Special tokens in id order (the tokenizer gives them ids 0, 1, ...) and which is which.
SPECIALS = {
    "gpt2": (["<|endoftext|>"], dict(bos="<|endoftext|>", eos="<|endoftext|>",
                                     pad="<|endoftext|>", unk="<|endoftext|>")),
    "gemma": (["<pad>", "<eos>", "<bos>", "<unk>"], dict(bos="<bos>", eos="<eos>", pad="<pad>",
                                                         unk="<unk>")),
    "mistral": (["<unk>", "<s>", "</s>"], dict(bos="<s>", eos="</s>", pad="</s>", unk="<unk>")),
}  # fmt: skip
TOKENIZER_VOCAB = 1024  # at most; fewer where the model's vocabulary is smaller


def hf_config(name: str, scale: bool = False) -> dict:
    """The config.json of a shape (scaled down with scale=True), token ids included."""
    if name not in CONFIGS:
        raise SystemExit(f"unknown shape {name!r}; known: {', '.join(CONFIGS)}")
    cfg = {**CONFIGS[name], **(SCALED[name] if scale else {})}
    family = cfg["model_type"]
    order, roles = SPECIALS[family]
    ids = {f"{role}_token_id": order.index(tok) for role, tok in roles.items() if role != "unk"}
    return {**cfg, **ids, "torch_dtype": "bfloat16", "use_cache": True}


# -- tensors: transformers' names and shapes, in the order save_pretrained writes them ----------
def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) of every tensor; init is 'normal', 'norm' (1 + noise) or 'offset'."""
    if cfg["model_type"] == "gpt2":
        e, v, p = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"]
        inner = cfg.get("n_inner") or 4 * e
        specs = [
            ("transformer.wte.weight", (v, e), "normal"),
            ("transformer.wpe.weight", (p, e), "normal"),
        ]
        for i in range(cfg["n_layer"]):
            h = f"transformer.h.{i}."
            specs += [
                (h + "ln_1.weight", (e,), "norm"),
                (h + "ln_1.bias", (e,), "normal"),
                (h + "attn.c_attn.weight", (e, 3 * e), "normal"),  # Conv1D: (in, out)
                (h + "attn.c_attn.bias", (3 * e,), "normal"),
                (h + "attn.c_proj.weight", (e, e), "normal"),
                (h + "attn.c_proj.bias", (e,), "normal"),
                (h + "ln_2.weight", (e,), "norm"),
                (h + "ln_2.bias", (e,), "normal"),
                (h + "mlp.c_fc.weight", (e, inner), "normal"),
                (h + "mlp.c_fc.bias", (inner,), "normal"),
                (h + "mlp.c_proj.weight", (inner, e), "normal"),
                (h + "mlp.c_proj.bias", (e,), "normal"),
            ]
        return specs + [
            ("transformer.ln_f.weight", (e,), "norm"),
            ("transformer.ln_f.bias", (e,), "normal"),
        ]
    d, v, ff = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or d // heads
    norm = "offset" if cfg["model_type"] == "gemma" else "norm"
    specs = [("model.embed_tokens.weight", (v, d), "normal")]
    for i in range(cfg["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        specs += [
            (layer + "input_layernorm.weight", (d,), norm),
            (layer + "mlp.down_proj.weight", (d, ff), "normal"),
            (layer + "mlp.gate_proj.weight", (ff, d), "normal"),
            (layer + "mlp.up_proj.weight", (ff, d), "normal"),
            (layer + "post_attention_layernorm.weight", (d,), norm),
            (layer + "self_attn.k_proj.weight", (kv * hd, d), "normal"),
            (layer + "self_attn.o_proj.weight", (d, heads * hd), "normal"),
            (layer + "self_attn.q_proj.weight", (heads * hd, d), "normal"),
            (layer + "self_attn.v_proj.weight", (kv * hd, d), "normal"),
        ]
    specs.append(("model.norm.weight", (d,), norm))
    if not cfg.get("tie_word_embeddings"):
        specs.append(("lm_head.weight", (v, d), "normal"))
    return specs


def make_tensor(name: str, shape: tuple[int, ...], init: str, seed: int) -> torch.Tensor:
    """A bf16 tensor drawn from its own generator, seeded by (seed, name): order-independent."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
    t = torch.randn(shape, generator=g, dtype=torch.bfloat16).mul_(STD)
    return t.add_(1.0) if init == "norm" else t


def plan_shards(specs, max_bytes: int) -> list[list]:
    """Consecutive tensors into shards of at most max_bytes (a larger tensor gets its own)."""
    shards, size = [[]], 0
    for spec in specs:
        n = math.prod(spec[1]) * 2
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards


def write_safetensors(path: Path, specs, seed: int) -> int:
    """A safetensors file written one tensor at a time (header first); returns the data bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in specs:
        n = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape, init in specs:
            t = make_tensor(name, shape, init, seed)
            f.write(memoryview(t.view(torch.int16).numpy()))  # little-endian, as safetensors
            del t
    return offset


# -- tokenizer -----------------------------------------------------------------------------------
def corpus(seed: int = 0) -> list[str]:
    """A few KB of English we write (tunelab's demo grammar: plots and reviews), seeded."""
    from tunelab.demo.generate import plots, review

    rng = random.Random(seed)
    return plots(12, rng) + [review(i % 2, rng) for i in range(24)]


def write_tokenizer(path: Path, cfg: dict, seed: int = 0) -> None:
    """A byte-level BPE tokenizer.json trained on corpus(), with the family's special tokens
    first (ids 0..), BOS added in front as Llama-style tokenizers do (not for GPT-2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    family = cfg["model_type"]
    order, roles = SPECIALS[family]
    vocab = min(TOKENIZER_VOCAB, cfg["vocab_size"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=order,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(seed), trainer)
    bos = roles["bos"]
    if family == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, order.index(bos))]
        )
    if tok.get_vocab_size() > cfg["vocab_size"]:
        raise SystemExit(f"tokenizer of {tok.get_vocab_size()} ids > vocab {cfg['vocab_size']}")
    tok.save(str(path / "tokenizer.json"))
    config = {f"{role}_token": t for role, t in roles.items()}
    config.update(
        tokenizer_class="PreTrainedTokenizerFast",
        add_bos_token=family != "gpt2",
        add_eos_token=False,
        model_max_length=_max_len(cfg),
        clean_up_tokenization_spaces=False,
    )
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (path / "special_tokens_map.json").write_text(
        json.dumps({f"{role}_token": t for role, t in roles.items()}, indent=2)
    )


def _max_len(cfg: dict) -> int:
    return cfg.get("n_positions") or cfg["max_position_embeddings"]


# -- a whole directory ---------------------------------------------------------------------------
def default_dir(name: str, scale: bool = False) -> Path:
    return CACHE / (f"{name}-scaled" if scale else name)


def write_shape(
    name: str,
    out: str | Path | None = None,
    *,
    scale: bool = False,
    seed: int = 0,
    shard_gb: float = SHARD_GB,
    force: bool = False,
) -> Path:
    """Write (or keep, if already written with these settings) one shape's HF directory."""
    from tunelab.model.checkpoint import atomic_dir

    out = Path(out).expanduser() if out else default_dir(name, scale)
    cfg = hf_config(name, scale)
    specs = tensor_specs(cfg)
    total = sum(math.prod(s[1]) * 2 for s in specs)
    max_bytes = math.ceil(total / SCALED_SHARDS) if scale else int(shard_gb * 1e9)
    stamp = dict(name=name, scale=scale, seed=seed, max_shard_bytes=max_bytes, std=STD, format=1)
    done = out / "shapes.json"
    if not force and done.exists() and json.loads(done.read_text()) == stamp:
        return out
    shards = plan_shards(specs, max_bytes)
    with atomic_dir(out) as tmp:
        tmp.chmod(0o755)  # a shared cache: readable like any downloaded model
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        write_tokenizer(tmp, cfg, seed)
        if len(shards) == 1:
            write_safetensors(tmp / "model.safetensors", shards[0], seed)
        else:
            weight_map = {}
            for k, shard in enumerate(shards, 1):
                file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(tmp / file, shard, seed)
                weight_map.update({spec[0]: file for spec in shard})
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "shapes.json").write_text(json.dumps(stamp, indent=2))
    return out


def n_params(name: str, scale: bool = False) -> int:
    return sum(math.prod(s[1]) for s in tensor_specs(hf_config(name, scale)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=list(CONFIGS), help=", ".join(CONFIGS))
    ap.add_argument("--scale", action="store_true", help="tiny dimensions, several shards")
    ap.add_argument("--out", help="output folder (one name only); default CACHE/NAME")
    ap.add_argument("--cache", default=str(CACHE), help="parent of the shape folders [%(default)s]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gb", type=float, default=SHARD_GB, help="max shard size (full size)")
    ap.add_argument("--force", action="store_true", help="rewrite even if already written")
    a = ap.parse_args(argv)
    if a.out and len(a.names) != 1:
        ap.error("--out takes one shape name")
    for name in a.names:
        t = time.perf_counter()
        out = a.out or Path(a.cache).expanduser() / default_dir(name, a.scale).name
        path = write_shape(
            name, out, scale=a.scale, seed=a.seed, shard_gb=a.shard_gb, force=a.force
        )
        size = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
        print(
            f"{name}{' (scaled)' if a.scale else ''}: {n_params(name, a.scale) / 1e6:,.1f}M "
            f"parameters, {size:,.1f} MiB bf16 in {path} ({time.perf_counter() - t:.1f} s)"
        )


if __name__ == "__main__":
    sys.exit(main())
