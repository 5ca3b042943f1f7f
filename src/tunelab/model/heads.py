"""Heads that read the transformer's hidden states, and the models they make with it."""

from __future__ import annotations

import torch
from torch import nn

from tunelab.errors import ModelError
from tunelab.model.config import ModelConfig
from tunelab.model.transformer import _ACTS, KVCache, Transformer, make_norm


class CausalLM(nn.Module):
    """Transformer + next-token head (tied to the embeddings when the config says so)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = Transformer(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.tok_embed.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V); last_only=True computes them for the final position alone, and a
        boolean (B, T) `select` for the chosen positions only (N, V): the head is a large matmul."""
        h = self.transformer(
            input_ids, attention_mask, position_ids, segment_ids=segment_ids, cache=cache
        )
        if select is not None:
            return self.lm_head(h[select])
        return self.lm_head(h[:, -1:] if last_only else h)


class Pooler(nn.Module):
    """BERT's pooler: tanh(dense(hidden of the first token))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(h[:, 0]))


class MLMHead(nn.Module):
    """BERT's masked-LM head: transform (dense, act, norm), then a decoder tied to the embeddings."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.act = _ACTS[cfg.act]
        self.norm = make_norm(cfg)
        self.decoder = nn.Linear(cfg.d_model, cfg.vocab_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(h))))


class EncoderModel(nn.Module):
    """A bidirectional encoder (BERT, MiniLM) with its pooler and an optional MLM head."""

    def __init__(self, cfg: ModelConfig, mlm: bool = False):
        super().__init__()
        self.cfg = cfg
        self.transformer = Transformer(cfg)
        self.pooler = Pooler(cfg) if cfg.pooler else None
        self.mlm_head = MLMHead(cfg) if mlm else None
        if mlm:
            self.mlm_head.decoder.weight = self.transformer.tok_embed.weight

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """Hidden states (B, T, d); the pooler and mlm_head read them."""
        return self.transformer(input_ids, attention_mask, token_type_ids=token_type_ids)


class SequenceClassifier(nn.Module):
    """A transformer whose pooled hidden state feeds one linear layer over the labels.

    Decoders pool the last real token (GPT2/LlamaForSequenceClassification, no bias); encoders
    the [CLS] pooler or the mean over real tokens, then dropout (BertForSequenceClassification).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not cfg.labels:
            raise ModelError("a classifier needs labels (model config 'labels')")
        self.cfg = cfg
        self.transformer = Transformer(cfg)
        self.pooler = Pooler(cfg) if cfg.pooler else None
        self.dropout = nn.Dropout(cfg.classifier_dropout)
        self.score = nn.Linear(cfg.d_model, len(cfg.labels), bias=not cfg.causal)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """Label logits (B, n_labels); right or left padding give the same result."""
        position_ids = None
        if attention_mask is not None and self.cfg.causal:
            # Left padding: real tokens still start at position 0.
            position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        keep = self.pooled_position(input_ids, attention_mask)
        h = self.transformer(input_ids, attention_mask, position_ids, keep=keep, **kw)
        if keep is not None:  # h is (B, 1, d): the pooled position's hidden state
            pooled = self.pooler(h) if self.pooler is not None else h[:, 0]
        else:
            m = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            m = m[..., None].to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return self.score(self.dropout(pooled))

    def pooled_position(self, input_ids, attention_mask) -> torch.Tensor | None:
        """(B,) the one position each row is pooled from ([CLS] or the last real token), so the
        transformer computes its last block there alone; None for mean pooling."""
        b, t = input_ids.shape
        if self.cfg.pooling == "cls":
            return torch.zeros(b, dtype=torch.long, device=input_ids.device)
        if self.cfg.pooling != "last":
            return None
        if attention_mask is None:
            return torch.full((b,), t - 1, dtype=torch.long, device=input_ids.device)
        positions = torch.arange(t, device=input_ids.device)
        return (attention_mask.long() * positions).argmax(1)


def require_causal(model: nn.Module, what: str) -> None:
    """Encoders and classifiers cannot predict the next token; say so instead of failing deep inside."""
    if isinstance(model, SequenceClassifier):
        raise ModelError(
            f"{what} needs a language model; this is a classifier over {model.cfg.labels}"
        )
    if not model.cfg.causal:
        raise ModelError(
            f"{what} needs a causal (decoder) model; this is a {model.cfg.family} encoder"
        )


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model a config describes: a classifier when it names labels, else an encoder for
    bidirectional configs or a causal LM."""
    if cfg.labels:
        return SequenceClassifier(cfg)
    return CausalLM(cfg) if cfg.causal else EncoderModel(cfg)
