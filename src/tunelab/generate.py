"""Text generation: batched prompts, left padding, a preallocated KV cache, HF-style sampling."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from tunelab.errors import ConfigError
from tunelab.model.heads import require_causal
from tunelab.model.transformer import KVCache
from tunelab.tokenizer.tokenizer import Tokenizer


@dataclass
class Sampling:
    """How to pick each next token; temperature 0 means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ConfigError("need temperature >= 0, 0 < top_p <= 1 and repetition_penalty > 0")


def next_token_scores(logits: torch.Tensor, seen: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Apply repetition penalty, temperature, top-k and top-p in transformers' order."""
    logits = logits.float()
    if s.repetition_penalty != 1.0:
        prev = logits.gather(1, seen)
        prev = torch.where(prev < 0, prev * s.repetition_penalty, prev / s.repetition_penalty)
        logits = logits.scatter(1, seen, prev)
    if s.temperature == 0:
        return logits
    logits = logits / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > s.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    return logits


def pick(scores: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    if s.temperature == 0:
        return scores.argmax(-1)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_ids(
    model, prompts: list[list[int]], s: Sampling, eos_ids: set[int], pad_id: int, tokenizer=None
) -> list[list[int]]:
    """New token ids per prompt. Prompts are left-padded so every row ends at the same place."""
    require_causal(model, "generation")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    b, width = len(prompts), max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ConfigError("empty prompt: give at least one token")
    ids = torch.full((b, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(b, width, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, device=device)
        mask[i, width - len(p) :] = 1
    padded = bool((mask == 0).any())
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    total = width + s.max_new_tokens
    if total > model.cfg.max_seq_len and model.cfg.pos == "learned":
        raise ConfigError(
            f"prompt + new tokens = {total} exceeds the model's {model.cfg.max_seq_len}"
        )
    cache = KVCache(model.cfg, b, total, device, dtype)
    generator = torch.Generator(device).manual_seed(s.seed) if s.seed is not None else None
    seen, out = ids, torch.empty(b, 0, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    logits = model(ids, mask if padded else None, positions, cache=cache, last_only=True)[:, -1]
    for step in range(s.max_new_tokens):
        token = pick(next_token_scores(logits, seen, s), s, generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        out = torch.cat([out, token[:, None]], 1)
        seen = torch.cat([seen, token[:, None]], 1)
        done = done | torch.isin(token, eos)
        if s.stop and tokenizer is not None:
            done = done | _hit_stop(out, tokenizer, s.stop, device)
        if bool(done.all()) or step == s.max_new_tokens - 1:
            break
        positions = positions[:, -1:] + 1
        if padded:
            mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=device)], 1)
        logits = model(
            token[:, None], mask if padded else None, positions, cache=cache, last_only=True
        )[:, -1]
    return [_trim(row, eos_ids) for row in out.tolist()]


def _hit_stop(out: torch.Tensor, tokenizer, stop: list[str], device) -> torch.Tensor:
    texts = [tokenizer.decode(row[-16:]) for row in out.tolist()]  # a stop string spans few tokens
    return torch.tensor([any(st in t for st in stop) for t in texts], device=device)


def _trim(row: list[int], eos_ids: set[int]) -> list[int]:
    """Drop everything after the first EOS (kept, so callers can see the model stopped)."""
    for i, t in enumerate(row):
        if t in eos_ids:
            return row[: i + 1]
    return row


def eos_ids_of(model, tokenizer: Tokenizer) -> set[int]:
    ids = model.cfg.eos_token_id
    found = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_id is not None:
        found.add(tokenizer.eos_id)
    return found


def generate(
    model, tokenizer: Tokenizer, prompts: list[str], s: Sampling | None = None, chat: bool = False
) -> list[dict]:
    """Generate for each prompt; returns text, new token count, and tokens/s for the batch."""
    s = s or Sampling()
    if chat:
        encoded = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    else:
        encoded = tokenizer.encode_batch(prompts)
    return generate_from_ids(model, tokenizer, encoded, s)


def generate_from_ids(
    model, tokenizer: Tokenizer, encoded: list[list[int]], s: Sampling
) -> list[dict]:
    eos = eos_ids_of(model, tokenizer)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else min(eos) if eos else 0
    start = time.perf_counter()
    outputs = generate_ids(model, encoded, s, eos, pad, tokenizer)
    seconds = time.perf_counter() - start
    total_new = sum(len(o) for o in outputs)
    results = []
    for ids in outputs:
        text = tokenizer.decode(ids)
        for st in s.stop:
            text = text.split(st)[0] if st in text else text
        results.append(dict(text=text, new_tokens=len(ids), ids=ids,
                            tokens_per_s=total_new / seconds if seconds > 0 else 0.0,
                            seconds=seconds, stopped=bool(ids) and ids[-1] in eos))  # fmt: skip
    return results
