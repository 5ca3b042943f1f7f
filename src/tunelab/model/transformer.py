"""The one transformer: every family is this module built from a different ModelConfig.

Read it top to bottom: norms, rotary positions, the cache, packed rows and the per-call
layout, attention, MLP, block, the stack.
It knows nothing of LoRA, quantization or losses; those act on it from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tunelab.model.config import ModelConfig
from tunelab.model.varlen import backend_for, nested_offsets, varlen_attention

_ACTS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
# torch >= 2.5 lets SDPA share K/V heads itself; older ones get the heads repeated.
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 as Llama and Gemma do."""

    def __init__(self, dim: int, eps: float, offset: bool = False):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and not self.offset:  # the weight inside the one call
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps=self.eps)
        if self.offset:  # Gemma stores w and scales by (1 + w), in float32
            h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
            return (h * (1.0 + self.weight.float())).type_as(x)
        # bf16/fp16: torch normalises in float32 and rounds once, as Llama's x.float() ... .to()
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


def autocast_dtype(kind: str) -> torch.dtype | None:
    """Autocast's dtype on this device type ("cpu", "cuda") while it is on, else None."""
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def compute_dtype(h: torch.Tensor) -> torch.Tensor:
    """h in autocast's dtype, when autocast is on: the norm's float32 output feeds q, k, v (or
    gate and up) and each layer, and each LoRA beside it, would cast and keep its own copy for
    backward (measured: 1.5x the activations of a bf16 LoRA step). Cast once, the products see
    the same values and share one saved tensor."""
    dtype = autocast_dtype(h.device.type)
    return h.to(dtype) if dtype is not None and h.is_floating_point() else h


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
    return RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_offset)


def rope_inv_freq(head_dim: int, theta: float, device) -> torch.Tensor:
    exps = torch.arange(0, head_dim, 2, device=device).float() / head_dim
    return 1.0 / (theta**exps)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype) -> tuple:
    """cos and signed sin tables for (batch, seq) positions, in the HF 'rotate half' layout.

    HF rotates with cat(-x2, x1) * sin; that equals roll(x, half) * cat(-sin1, sin2), so the
    sign lives in the table, made once per forward, and each layer does one roll (~40% faster
    than slicing and concatenating, same values)."""
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, head_dim), broadcast over heads
    sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)[:, None]
    return emb.cos().to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


class KVCache:
    """Preallocated keys and values per layer, so decoding never reallocates."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.length = 0  # tokens already stored; advanced by Transformer.forward

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple:
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Packed:
    """The real tokens of a padded batch packed into (N, ...), row after row: norms,
    projections and the MLP skip the padding (often a sixth of a dynamically padded batch), and
    attention runs on each row's span of real tokens alone."""

    def __init__(self, attention_mask: torch.Tensor, backend: str = "auto"):
        self.b, self.t = attention_mask.shape
        self.backend = backend  # runtime.attention: how rows attend (model/varlen.py)
        self.index = attention_mask.flatten().nonzero().squeeze(1)
        self.lengths = attention_mask.sum(1).tolist()  # real tokens per row, in packed order
        self.offsets = nested_offsets(self.lengths, attention_mask.device)  # made once: varlen.py

    @staticmethod
    def fits(attention_mask: torch.Tensor, window: int | None) -> bool:
        """Worth packing and exact: padding to skip, each row's real tokens in one run (left or
        right padding), and no sliding window that a row is longer than."""
        m = attention_mask
        if m.dim() != 2 or bool(m.all()) or not (right_padded(m) or right_padded(m.flip(1))):
            return False
        return window is None or int(m.sum(1).max()) <= window

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(self.b * self.t, *x.shape[1:])
        return out.index_copy(0, self.index, x).view(self.b, self.t, *x.shape[1:])


