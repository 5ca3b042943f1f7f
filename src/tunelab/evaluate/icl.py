"""Classification by prompting alone: each label's word scored as the continuation of a
prompt (prompts.py), zero-shot or with k demonstrations drawn by seed and balanced by label,
calibrated by default at every shot count with the scored examples' own label prior.

A label's score is the sum of its tokens' log-probabilities, so multi-token labels are
compared fairly with single-token ones only when the user picks comparable label words.
Calibration divides each label's probability by a label prior and renormalises. The prior comes
from the scored examples themselves, their mean label probabilities (Zhou et al. 2024, "Batch
Calibration"; `calibration: batch`, the default), or from content-free inputs ("N/A", "",
"[MASK]") under the same prompt (Zhao et al. 2021, "Calibrate Before Use"; `content-free`).
On IMDB with SmolLM2-135M-Instruct (docs/BENCHMARKS.md, Prompting) content-free priors helped
at 0 shots and hurt after demonstrations (they no longer stand for the bias real inputs get),
so with them the default calibrates at 0 shots only; batch priors matched them at 0 shots and
lifted 4-shot accuracy by 0 to 21 points over uncalibrated scores across demonstration seeds,
so with them the default calibrates at every k. A batch prior assumes no label dominates the
scored data, and needs MIN_BATCH examples; below that content-free inputs stand in. Every
result carries the calibrated and uncalibrated variants and says which prior it used.

Which demonstrations are shown is a lottery: at 4 shots the same model scored 83.5, 65.0 and
66.0% with demonstration seeds 0, 1 and 2 (docs/BENCHMARKS.md). So with k > 0 shots each
example is scored under `draws` independent draws (the same variance Zhao et al. and Lu et al.
2022 report over which demonstrations and their order), each draw's label probabilities (softmax
of the label scores, calibrated where calibration is on) are averaged, and the prediction is the
average's argmax; every draw's own accuracy is kept, so the spread stays visible.
"""

from __future__ import annotations

import random
from dataclasses import replace

import torch

from tunelab.errors import ConfigError
from tunelab.evaluate.classification import metrics
from tunelab.evaluate.prompts import Prompt, PromptSpec, resolve_prompt
from tunelab.model.heads import require_causal

CONTENT_FREE = ("N/A", "", "[MASK]")
# Where the label prior comes from: the scored examples' own mean label probabilities (Zhou et
# al. 2024, "Batch Calibration"), or content-free inputs under the prompt (Zhao et al. 2021).
CALIBRATIONS = ("batch", "content-free")
MIN_BATCH = 8  # fewer scored examples estimate no prior: content-free inputs stand in
# Demonstration draws averaged per example at k > 0. Each costs a full pass over the scored
# examples, so 3 triples the k-shot cost; 3 is a first choice, not a measured optimum.
DRAWS = 3
DRAW_STRIDE = 1_000_001  # draw i's seed is seed + i * DRAW_STRIDE (draw_seeds says why)


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


def demonstrations(
    records: list[dict], gold: list[int], k: int, seed: int, order: str = "shuffle"
) -> list[int]:
    """k record indices, labels as balanced as k allows (round-robin), drawn by seed; in an
    order shuffled by seed, or alternating labels from label seed % n (the same records)."""
    rng = random.Random(seed)
    by_label: dict[int, list[int]] = {}
    for i, g in enumerate(gold):
        by_label.setdefault(g, []).append(i)
    for pool in by_label.values():
        rng.shuffle(pool)
    labels = sorted(by_label)
    if order == "alternate":
        start = seed % len(labels)  # consecutive seeds end on different labels
        labels = labels[start:] + labels[:start]
    picked = []
    while len(picked) < k and any(by_label.values()):
        for label in labels:
            if by_label[label] and len(picked) < k:
                picked.append(by_label[label].pop())
    if order != "alternate":
        rng.shuffle(picked)
    return picked


