"""Weight-name maps between Hugging Face checkpoints and tunelab, per family.

Each family is a table of (HF name, tunelab name) patterns; GPT-2 also needs its Conv1D
weights transposed and its fused q/k/v split. Nothing here touches the model code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from tunelab.errors import ModelError
from tunelab.model.config import ModelConfig

_L = "transformer.layers.{i}."
_LLAMA = [
    ("model.embed_tokens.weight", "transformer.tok_embed.weight"),
    ("model.norm.weight", "transformer.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("model.layers.{i}.input_layernorm.weight", _L + "attn_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", _L + "mlp_norm.weight"),
] + [
    (f"model.layers.{{i}}.self_attn.{p}.{w}", _L + f"attn.{p}.{w}")
    for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    for w in ("weight", "bias")
] + [
    (f"model.layers.{{i}}.mlp.{p}.{w}", _L + f"mlp.{p}.{w}")
    for p in ("gate_proj", "up_proj", "down_proj")
    for w in ("weight", "bias")
]  # fmt: skip

_GPT2 = [
    ("transformer.wte.weight", "transformer.tok_embed.weight"),
    ("transformer.wpe.weight", "transformer.pos_embed.weight"),
    ("lm_head.weight", "lm_head.weight"),
] + [
    (f"transformer.{hf}.{w}", f"transformer.{ours}.{w}")
    for hf, ours in [("ln_f", "norm"), ("h.{i}.ln_1", "layers.{i}.attn_norm"),
                     ("h.{i}.ln_2", "layers.{i}.mlp_norm"), ("h.{i}.attn.c_proj", "layers.{i}.attn.o_proj"),
                     ("h.{i}.mlp.c_fc", "layers.{i}.mlp.up_proj"), ("h.{i}.mlp.c_proj", "layers.{i}.mlp.down_proj")]
    for w in ("weight", "bias")
]  # fmt: skip

_BERT_PAIRS = [
    ("embeddings.word_embeddings", "transformer.tok_embed"),
    ("embeddings.position_embeddings", "transformer.pos_embed"),
    ("embeddings.token_type_embeddings", "transformer.type_embed"),
    ("embeddings.LayerNorm", "transformer.embed_norm"),
    ("encoder.layer.{i}.attention.self.query", _L + "attn.q_proj"),
    ("encoder.layer.{i}.attention.self.key", _L + "attn.k_proj"),
    ("encoder.layer.{i}.attention.self.value", _L + "attn.v_proj"),
    ("encoder.layer.{i}.attention.output.dense", _L + "attn.o_proj"),
    ("encoder.layer.{i}.attention.output.LayerNorm", _L + "attn_norm"),
    ("encoder.layer.{i}.intermediate.dense", _L + "mlp.up_proj"),
    ("encoder.layer.{i}.output.dense", _L + "mlp.down_proj"),
    ("encoder.layer.{i}.output.LayerNorm", _L + "mlp_norm"),
    ("pooler.dense", "pooler.dense"),
]
_BERT = [(f"bert.{hf}.{w}", f"{ours}.{w}") for hf, ours in _BERT_PAIRS for w in ("weight", "bias")]
_BERT += [
    (f"cls.predictions.{hf}", f"mlm_head.{ours}")
    for hf, ours in [("transform.dense.weight", "dense.weight"), ("transform.dense.bias", "dense.bias"),
                     ("transform.LayerNorm.weight", "norm.weight"), ("transform.LayerNorm.bias", "norm.bias"),
                     ("decoder.weight", "decoder.weight"), ("bias", "decoder.bias")]
]  # fmt: skip

# Classification heads: HF decoders call theirs `score`, BERT `classifier`; ours is `score`.
_SCORE = [("score.weight", "score.weight")]
_CLASSIFIER = [("classifier.weight", "score.weight"), ("classifier.bias", "score.bias")]

TABLES = {
    "llama": _LLAMA + _SCORE,
    "mistral": _LLAMA + _SCORE,
    "qwen2": _LLAMA + _SCORE,
    "gemma": _LLAMA + _SCORE,
    "gpt2": _GPT2 + _SCORE,
    "bert": _BERT + _CLASSIFIER,
}
# Buffers and aliases that HF checkpoints carry and tunelab recomputes or ties.
_IGNORED = re.compile(
    r"(\.attn\.(masked_)?bias$|position_ids$|rotary_emb\.inv_freq$|cls\.predictions\.decoder\.bias$)"
)
_CONV1D = re.compile(r"\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")


def _compile(table):
    """Regexes from HF names to tunelab names and back, with {i} as the layer index."""

    def rx(p):
        return re.compile("^" + re.escape(p).replace(r"\{i\}", r"(?P<i>\d+)") + "$")

    return [(rx(hf), ours, rx(ours), hf) for hf, ours in table]


_COMPILED = {family: _compile(table) for family, table in TABLES.items()}


def _rename(name: str, pairs, forward: bool) -> str | None:
    for hf_rx, ours, ours_rx, hf in pairs:
        src, dst = (hf_rx, ours) if forward else (ours_rx, hf)
        m = src.match(name)
        if m:
            return dst.format(**m.groupdict())
    return None


def _canonical_hf(name: str, family: str) -> str:
    """Give bare-model checkpoints (no 'model.'/'transformer.'/'bert.' prefix) the full name."""
    prefix = {"gpt2": "transformer.", "bert": "bert."}.get(family, "model.")
    if family == "bert" and name.startswith(("cls.", "classifier.")):
        return name
    if name.startswith(prefix) or name in ("lm_head.weight", "score.weight"):
        return name
    return prefix + name


def hf_names(raw: str, cfg: ModelConfig) -> list[str]:
    """The tunelab names one HF tensor becomes: none (ignored), one, or three (GPT-2's q/k/v)."""
    name = _canonical_hf(raw.replace(".gamma", ".weight").replace(".beta", ".bias"), cfg.family)
    if _IGNORED.search(name):
        return []
    m = re.match(r"^transformer\.h\.(\d+)\.attn\.c_attn\.(weight|bias)$", name)
    if m:
        i, kind = m.groups()
        return [f"transformer.layers.{i}.attn.{p}.{kind}" for p in ("q_proj", "k_proj", "v_proj")]
    ours = _rename(name, _COMPILED[cfg.family], forward=True)
    if ours is None:
        raise ModelError(f"checkpoint tensor {raw!r} has no place in a {cfg.family} model")
    if cfg.tie_embeddings and ours == "lm_head.weight":
        return []  # tied: the embedding is the head
    return [ours]


def hf_tensor(raw: str, tensor: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """(tunelab name, tensor) pairs for one HF tensor; GPT-2's Conv1D is transposed and split.

    The transposed and split tensors are views, not copies: a weight used in the dtype it is
    stored in stays on the file's mapping (a (out, in) view of HF's (in, out) bytes is what
    F.linear reads best anyway), and a converted one is made contiguous as it is cast."""
    names = hf_names(raw, cfg)
    if cfg.family == "gpt2" and _CONV1D.search(_canonical_hf(raw, cfg.family)):
        tensor = tensor.t()  # HF's GPT-2 Conv1D stores (in, out)
    if len(names) == 3:
        return list(zip(names, tensor.chunk(3, dim=0)))
    return [(n, tensor) for n in names]


def hf_shapes(raw: str, shape: tuple, cfg: ModelConfig) -> dict[str, tuple]:
    """The shapes hf_tensor will give, from the stored shape alone (nothing read)."""
    names = hf_names(raw, cfg)
    if cfg.family == "gpt2" and _CONV1D.search(_canonical_hf(raw, cfg.family)):
        shape = tuple(shape[::-1])
    return {n: (shape[0] // len(names), *shape[1:]) for n in names}


def tunelab_to_hf(tensors: Iterable[tuple[str, torch.Tensor]], cfg: ModelConfig):
    """The inverse of hf_tensor, as the tensors come: (transformers name, tensor) pairs. Only
    GPT-2's q/k/v wait for each other (one fused c_attn), so no more than a layer is held."""
    pairs, qkv = _COMPILED[cfg.family], {}
    for name, tensor in tensors:
        if cfg.tie_embeddings and name in ("lm_head.weight", "mlm_head.decoder.weight"):
            continue
        m = re.match(r"^transformer\.layers\.(\d+)\.attn\.([qkv])_proj\.(weight|bias)$", name)
        if cfg.family == "gpt2" and m:
            parts = qkv.setdefault((m[1], m[3]), {})
            parts[m[2]] = tensor
            if len(parts) == 3:
                fused = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
                del qkv[(m[1], m[3])]
                yield (
                    f"transformer.h.{m[1]}.attn.c_attn.{m[3]}",
                    fused.t().contiguous() if m[3] == "weight" else fused,
                )
            continue
        hf = _rename(name, pairs, forward=False)
        if hf is None:
            raise ModelError(f"tensor {name!r} has no transformers name for family {cfg.family}")
        yield hf, tensor.t().contiguous() if cfg.family == "gpt2" and _CONV1D.search(hf) else tensor
    if qkv:
        raise ModelError(f"GPT-2 attention {sorted(qkv)} lacks some of q/k/v_proj")


def to_hf_config(cfg: ModelConfig) -> dict:
    """A transformers config.json dict for this model (a *ForSequenceClassification with labels)."""
    hf = _to_hf_config(cfg)
    if cfg.labels:
        base = hf["architectures"][0].removesuffix("LMHeadModel").removesuffix("ForCausalLM")
        hf["architectures"] = [base.removesuffix("Model") + "ForSequenceClassification"]
        hf["id2label"] = dict(enumerate(cfg.labels))
        hf["label2id"] = {name: i for i, name in enumerate(cfg.labels)}
        if not cfg.causal:
            hf["classifier_dropout"] = cfg.classifier_dropout
    return hf


def _to_hf_config(cfg: ModelConfig) -> dict:
    ids = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    act = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[cfg.act]
    if cfg.family == "gpt2":
        return dict(
            model_type="gpt2",
            architectures=["GPT2LMHeadModel"],
            vocab_size=cfg.vocab_size,
            n_positions=cfg.max_seq_len,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_inner=cfg.d_ff,
            activation_function="gelu_new" if cfg.act == "gelu_tanh" else cfg.act,
            layer_norm_epsilon=cfg.norm_eps,
            tie_word_embeddings=cfg.tie_embeddings,
            **ids,
        )
    if cfg.family == "bert":
        return dict(
            model_type="bert",
            architectures=["BertModel"],
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.d_model,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            intermediate_size=cfg.d_ff,
            hidden_act=act if cfg.act != "gelu_tanh" else "gelu_new",
            max_position_embeddings=cfg.max_seq_len,
            type_vocab_size=cfg.type_vocab_size,
            layer_norm_eps=cfg.norm_eps,
            **ids,
        )
    arch = {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "gemma": "GemmaForCausalLM",
    }[cfg.family]
    out = dict(
        model_type=cfg.family,
        architectures=[arch],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_act=act,
        hidden_activation=act,
        **ids,
    )
    if cfg.family in ("llama", "mistral"):
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    if cfg.family in ("mistral", "qwen2"):
        out.update(
            sliding_window=cfg.sliding_window, use_sliding_window=cfg.sliding_window is not None
        )
    return out