def right_padded(mask: torch.Tensor) -> bool:
    """True when every row of a (B, T) mask is real tokens, then padding."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


@dataclass(frozen=True)
class Layout:
    """How one forward call lays out its tokens, made once by Transformer.forward and handed to
    every block: dense (B, T, d) rows with their `mask` (a bool tensor, "causal" or None) and
    `cache`, or `packed` (N, d), the real tokens alone (see Packed); `rope`: cos and sin for
    that layout, or None; `keep`: (B,) one position per row whose output alone is wanted (the
    last block, when a head reads one position)."""

    mask: torch.Tensor | str | None = None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    cache: KVCache | None = None
    keep: torch.Tensor | None = None
    packed: Packed | None = None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * hd, cfg.d_model, bias=cfg.out_bias)

    def forward(self, x, layout: Layout, layer: int) -> torch.Tensor:
        """layer: this block's index (its slot in the cache). With `layout.keep`, the kept
        positions' queries alone; with `layout.packed`, x holds the real tokens alone (N, d)."""
        if layout.packed is not None:
            return self.forward_packed(x, layout.rope, layout.packed)
        cfg, mask, rope, keep = self.cfg, layout.mask, layout.rope, layout.keep
        xq = x if keep is None else take(x, keep)
        q, k, v = self.q_proj(xq), self.k_proj(x), self.v_proj(x)
        (b, tq, _), t = q.shape, k.shape[1]
        q = q.view(b, tq, cfg.n_head, cfg.head_dim).transpose(1, 2)
        k = k.view(b, t, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        v = v.view(b, t, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        if rope is not None:
            q_rope = rope if keep is None else tuple(take(r, keep, dim=2) for r in rope)
            q, k = apply_rope(q, *q_rope), apply_rope(k, *rope)
        if keep is not None:
            mask = _query_rows(mask, keep, t)
        if layout.cache is not None:
            k, v = layout.cache.update(layer, k, v)
        k, v, extra = self._shared_kv(k, v)
        is_causal = isinstance(mask, str)  # "causal": the fast path without a mask tensor
        y = F.scaled_dot_product_attention(
            q.to(k.dtype), k, v, attn_mask=None if is_causal else mask, is_causal=is_causal, **extra
        ).to(q.dtype)  # a cache may hold fp32 keys for a bf16 model: see generate_ids
        return self.o_proj(y.transpose(1, 2).reshape(b, tq, cfg.n_head * cfg.head_dim))

    def _shared_kv(self, k, v) -> tuple:
        """Grouped-query attention: K/V heads (dim 1) shared by SDPA itself where torch can,
        else repeated; returns k, v and SDPA's extra arguments."""
        cfg = self.cfg
        if cfg.n_kv_head == cfg.n_head:
            return k, v, {}
        if _SDPA_GQA:
            return k, v, {"enable_gqa": True}
        n = cfg.n_head // cfg.n_kv_head
        return k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1), {}

    def forward_packed(self, x, rope, packed: Packed) -> torch.Tensor:
        """Each sequence attends within itself, on its real tokens alone, with no padding
        (model/varlen.py picks how for the device). rope: cos and sin (N, 1, head_dim)."""
        cfg, n = self.cfg, x.shape[0]
        q = self.q_proj(x).view(n, cfg.n_head, cfg.head_dim)
        k = self.k_proj(x).view(n, cfg.n_kv_head, cfg.head_dim)
        v = self.v_proj(x).view(n, cfg.n_kv_head, cfg.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v, extra = self._shared_kv(k, v)
        extra["backend"] = backend_for(x.device, q.dtype, cfg.head_dim, cfg.causal, packed.backend)
        y = varlen_attention(q, k, v, packed.lengths, cfg.causal, offsets=packed.offsets, **extra)
        return self.o_proj(y.reshape(n, cfg.n_head * cfg.head_dim))


def take(x: torch.Tensor, keep: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Position keep[i] of row i along `dim`, kept as a dimension of size 1."""
    x = x.expand(keep.shape[0], *x.shape[1:])  # a mask may broadcast over the batch
    shape = [1] * x.dim()
    shape[0] = -1
    index = keep.view(shape).expand(*x.shape[:dim], 1, *x.shape[dim + 1 :])
    return x.gather(dim, index)


def _query_rows(mask, keep: torch.Tensor, t: int):
    """The mask rows of the kept queries: (B, 1, 1, S), or None."""
    if mask is None:
        return None
    if isinstance(mask, str):  # causal: the kept query sees itself and what precedes it
        return (torch.arange(t, device=keep.device)[None, :] <= keep[:, None])[:, None, None]
    return take(mask, keep, dim=2)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.act = _ACTS[cfg.act]
        self.gated = cfg.mlp in ("swiglu", "geglu")
        if self.gated:
            self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.post_norm = cfg.post_norm
        self.attn_norm, self.attn = make_norm(cfg), Attention(cfg)
        self.mlp_norm, self.mlp = make_norm(cfg), MLP(cfg)
        self.dropout = nn.Dropout(0.0)  # set by training config; identity by default

    def forward(self, x, layout: Layout, layer: int) -> torch.Tensor:
        """With `layout.keep` (B,) positions, the block returns (B, 1, d) for those alone;
        with `layout.packed`, x is (N, d), the real tokens alone (see Packed)."""
        residual = x if layout.keep is None else take(x, layout.keep)
        # no dropout call when it does nothing: decoding runs this 60 times per token
        drop = self.dropout if self.training and self.dropout.p > 0 else _identity
        if self.post_norm:  # BERT: add, then normalise
            x = self.attn_norm(residual + drop(self.attn(x, layout, layer)))
            return self.mlp_norm(x + drop(self.mlp(x)))
        x = residual + drop(self.attn(compute_dtype(self.attn_norm(x)), layout, layer))
        return x + drop(self.mlp(compute_dtype(self.mlp_norm(x))))


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class Transformer(nn.Module):
    """Embeddings, a stack of blocks and the final norm; returns hidden states.

    Heads (LM, classification, MLM) live in heads.py and read these hidden states.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self._inv_freq: torch.Tensor | None = None  # RoPE frequencies, computed on first use
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos == "learned":
            self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        if cfg.type_vocab_size:
            self.type_embed = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        if cfg.post_norm:  # BERT normalises the embeddings; pre-norm models normalise the output
            self.embed_norm = make_norm(cfg)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        if not cfg.post_norm:
            self.norm = make_norm(cfg)
        # Activation checkpointing, set by a training run (train.activation_checkpointing):
        # training keeps each block's input alone and recomputes the block in backward.
        self.checkpoint_blocks = False
        self.attention_backend = "auto"  # runtime.attention, set by runtime.prepare_runtime

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, T, d), or (B, 1, d) at positions `keep` (B,) when a head reads one
        position per row: the last block then computes queries, MLP and norms there alone.

        attention_mask: (B, past+T), 1 for real tokens, or a (B, 1, T, S) bool mask.

        segment_ids (B, T) keep packed documents from attending to each other.
        """
        cfg, (b, t) = self.cfg, input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=input_ids.device).expand(b, t)
        x = self.tok_embed(input_ids)
        if cfg.embed_scale:
            x = x * torch.tensor(math.sqrt(cfg.d_model), dtype=x.dtype)
        if cfg.pos == "learned":
            x = x + self.pos_embed(position_ids)
        if cfg.type_vocab_size:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            x = x + self.type_embed(types)
        if cfg.post_norm:
            x = self.embed_norm(x)
        rope = None
        if cfg.pos == "rope":
            if self._inv_freq is None or self._inv_freq.device != x.device:
                # a plain attribute, not a buffer: meta-device loading would leave a buffer empty
                self._inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, x.device)
            rope = rope_cos_sin(position_ids, self._inv_freq, x.dtype)
        window = cfg.sliding_window if cfg.causal else None
        packs = cache is None and segment_ids is None and attention_mask is not None
        if packs and Packed.fits(attention_mask, window):
            packed = Packed(attention_mask, self.attention_backend)
            x = packed.pack(x)
            packed_rope = None
            if rope is not None:
                packed_rope = tuple(packed.pack(r.squeeze(1))[:, None] for r in rope)
            layout = Layout(rope=packed_rope, packed=packed)
        else:
            mask = self.build_mask(attention_mask, segment_ids, past, t, x.device)
            layout = Layout(mask=mask, rope=rope, cache=cache)
        last = len(self.layers) - 1
        recompute = self.checkpoint_blocks and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.layers):
            if i == last and keep is not None:
                if layout.packed is not None:
                    # the last block computes the `keep` rows alone, at their (B, T) places
                    x = layout.packed.unpack(x)
                    mask = self.build_mask(attention_mask, segment_ids, past, t, x.device)
                    layout = Layout(mask=mask, rope=rope, cache=cache)
                layout = replace(layout, keep=keep)
            # checkpointed: backward runs the block again (same dropout: RNG state restored)
            if recompute:
                x = checkpoint(block, x, layout, i, use_reentrant=False)
            else:
                x = block(x, layout, i)
        if layout.packed is not None:
            x = layout.packed.unpack(x)
        if cache is not None:
            cache.length += t
        return x if cfg.post_norm else self.norm(x)

    def build_mask(self, attention_mask, segment_ids, past: int, t: int, device):
        """A boolean (B, 1, T, S) mask, 'causal' for SDPA's fast path, or None.

        `attention_mask` is (B, S) with 1 for real tokens, or a ready (B, 1, T, S) boolean mask
        (DPO's tree-shaped rows), which is used as is."""
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask.bool()
        cfg, s = self.cfg, past + t
        window = cfg.sliding_window if cfg.causal else None
        if cfg.causal and past == 0 and attention_mask is not None and right_padded(attention_mask):
            attention_mask = None  # causal attention never reaches a pad placed after the text
        simple = attention_mask is None and segment_ids is None and (window is None or s <= window)
        if simple:
            if not cfg.causal or t == 1:
                return None
            if past == 0:
                return "causal"
        q_pos = torch.arange(past, s, device=device)[:, None]
        k_pos = torch.arange(s, device=device)[None, :]
        allowed = (
            (k_pos <= q_pos) if cfg.causal else torch.ones(t, s, dtype=torch.bool, device=device)
        )
        if window is not None:
            allowed = allowed & (q_pos - k_pos < window)
        allowed = allowed[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :s].bool()
        if segment_ids is not None:
            allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
        # A padding query that may see nothing would give NaN; let every query see itself.
        return allowed | (q_pos == k_pos)[None, None]
