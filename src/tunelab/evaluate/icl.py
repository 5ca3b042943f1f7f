"""Classification by prompting alone: each label's verbalizer scored as the continuation of a
prompt, zero-shot or with k demonstrations drawn by seed and balanced by label.

A label's score is the sum of its tokens' log-probabilities, so multi-token labels are
compared fairly with single-token ones only when the user picks comparable verbalizers.
"""

from __future__ import annotations

import random

import torch

from tunelab.errors import ConfigError
from tunelab.evaluate.classification import metrics
from tunelab.model.heads import require_causal

DEFAULT_TEMPLATE = "Text: {text}\nLabel:"


def verbalizers(tokenizer, labels: list[str]) -> list[list[int]]:
    """Token ids of ' label' for each label (the space a prompt ending in ':' is followed by)."""
    out = [tokenizer.encode(" " + name, add_special_tokens=False) for name in labels]
    for name, ids in zip(labels, out):
        if not ids:
            raise ConfigError(f"label {name!r} encodes to no tokens")
    return out


@torch.no_grad()
def label_log_probs(
    model, prompt_ids: list[int], verbs: list[list[int]], prefix=None
) -> list[float]:
    """Sum of log p(verbalizer tokens | prompt) per label: one forward for the first tokens,
    one more per multi-token label. `prefix` (a KVCache holding shared demonstrations) is
    reused as the context before prompt_ids instead of being recomputed."""
    device = next(model.parameters()).device
    start = prefix.length if prefix is not None else 0

    def run(ids: list[int], **kw):
        if prefix is not None:
            prefix.length = start  # drop what the previous example appended
        return model(torch.tensor([ids], device=device), cache=prefix, **kw)[0].float()

    first = run(prompt_ids, last_only=True)[-1].log_softmax(-1)
    scores = []
    for verb in verbs:
        score = float(first[verb[0]])
        if len(verb) > 1:
            logp = run(prompt_ids + verb[:-1])[len(prompt_ids) :].log_softmax(-1)
            score += float(logp.gather(1, torch.tensor(verb[1:], device=device)[:, None]).sum())
        scores.append(score)
    if prefix is not None:
        prefix.length = start  # leave the cache holding only the demonstrations
    return scores


@torch.no_grad()
def prefix_cache(model, ids: list[int], room: int):
    """A KV cache holding the demonstrations, with room for an example and its label after."""
    from tunelab.model.transformer import KVCache

    param = next(model.parameters())
    cache = KVCache(model.cfg, 1, len(ids) + room, param.device, param.dtype)
    model(torch.tensor([ids], device=param.device), cache=cache, last_only=True)
    return cache


def demonstrations(records: list[dict], gold: list[int], k: int, seed: int) -> list[int]:
    """k record indices, labels as balanced as k allows (round-robin), order shuffled by seed."""
    rng = random.Random(seed)
    by_label: dict[int, list[int]] = {}
    for i, g in enumerate(gold):
        by_label.setdefault(g, []).append(i)
    for pool in by_label.values():
        rng.shuffle(pool)
    picked, labels = [], sorted(by_label)
    while len(picked) < k and any(by_label.values()):
        for label in labels:
            if by_label[label] and len(picked) < k:
                picked.append(by_label[label].pop())
    rng.shuffle(picked)
    return picked


def _clip(tokenizer, text: str, max_tokens: int) -> str:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def evaluate_icl(model, tokenizer, records: list[dict], gold: list[int], labels: list[str],
                 shots: list[int], *, demo_records: list[dict] | None = None,
                 demo_gold: list[int] | None = None, template: str = DEFAULT_TEMPLATE,
                 text_field: str = "text", seed: int = 0, max_text_tokens: int = 256,
                 progress=None) -> dict:  # fmt: skip
    """{"shots": {"k": metrics}} for each k; demonstrations come from demo_records (a pool kept
    apart from the scored records), the same for every scored example."""
    require_causal(model, "prompting")
    model.eval()
    verbs = verbalizers(tokenizer, labels)
    pool, pool_gold = demo_records or [], demo_gold or []
    results = {}
    for k in shots:
        if k > len(pool):
            raise ConfigError(f"{k}-shot needs {k} demonstrations; the pool has {len(pool)}")
        demo = "".join(
            template.replace("{text}", _clip(tokenizer, pool[i][text_field], max_text_tokens))
            + " " + labels[pool_gold[i]] + "\n\n"
            for i in demonstrations(pool, pool_gold, k, seed)
        )  # fmt: skip
        room = max_text_tokens + len(tokenizer.encode(template)) + max(map(len, verbs)) + 8
        prefix = prefix_cache(model, tokenizer.encode(demo), room) if demo else None
        predicted = []
        for record in records:
            text = _clip(tokenizer, record[text_field], max_text_tokens)
            ids = tokenizer.encode(template.replace("{text}", text), add_special_tokens=not demo)
            scores = label_log_probs(model, ids, verbs, prefix)
            predicted.append(max(range(len(labels)), key=scores.__getitem__))
            if progress is not None:
                progress()
        results[str(k)] = metrics(gold, predicted, labels)
    return {"shots": results, "labels": labels, "template": template}