def draw_seeds(seed: int, draws: int) -> list[int]:
    """The demonstration seed of each draw: draw 0 is `seed` itself, so one draw is exactly the
    single draw of before; draw i is seed + 1,000,001 * i, far from the seeds a study sweeps
    (0, 1, 2, ...) so two seeds' ensembles share no draw, and odd so that with alternating
    order consecutive draws start on different labels."""
    return [seed + i * DRAW_STRIDE for i in range(draws)]


def check_draws(draws) -> int:
    """draws as given, or a one-line error naming the option."""
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ConfigError(
            f"draws {draws!r}: expected a whole number of demonstration draws, at least 1"
        )
    return draws


def average(scores: list[list[list[float]]]) -> list[list[float]]:
    """Each example's label probabilities (softmax of its label scores) averaged over draws;
    scores[draw][example][label]."""
    return torch.tensor(scores, dtype=torch.float64).softmax(-1).mean(0).tolist()


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


def _shared_length(ids: list[list[int]]) -> int:
    """How many leading tokens every input has in common, leaving each at least one of its own."""
    n = min(map(len, ids)) - 1
    first = ids[0]
    for other in ids[1:]:
        n = next((i for i in range(n) if other[i] != first[i]), n)
    return max(n, 0)


def score_texts(
    model,
    tokenizer,
    prompt: Prompt,
    demos: list[tuple[str, int]],
    texts: list[str],
    forms: list[list[list[int]]],
    progress=None,
) -> list[list[float]]:
    """Label scores for each text under the prompt: log of the summed probability of each
    label's forms (token id lists). The tokens all inputs share (instruction, demonstrations)
    are computed once; splitting on tokens rather than text keeps each input tokenized exactly
    as a whole ("\n\n" is one token alone but two before a word)."""
    verbs = [v for f in forms for v in f]
    plain = prompt.format == "plain"  # a chat template writes its own BOS
    ids = [tokenizer.encode(prompt.render(demos, t), add_special_tokens=plain) for t in texts]
    shared = _shared_length(ids) if len(ids) > 1 else 0
    prefix = None
    if shared:
        room = max(map(len, ids)) - shared + max(map(len, verbs)) + 8
        prefix = prefix_cache(model, ids[0][:shared], room)
    out = []
    for query in ids:
        scores = iter(label_log_probs(model, query[shared:], verbs, prefix))
        out.append([float(torch.tensor([next(scores) for _ in f]).logsumexp(0)) for f in forms])
        if progress is not None:
            progress()
    return out


def _accuracy(gold: list[int], scores: list[list[float]]) -> float:
    return sum(g == p for g, p in zip(gold, _argmax(scores))) / len(gold) if gold else 0.0


def _summary(gold: list[int], predicted: list[int], labels: list[str]) -> dict:
    m = metrics(gold, predicted, labels)
    return {k: m[k] for k in ("accuracy", "macro_f1", "accuracy_interval", "predicted")}


def _draw(model, tokenizer, prompt, demos, texts, forms, progress, source: str) -> tuple:
    """(raw label scores, calibrated log-probabilities, label prior) under one set of demos;
    the prior from the scored texts themselves (batch) or from content-free inputs."""
    scores = score_texts(model, tokenizer, prompt, demos, texts, forms, progress)
    if source == "batch":
        prior = label_prior(scores)
    else:
        free = list(CONTENT_FREE)
        prior = label_prior(score_texts(model, tokenizer, prompt, demos, free, forms))
    return scores, calibrate(scores, prior), prior


def calibration_source(calibration: str, n: int) -> str:
    """The prior's source for n scored examples: as asked, but content-free inputs when a
    batch is too small to estimate one (one example's own prior would make it a tie)."""
    if calibration not in CALIBRATIONS:
        raise ConfigError(f"calibration {calibration!r}: expected one of {', '.join(CALIBRATIONS)}")
    return "content-free" if calibration == "batch" and n < MIN_BATCH else calibration


