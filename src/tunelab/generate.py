"""Text generation: batched prompts, left padding, a preallocated KV cache, HF-style sampling."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from tunelab.errors import ConfigError
from tunelab.model.heads import require_causal
from tunelab.model.transformer import KVCache
from tunelab.runtime.kernels import decode_kernel, decoding
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
    """New token ids per prompt (ending with the EOS when one stopped the row).

    Prompts are left-padded so every row ends at the same place; a finished row is fed pad_id
    until the others finish, and that padding is not returned.
    """
    require_causal(model, "generation")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ConfigError("empty prompt: give at least one token")
    b, width = len(prompts), max(len(p) for p in prompts)
    if width > model.cfg.max_seq_len:  # rotary models would go on, past what they were taught
        which = f" {[len(p) for p in prompts].index(width) + 1} of {b}" if b > 1 else ""
        raise ConfigError(
            f"prompt{which} is {width} tokens, longer than the model's context "
            f"of {model.cfg.max_seq_len}"
        )
    total = width + s.max_new_tokens
    if total > model.cfg.max_seq_len and model.cfg.pos == "learned":
        raise ConfigError(
            f"prompt + new tokens = {total} exceeds the model's {model.cfg.max_seq_len}"
        )
    # One buffer holds prompt and new tokens (the repetition penalty reads both); one mask too.
    seq = torch.full((b, total), pad_id, dtype=torch.long)
    mask = torch.ones(b, total, dtype=torch.long)
    for i, p in enumerate(prompts):
        seq[i, width - len(p) : width] = torch.tensor(p)
        mask[i, : width - len(p)] = 0
    seq, mask = seq.to(device), mask.to(device)
    padded = any(len(p) < width for p in prompts)
    attention = mask if padded else None  # the model reads only its first (past + new) columns
    positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
    # On CPU, torch's attention kernel runs bf16/fp16 ~6x slower than fp32 (batch 8, 160 keys:
    # 500 vs 71 us); keys and values are kept in fp32 there, exactly as computed.
    half_on_cpu = device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
    cache = KVCache(model.cfg, b, total, device, torch.float32 if half_on_cpu else dtype)
    with decoding(model, b):  # the kernels chosen for decoding when the model was prepared
        return _decode(
            model, s, seq, width, attention, positions, cache, eos_ids, pad_id, tokenizer
        )


def _decode(model, s, seq, width, attention, positions, cache, eos_ids, pad_id, tokenizer):
    """The prefill and the token-by-token loop of generate_ids."""
    b, device = seq.shape[0], seq.device
    generator = torch.Generator(device).manual_seed(s.seed) if s.seed is not None else None
    done = torch.zeros(b, dtype=torch.bool, device=device)
    lengths = torch.zeros(b, dtype=torch.long, device=device)  # real new tokens per row
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    can_stop = bool(eos_ids) or bool(s.stop and tokenizer is not None)
    pad = torch.tensor(pad_id, dtype=torch.long, device=device)
    logits = _last_logits(model, seq[:, :width], attention, positions, cache)
    positions = positions[:, -1:]
    for step in range(s.max_new_tokens):
        token = pick(next_token_scores(logits, seq[:, : width + step], s), s, generator)
        lengths += ~done
        token = torch.where(done, pad, token)
        seq[:, width + step] = token
        if can_stop:
            done = done | torch.isin(token, eos)
            if s.stop and tokenizer is not None:
                done = done | _hit_stop(seq[:, width : width + step + 1], tokenizer, s.stop, device)
            if bool(done.all()):
                break
        if step == s.max_new_tokens - 1:
            break
        positions = positions + 1
        logits = _last_logits(
            model, seq[:, width + step : width + step + 1], attention, positions, cache
        )
    new = seq[:, width:].tolist()
    return [row[:n] for row, n in zip(new, lengths.tolist())]


def _last_logits(model, ids, attention, positions, cache) -> torch.Tensor:
    """(B, V) logits of the last position.

    A linear head decoding on torch's kernel is applied as W @ h.T (a GEMV for one row): with
    decoding's few rows that streams the large vocabulary matrix 1.1-2x faster than F.linear.
    """
    head = model.lm_head
    plain = decode_kernel(head) == "torch" and head.bias is None
    if not plain:  # a wrapped head (LoRA, quantized) or a packed one
        return model(ids, attention, positions, cache=cache, last_only=True)[:, -1]
    h = model.transformer(ids, attention, positions, cache=cache)[:, -1]
    if h.shape[0] == 1:
        return torch.mv(head.weight, h[0])[None]
    return torch.mm(head.weight, h.t()).t()


def _hit_stop(out: torch.Tensor, tokenizer, stop: list[str], device) -> torch.Tensor:
    texts = [tokenizer.decode(row[-16:]) for row in out.tolist()]  # a stop string spans few tokens
    return torch.tensor([any(st in t for st in stop) for t in texts], device=device)


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
        results.append(
            dict(
                text=text,
                new_tokens=len(ids),
                ids=ids,
                tokens_per_s=total_new / seconds if seconds > 0 else 0.0,
                seconds=seconds,
                stopped=bool(ids) and ids[-1] in eos,
            )
        )
    return results
