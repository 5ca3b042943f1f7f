"""Scoring: strict and loose verdicts per instruction, accuracies at prompt and instruction
level, bootstrap intervals over prompts, and the paired difference of two sets of responses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tunelab.errors import DataError
from tunelab.instructions.registry import CHECKERS, KwargsError, check_kwargs

METRICS = ("prompt_strict", "instruction_strict", "prompt_loose", "instruction_loose")
RESAMPLES = 1000
CONFIDENCE = 0.95


def _jsonl(path: Path):
    """(line number, record) for each non-empty line; a bad line is a DataError naming it."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{n}: expected a JSON object")
        yield n, record


def read_prompts(path: str | Path, limit: int | None = None) -> list[dict]:
    """IFEval records {key, prompt, instruction_id_list, kwargs}, every kwarg checked."""
    out = []
    for n, r in _jsonl(Path(path)):
        where = f"{path}:{n}"
        if not isinstance(r.get("prompt"), str) or not r["prompt"].strip():
            raise DataError(f"{where}: field 'prompt': missing or not a non-empty string")
        ids = r.get("instruction_id_list")
        if not isinstance(ids, list) or not ids:
            raise DataError(f"{where}: field 'instruction_id_list': missing or empty")
        kwargs = r.get("kwargs", [{}] * len(ids))
        if not isinstance(kwargs, list) or len(kwargs) != len(ids):
            raise DataError(
                f"{where}: field 'kwargs': expected one object per instruction id ({len(ids)})"
            )
        checked = []
        for i, (iid, kw) in enumerate(zip(ids, kwargs)):
            try:
                checked.append(check_kwargs(iid, kw))
            except KwargsError as e:
                field = f"kwargs[{i}].{e.field}" if e.field else f"instruction_id_list[{i}]"
                raise DataError(f"{where}: field '{field}': {e}") from None
        out.append(
            {
                "key": r.get("key", n),
                "prompt": r["prompt"],
                "instruction_id_list": ids,
                "kwargs": checked,
            }
        )
        if limit and len(out) == limit:
            break
    if not out:
        raise DataError(f"{path}: no records")
    return out


def read_responses(path: str | Path, records: list[dict]) -> list[str]:
    """The response to each record, from JSONL lines {prompt, response} (as lm-eval and the
    reference write them), matched by prompt text."""
    by_prompt = {}
    for n, r in _jsonl(Path(path)):
        for field in ("prompt", "response"):
            if not isinstance(r.get(field), str):
                raise DataError(f"{path}:{n}: field '{field}': missing or not a string")
        by_prompt[r["prompt"]] = r["response"]
    missing = [r for r in records if r["prompt"] not in by_prompt]
    if missing:
        raise DataError(
            f"{path}: no response to {len(missing)} of {len(records)} prompts "
            f"(the first: key {missing[0]['key']}: {missing[0]['prompt'][:60]!r})"
        )
    return [by_prompt[r["prompt"]] for r in records]


def loose_variants(response: str) -> list[str]:
    """The response, without its first and/or last line, and without asterisks: loose scoring
    passes an instruction when any of these passes it."""
    lines = response.split("\n")
    cut = [
        "\n".join(lines[1:]).strip(),
        "\n".join(lines[:-1]).strip(),
        "\n".join(lines[1:-1]).strip(),
    ]
    return [response, response.replace("*", ""), *cut, *(c.replace("*", "") for c in cut)]


def follows(instruction_id: str, kwargs: dict, response: str) -> bool:
    """One instruction, strictly: an empty response follows nothing."""
    return bool(response.strip()) and CHECKERS[instruction_id](response, **kwargs)


def score(record: dict, response: str) -> dict:
    """{'strict': [bool per instruction], 'loose': [...]}."""
    variants = loose_variants(response)
    strict, loose = [], []
    for iid, kw in zip(record["instruction_id_list"], record["kwargs"]):
        s = follows(iid, kw, response)
        strict.append(s)
        loose.append(s or any(follows(iid, kw, v) for v in variants[1:]))
    return {"strict": strict, "loose": loose}


def counts(scores: list[dict]) -> np.ndarray:
    """(prompts, 3): instructions followed strictly, loosely, and instructions given."""
    return np.array([[sum(s["strict"]), sum(s["loose"]), len(s["strict"])] for s in scores])


def accuracies(c: np.ndarray) -> dict:
    """The four accuracies of per-prompt counts; c may carry leading resample axes."""
    s, lo, n = c[..., 0], c[..., 1], c[..., 2]
    return {
        "prompt_strict": (s == n).mean(-1),
        "instruction_strict": s.sum(-1) / n.sum(-1),
        "prompt_loose": (lo == n).mean(-1),
        "instruction_loose": lo.sum(-1) / n.sum(-1),
    }


def _resample(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(RESAMPLES, n))


def _interval(values: np.ndarray) -> list[float]:
    tail = (1 - CONFIDENCE) / 2 * 100
    return [
        round(float(np.percentile(values, tail)), 4),
        round(float(np.percentile(values, 100 - tail)), 4),
    ]


def summarize(records: list[dict], scores: list[dict], seed: int = 0) -> dict:
    """Accuracies, their bootstrap intervals over prompts, and accuracy per instruction id."""
    c = counts(scores)
    point = accuracies(c)
    boot = accuracies(c[_resample(len(c), seed)])
    out = {m: round(float(point[m]), 4) for m in METRICS}
    out["n"] = len(records)
    out["instructions"] = int(c[:, 2].sum())
    out["intervals"] = {m: _interval(boot[m]) for m in METRICS}
    out["confidence"], out["resamples"] = CONFIDENCE, RESAMPLES
    out["by_instruction"] = by_instruction(records, scores, seed)
    out["per_prompt"] = c.tolist()
    return out


def by_instruction(records: list[dict], scores: list[dict], seed: int = 0) -> dict:
    """{id: {n, strict, loose, strict_interval, loose_interval}}, ids sorted."""
    found: dict[str, list[tuple[bool, bool]]] = {}
    for r, s in zip(records, scores):
        for iid, st, lo in zip(r["instruction_id_list"], s["strict"], s["loose"]):
            found.setdefault(iid, []).append((st, lo))
    out = {}
    for iid in sorted(found):
        v = np.array(found[iid], dtype=float)
        boot = v[_resample(len(v), seed)].mean(1)
        out[iid] = {
            "n": len(v),
            "strict": round(float(v[:, 0].mean()), 4),
            "loose": round(float(v[:, 1].mean()), 4),
            "strict_interval": _interval(boot[:, 0]),
            "loose_interval": _interval(boot[:, 1]),
        }
    return out


def paired_difference(a, b, seed: int = 0) -> dict:
    """B minus A on the same prompts (per-prompt counts, as `summarize` stores them in
    per_prompt), each accuracy with a bootstrap interval that resamples prompts jointly."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or not np.array_equal(a[:, 2], b[:, 2]):
        raise DataError("a paired comparison needs the same prompts on both sides")
    idx = _resample(len(a), seed)
    pa, pb = accuracies(a), accuracies(b)
    ba, bb = accuracies(a[idx]), accuracies(b[idx])
    return {
        m: {
            "a": round(float(pa[m]), 4),
            "b": round(float(pb[m]), 4),
            "difference": round(float(pb[m] - pa[m]), 4),
            "interval": _interval(bb[m] - ba[m]),
        }
        for m in METRICS
    }
