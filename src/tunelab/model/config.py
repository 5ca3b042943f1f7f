"""One ModelConfig for every family; families differ only in these fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tunelab.errors import ConfigError, ModelError, closest


@dataclass
class ModelConfig:
    """Everything needed to build a transformer; presets and HF configs map onto it."""

    family: str = "llama"  # gpt2 | llama | mistral | qwen2 | gemma | bert: picks the weight map
    vocab_size: int = 32000
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int | None = None  # < n_head means grouped-query attention
    d_model: int = 128
    d_ff: int = 512
    head_dim: int | None = None  # Gemma sets it apart from d_model / n_head
    max_seq_len: int = 2048
    pos: str = "rope"  # rope | learned
    rope_theta: float = 10000.0
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5
    norm_offset: bool = False  # Gemma scales by (1 + w)
    post_norm: bool = False  # BERT normalises after the residual add
    mlp: str = "swiglu"  # swiglu | geglu | gelu
    act: str = "silu"  # silu | gelu | gelu_tanh
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    causal: bool = True
    embed_scale: bool = False  # Gemma multiplies embeddings by sqrt(d_model)
    type_vocab_size: int = 0  # BERT's token-type (segment) embeddings
    pooler: bool = False  # BERT's tanh pooler over the first token
    sliding_window: int | None = None  # Mistral: attend to at most this many past tokens
    labels: list[str] = field(default_factory=list)  # set: a sequence classifier over these
    pooling: str = "last"  # classifier input: last (real) token, cls (BERT pooler) or mean
    classifier_dropout: float = 0.1
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # untouched HF fields kept for export

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.d_model // self.n_head
        if self.n_head % self.n_kv_head:
            raise ConfigError(
                f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}"
            )
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"model.{key}={getattr(self, key)!r}: expected one of {allowed}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Build from a dict, naming any unknown key and the closest valid one."""
        names = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in names:
                raise ConfigError(f"unknown model config key {key!r}{closest(key, names)}")
        return cls(**data)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


_CHOICES = {
    "family": ("gpt2", "llama", "mistral", "qwen2", "gemma", "bert"),
    "pos": ("rope", "learned"),
    "norm": ("rmsnorm", "layernorm"),
    "mlp": ("swiglu", "geglu", "gelu"),
    "act": ("silu", "gelu", "gelu_tanh"),
    "pooling": ("last", "cls", "mean"),
}

# Tiny shapes for tests and from-scratch runs; real models come from their config.json.
PRESETS: dict[str, dict] = {
    "gpt2-tiny": dict(
        family="gpt2", vocab_size=50257, n_layer=4, n_head=4, d_model=256, d_ff=1024,
        max_seq_len=512, pos="learned", norm="layernorm", mlp="gelu", act="gelu_tanh",
        qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True,
    ),
    "gpt2-small": dict(
        family="gpt2", vocab_size=50257, n_layer=12, n_head=12, d_model=768, d_ff=3072,
        max_seq_len=1024, pos="learned", norm="layernorm", mlp="gelu", act="gelu_tanh",
        qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True,
    ),
    "llama-tiny": dict(
        family="llama", vocab_size=32000, n_layer=4, n_head=8, n_kv_head=2, d_model=256,
        d_ff=688, max_seq_len=1024,
    ),
}  # fmt: skip


def preset(name: str, **overrides) -> ModelConfig:
    """A named architecture preset, e.g. 'gpt2-tiny', with field overrides."""
    if name not in PRESETS:
        raise ModelError(
            f"unknown architecture {name!r}{closest(name, PRESETS)}; known: {', '.join(PRESETS)}"
        )
    return ModelConfig(**{**PRESETS[name], **overrides})


def _hf_get(hf: dict, *keys, default=None):
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    return default


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ModelError(f"rope scaling {kind!r} is not supported yet (only plain RoPE)")
    return float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)