def _combine(gold: list[int], labels: list[str], seeds: list[int], runs: list, on: bool) -> dict:
    """One shot count's metrics from its draws (runs: _draw's results, one per seed): predicted
    from the draws' averaged probabilities, with each draw's own accuracy and their range."""
    per_draw = []
    for s, (scores, fixed, prior) in zip(seeds, runs):
        raw_acc, fixed_acc = _accuracy(gold, scores), _accuracy(gold, fixed)
        per_draw.append(
            {
                "seed": s,
                "accuracy": fixed_acc if on else raw_acc,
                "without_calibration": raw_acc,
                "with_calibration": fixed_acc,
                "label_prior": {name: round(p, 6) for name, p in zip(labels, prior)},
            }
        )
    if len(runs) == 1:  # one draw predicts from its own scores, bit for bit as before draws
        raw, fixed = _argmax(runs[0][0]), _argmax(runs[0][1])
    else:
        raw, fixed = (_argmax(average([r[i] for r in runs])) for i in (0, 1))
    prior = [sum(p) / len(runs) for p in zip(*(r[2] for r in runs))]
    accuracies = [d["accuracy"] for d in per_draw]
    return {
        **metrics(gold, fixed if on else raw, labels),
        "calibrated": on,
        "draws": len(runs),
        "draw_accuracy": {
            "min": min(accuracies),
            "max": max(accuracies),
            "spread": max(accuracies) - min(accuracies),
        },
        "per_draw": per_draw,
        "label_prior": {name: round(p, 6) for name, p in zip(labels, prior)},  # mean over draws
        "without_calibration": _summary(gold, raw, labels),
        "with_calibration": _summary(gold, fixed, labels),
    }


def evaluate_icl(
    model,
    tokenizer,
    records: list[dict],
    gold: list[int],
    labels: list[str],
    shots: list[int],
    *,
    demo_records: list[dict] | None = None,
    demo_gold: list[int] | None = None,
    template: str | None = None,
    prompt: PromptSpec | None = None,
    calibrate_scores: bool | None = None,
    calibration: str = "batch",
    text_field: str = "text",
    label_field: str = "label",
    seed: int = 0,
    demo_order: str = "shuffle",
    draws: int = DRAWS,
    max_text_tokens: int = 256,
    progress=None,
) -> dict:
    """{"shots": {"k": metrics}, "prompt": what was used} for each k; demonstrations come from
    demo_records (a pool kept apart from the scored records). At k > 0 each example is scored
    under `draws` demonstration draws (draw_seeds) and predicted from their averaged label
    probabilities; "per_draw" holds each draw's own accuracy. Each k's metrics are calibrated
    (with the prior `calibration` names) when calibrate_scores; None: at every k with batch
    priors, at k = 0 only with content-free ones. Both variants are reported beside."""
    require_causal(model, "prompting")
    check_draws(draws)
    model.eval()
    spec = prompt or PromptSpec()
    if template is not None:
        spec = replace(spec, template=template)
    resolved = resolve_prompt(spec, tokenizer, labels, text_field, label_field)
    forms = [verbalizers(tokenizer, f, resolved.space()) for f in surface_forms(resolved.words)]
    pool, pool_gold = demo_records or [], demo_gold or []
    texts = [_clip(tokenizer, str(r[text_field]), max_text_tokens) for r in records]
    source = calibration_source(calibration, len(texts))
    results = {}
    for k in shots:
        if k > len(pool):
            raise ConfigError(f"{k}-shot needs {k} demonstrations; the pool has {len(pool)}")
        on = calibrate_scores
        if on is None:  # content-free priors hurt after demonstrations (module docstring)
            on = source == "batch" or k == 0
        seeds = draw_seeds(seed, draws if k else 1)  # no demonstrations: one prompt to score
        runs = []
        for s in seeds:
            demos = [
                (_clip(tokenizer, str(pool[i][text_field]), max_text_tokens), pool_gold[i])
                for i in demonstrations(pool, pool_gold, k, s, demo_order)
            ]
            runs.append(_draw(model, tokenizer, resolved, demos, texts, forms, progress, source))
        results[str(k)] = {**_combine(gold, labels, seeds, runs, on), "calibration": source}
    return {
        "shots": results,
        "labels": labels,
        "prompt": resolved.describe(),
        "template": resolved.template,
        "calibrate": "auto" if calibrate_scores is None else calibrate_scores,
        "calibration": source,
        "demo_order": demo_order,
        "draws": draws,
    }
