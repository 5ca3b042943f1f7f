"""Classification by prompting alone: each label's word scored as the continuation of a
prompt (prompts.py), zero-shot or with k demonstrations drawn by seed and balanced by label,
optionally calibrated (Zhao et al. 2021, "Calibrate Before Use").

A label's score is the sum of its tokens' log-probabilities, so multi-token labels are
compared fairly with single-token ones only when the user picks comparable label words.
Calibration divides each label's probability by its probability after content-free inputs
("N/A", "", "[MASK]") under the same prompt, removing the prompt's bias toward one label.
"""

from __future__ import annotations

import random

import torch

from tunelab.errors import ConfigError
from tunelab.evaluate.classification import metrics
from tunelab.evaluate.prompts import Prompt, PromptSpec, resolve_prompt
from tunelab.model.heads import require_causal

CONTENT_FREE = ("N/A", "", "[MASK]")


def verbalizers(tokenizer, labels: list[str], space: str = " ") -> list[list[int]]:
    """Token ids of ' label' for each label (the space a prompt ending in ':' is followed by;
    none after a chat template's assistant turn)."""
    out = [tokenizer.encode(space + name, add_special_tokens=False) for name in labels]
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


def surface_forms(words: list[str]) -> list[list[str]]:
    """Each label word as written and capitalised ('positive', 'Positive'): a model answering
    'Positive' means the label, and counting only one spelling leaves its score to chance."""
    return [list(dict.fromkeys([w, w.lower(), w[:1].upper() + w[1:].lower()])) for w in words]


def _clip(tokenizer, text: str, max_tokens: int) -> str:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def label_prior(content_free: list[list[float]]) -> list[float]:
    """The prompt's label prior: the label distribution after content-free inputs, averaged."""
    probs = torch.tensor(content_free, dtype=torch.float64).softmax(-1).mean(0)
    return (probs / probs.sum()).tolist()


def calibrate(scores: list[list[float]], prior: list[float]) -> list[list[float]]:
    """log q = log_softmax(log p - log prior): the label probabilities divided by the prior and
    renormalised (the diagonal W of Zhao et al., b = 0)."""
    logp = torch.tensor(scores, dtype=torch.float64).log_softmax(-1)
    return (logp - torch.tensor(prior, dtype=torch.float64).log()).log_softmax(-1).tolist()


def _argmax(rows: list[list[float]]) -> list[int]:
    return [max(range(len(r)), key=r.__getitem__) for r in rows]


def score_texts(model, tokenizer, prompt: Prompt, demos: list[tuple[str, int]], texts: list[str],
                forms: list[list[list[int]]], progress=None) -> list[list[float]]:  # fmt: skip
    """Label scores for each text under the prompt: log of the summed probability of each
    label's forms (token id lists); the demonstrations are computed once."""
    verbs = [v for f in forms for v in f]
    shared = prompt.prefix(demos)
    plain = prompt.format == "plain"
    queries = []
    for text in texts:
        full = prompt.render(demos, text)
        if not full.startswith(shared):  # a chat template that rewrites earlier turns
            shared = ""
        queries.append(full)
    ids = [tokenizer.encode(q[len(shared) :], add_special_tokens=plain and not shared)
           for q in queries]  # fmt: skip
    prefix = None
    if shared:
        room = max(map(len, ids)) + max(map(len, verbs)) + 8
        prefix = prefix_cache(model, tokenizer.encode(shared, add_special_tokens=plain), room)
    out = []
    for query in ids:
        scores = iter(label_log_probs(model, query, verbs, prefix))
        out.append([float(torch.tensor([next(scores) for _ in f]).logsumexp(0)) for f in forms])
        if progress is not None:
            progress()
    return out


def _summary(gold: list[int], predicted: list[int], labels: list[str]) -> dict:
    m = metrics(gold, predicted, labels)
    return {k: m[k] for k in ("accuracy", "macro_f1", "accuracy_interval", "predicted")}


def evaluate_icl(model, tokenizer, records: list[dict], gold: list[int], labels: list[str],
                 shots: list[int], *, demo_records: list[dict] | None = None,
                 demo_gold: list[int] | None = None, template: str | None = None,
                 prompt: PromptSpec | None = None, calibrate_scores: bool = True,
                 text_field: str = "text", label_field: str = "label", seed: int = 0,
                 max_text_tokens: int = 256, progress=None) -> dict:  # fmt: skip
    """{"shots": {"k": metrics}, "prompt": what was used} for each k; demonstrations come from
    demo_records (a pool kept apart from the scored records), the same for every example.
    Each k's metrics are calibrated when calibrate_scores, with both variants beside them."""
    require_causal(model, "prompting")
    model.eval()
    spec = prompt or PromptSpec()
    if template is not None:
        spec = PromptSpec(spec.format, template, spec.instruction, spec.label_words)
    resolved = resolve_prompt(spec, tokenizer, labels, text_field, label_field)
    forms = [verbalizers(tokenizer, f, resolved.space()) for f in surface_forms(resolved.words)]
    pool, pool_gold = demo_records or [], demo_gold or []
    texts = [_clip(tokenizer, str(r[text_field]), max_text_tokens) for r in records]
    results = {}
    for k in shots:
        if k > len(pool):
            raise ConfigError(f"{k}-shot needs {k} demonstrations; the pool has {len(pool)}")
        demos = [(_clip(tokenizer, str(pool[i][text_field]), max_text_tokens), pool_gold[i])
                 for i in demonstrations(pool, pool_gold, k, seed)]  # fmt: skip
        scores = score_texts(model, tokenizer, resolved, demos, texts, forms, progress)
        prior = label_prior(
            score_texts(model, tokenizer, resolved, demos, list(CONTENT_FREE), forms)
        )
        raw, fixed = _argmax(scores), _argmax(calibrate(scores, prior))
        results[str(k)] = {**metrics(gold, fixed if calibrate_scores else raw, labels),
                           "calibrated": calibrate_scores,
                           "label_prior": {name: round(p, 6) for name, p in zip(labels, prior)},
                           "without_calibration": _summary(gold, raw, labels),
                           "with_calibration": _summary(gold, fixed, labels)}  # fmt: skip
    return {
        "shots": results,
        "labels": labels,
        "prompt": resolved.describe(),
        "template": resolved.template,
        "calibrate": calibrate_scores,
    }