def from_hf_config(hf: dict) -> ModelConfig:
    """Map a transformers config.json dict onto ModelConfig (a classifier for *ForSequenceClassification)."""
    cfg = _from_hf_config(hf)
    if any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or []):
        id2label = hf.get("id2label") or {
            str(i): f"LABEL_{i}" for i in range(hf.get("num_labels", 2))
        }
        cfg.labels = [id2label[k] for k in sorted(id2label, key=int)]
        cfg.pooling = "last" if cfg.causal else "cls"
        dropout = hf.get("classifier_dropout")
        dropout = hf.get("hidden_dropout_prob", 0.1) if dropout is None else dropout
        cfg.classifier_dropout = 0.0 if cfg.causal else dropout  # HF decoders have none
    return cfg


def _from_hf_config(hf: dict) -> ModelConfig:
    kind = hf.get("model_type", "")
    common = dict(
        vocab_size=hf["vocab_size"],
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )
    if kind == "gpt2":
        return ModelConfig(
            family="gpt2",
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            d_model=hf["n_embd"],
            d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
            max_seq_len=hf["n_positions"],
            pos="learned",
            norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            mlp="gelu",
            act=_act(hf.get("activation_function", "gelu_new")),
            qkv_bias=True,
            out_bias=True,
            mlp_bias=True,
            tie_embeddings=hf.get("tie_word_embeddings", True),
            **common,
        )
    if kind == "bert":
        return ModelConfig(
            family="bert",
            n_layer=hf["num_hidden_layers"],
            n_head=hf["num_attention_heads"],
            d_model=hf["hidden_size"],
            d_ff=hf["intermediate_size"],
            max_seq_len=hf["max_position_embeddings"],
            pos="learned",
            norm="layernorm",
            norm_eps=hf.get("layer_norm_eps", 1e-12),
            post_norm=True,
            mlp="gelu",
            act=_act(hf.get("hidden_act", "gelu")),
            qkv_bias=True,
            out_bias=True,
            mlp_bias=True,
            tie_embeddings=True,
            causal=False,
            type_vocab_size=hf.get("type_vocab_size", 2),
            pooler=True,
            **common,
        )
    if kind in ("llama", "mistral", "qwen2", "gemma"):
        n_head = hf["num_attention_heads"]
        act = _act(hf.get("hidden_activation") or hf.get("hidden_act", "silu"))
        return ModelConfig(
            family=kind,
            n_layer=hf["num_hidden_layers"],
            n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head,
            d_model=hf["hidden_size"],
            d_ff=hf["intermediate_size"],
            head_dim=hf.get("head_dim"),
            max_seq_len=hf.get("max_position_embeddings", 2048),
            pos="rope",
            rope_theta=_rope_theta(hf),
            norm="rmsnorm",
            norm_eps=_hf_get(hf, "rms_norm_eps", default=1e-6),
            norm_offset=kind == "gemma",
            mlp="geglu" if kind == "gemma" else "swiglu",
            act=act,
            qkv_bias=kind == "qwen2" or bool(hf.get("attention_bias")),
            out_bias=bool(hf.get("attention_bias")),
            mlp_bias=bool(hf.get("mlp_bias")),
            tie_embeddings=hf.get("tie_word_embeddings", kind == "gemma"),
            embed_scale=kind == "gemma",
            sliding_window=hf.get("sliding_window")
            if hf.get("use_sliding_window", kind == "mistral")
            else None,
            **common,
        )
    supported = "gpt2, llama (SmolLM2, Llama), mistral (Zephyr), qwen2, gemma, bert (MiniLM)"
    raise ModelError(
        f"unsupported architecture {kind or hf.get('architectures')!r}; supported: {supported}"
    )


def _act(name: str) -> str:
    table = {
        "silu": "silu",
        "swish": "silu",
        "gelu": "gelu",
        "gelu_new": "gelu_tanh",
        "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_fast": "gelu_tanh",
    }
    if name not in table:
        raise ModelError(f"unsupported activation {name!r}; supported: {', '.join(table)}")
    return table[name]
