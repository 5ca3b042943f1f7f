"""Instruction following (IFEval): generate a response to each prompt with the model's chat
template, in batches on the KV-cached decoder, and score it with tunelab.instructions."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tunelab.files import atomic_file
from tunelab.generate import Sampling, generate_from_ids
from tunelab.instructions.score import score, summarize
from tunelab.runtime import decoding


def generate_responses(
    model, tokenizer, prompts: list[str], s: Sampling, batch_size: int = 8, progress=None
) -> tuple[list[str], dict]:
    """The response to each prompt (one user turn), and the generation's cost. Prompts of
    similar length share a batch (less left padding); the answers come back in prompt order."""
    encoded = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    texts: list[str] = [""] * len(prompts)
    new_tokens, t0 = 0, time.perf_counter()
    with decoding(model, batch_size):  # weights reordered once for every batch, not per batch
        seconds = time.perf_counter() - t0  # the reordering counts as generation time
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            t0 = time.perf_counter()
            results = generate_from_ids(model, tokenizer, [encoded[i] for i in rows], s)
            seconds += time.perf_counter() - t0
            for i, r in zip(rows, results):
                texts[i] = r["text"]
                new_tokens += r["new_tokens"]
            for k in range(len(rows)) if progress else ():
                last = k == len(rows) - 1
                progress(f"{new_tokens / seconds:,.0f} tok/s" if last and seconds else "")
    stats = {
        "new_tokens": new_tokens,
        "generation_s": round(seconds, 3),
        "tokens_per_s": round(new_tokens / seconds, 2) if seconds else 0.0,
        "prompt_tokens": sum(len(e) for e in encoded),
    }
    return texts, stats


def score_responses(records: list[dict], responses: list[str], seed: int = 0) -> tuple[dict, list]:
    """(summary, per-record verdicts) of the responses to the records."""
    scores = [score(r, text) for r, text in zip(records, responses)]
    return summarize(records, scores, seed), scores


def evaluate_instructions(
    model, tokenizer, records: list[dict], s: Sampling, batch_size: int = 8, progress=None
) -> tuple[dict, list[str], list]:
    """Generate and score: (summary with the generation's cost, responses, verdicts)."""
    model.eval()
    responses, stats = generate_responses(
        model, tokenizer, [r["prompt"] for r in records], s, batch_size, progress
    )
    summary, scores = score_responses(records, responses)
    summary["generation"] = {
        **stats,
        "max_new_tokens": s.max_new_tokens,
        "temperature": s.temperature,
        "top_k": s.top_k,
        "top_p": s.top_p,
        "seed": s.seed,
        "batch_size": batch_size,
    }
    return summary, responses, scores


def write_responses(path: Path, records: list[dict], responses: list[str], scores: list) -> None:
    """responses.jsonl: prompt, response and each instruction's verdicts, strict and loose."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r, text, sc in zip(records, responses, scores):
            verdicts = [
                {"id": iid, "kwargs": kw, "strict": st, "loose": lo}
                for iid, kw, st, lo in zip(
                    r["instruction_id_list"], r["kwargs"], sc["strict"], sc["loose"]
                )
            ]
            f.write(
                json.dumps(
                    {
                        "key": r["key"],
                        "prompt": r["prompt"],
                        "response": text,
                        "follow_all_strict": all(sc["strict"]),
                        "follow_all_loose": all(sc["loose"]),
                        "instructions": verdicts,
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )


def measure_instructions(
    model,
    tokenizer,
    path: str,
    limit: int | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 8,
) -> dict:
    """Greedy responses to the first `limit` prompts of an IFEval file, scored: the entry a
    training run records before and after training (per-prompt counts kept for pairing)."""
    from tunelab.instructions.score import read_prompts

    records = read_prompts(path, limit)
    was_training = model.training
    summary, _, _ = evaluate_instructions(
        model, tokenizer, records, Sampling(max_new_tokens=max_new_tokens), batch_size
    )
    model.train(was_training)
    keep = (
        "prompt_strict",
        "instruction_strict",
        "prompt_loose",
        "instruction_loose",
        "n",
        "intervals",
        "by_instruction",
        "per_prompt",
    )
    return {k: summary[k] for k in keep}
