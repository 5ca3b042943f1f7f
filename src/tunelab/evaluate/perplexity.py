"""Perplexity with a sliding window, computed as the transformers docs do it.

Each window of `window` tokens scores only the tokens the previous window did not,
so every token is predicted once, with up to window - stride tokens of context.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from tunelab.data.templates import IGNORE
from tunelab.errors import DataError
from tunelab.model.heads import require_causal


def read_texts(paths: list[str | Path]) -> str:
    """The text of files (or every .txt/.md file in folders), joined by blank lines."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".md"))
        elif p.exists():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or directory")
    if not files:
        raise DataError(f"{', '.join(map(str, paths))}: no .txt or .md files found")
    parts = []
    for f in files:
        try:
            parts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            line = f.read_bytes()[: e.start].count(b"\n") + 1
            raise DataError(f"{f}:{line}: not valid UTF-8 ({e.reason})") from None
    text = "\n\n".join(parts)
    if not text.strip():
        raise DataError(f"{files[0]}: empty text")
    return text


@torch.inference_mode()
def perplexity_of_ids(model, ids: list[int], window: int, stride: int, batch_size: int = 4) -> dict:
    """Sliding-window perplexity of one token sequence; windows are batched for speed."""
    require_causal(model, "perplexity")
    if window < 2:
        raise DataError(f"window must be at least 2 tokens (one to predict from), got {window}")
    if model.cfg.pos == "learned" and window > model.cfg.max_seq_len:
        raise DataError(f"window {window} exceeds the model's {model.cfg.max_seq_len} positions")
    if stride < 1 or stride > window:
        raise DataError(f"stride must be in 1..window ({window}), got {stride}")
    if len(ids) < 2:
        raise DataError(f"need at least 2 tokens to measure perplexity, got {len(ids)}")
    device = next(model.parameters()).device
    spans, prev_end = [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        spans.append((begin, end, end - prev_end))  # score the last (end - prev_end) tokens
        prev_end = end
        if end == len(ids):
            break
    nll, count = 0.0, 0
    for i in range(0, len(spans), batch_size):
        group = spans[i : i + batch_size]
        width = max(e - b for b, e, _ in group)
        x = torch.zeros(len(group), width, dtype=torch.long)
        labels = torch.full((len(group), width), IGNORE, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, (b, e, n_new) in enumerate(group):
            x[row, : e - b] = torch.tensor(ids[b:e])
            mask[row, : e - b] = 1
            labels[row, e - b - n_new : e - b] = x[row, e - b - n_new : e - b]
        padded = bool((mask == 0).any())
        logits = model(x.to(device), mask.to(device) if padded else None).float()
        targets = labels[:, 1:].to(device)  # the first token of a window has no prediction
        # (N, V) rows: the (B, V, T) layout takes a log-softmax path that loses ~1e-4 in fp32.
        flat = logits[:, :-1].reshape(-1, logits.shape[-1])
        losses = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
        nll += losses.item()
        count += int((targets != IGNORE).sum())
    return {
        "perplexity": math.exp(nll / count),
        "nll": nll / count,
        "tokens": count,
        "window": window,
        "stride": stride,
    }


def perplexity(
    model,
    tokenizer,
    text: str,
    window: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
) -> dict:
    """Perplexity of text (its first max_tokens tokens); window defaults to min(1024, context)."""
    window = window or min(1024, model.cfg.max_seq_len)
    stride = stride or max(1, window // 2)
    ids = tokenizer.encode(text)
    return perplexity_of_ids(model, ids[:max_tokens] if max_tokens else ids, window, stride)
