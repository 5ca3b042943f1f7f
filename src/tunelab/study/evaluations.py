"""Study cells that measure a model without training it: prompting (icl), perplexity and
instruction following (instructions).

Each writes a summary.json like a training run's, so the results table treats them alike.
"""

from __future__ import annotations

import time
from pathlib import Path

from tunelab.errors import ConfigError, closest


def run_evaluation(
    task: str, model: str, config: dict, method: dict, seed: int, run_dir: Path
) -> dict:
    """Evaluate `model` as the cell says and write run_dir/summary.json."""
    from tunelab.loading import load
    from tunelab.train.run import write_summary

    if not model:
        raise ConfigError(f"{run_dir}: an evaluation cell needs a model")
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if task == "counting":  # an image model: not a language model for load
        return _counting(model, config, method, seed, run_dir, t0)
    lm = load(model)
    if task == "icl":
        summary = _icl(lm, config, method, seed)
    elif task == "instructions":
        summary = _instructions(lm, config, method, seed, run_dir)
    else:
        summary = _perplexity(lm, config)
    total = sum(p.numel() for p in lm.model.parameters())
    summary.update(
        task=task,
        model=model,
        wall_time_s=round(time.perf_counter() - t0, 3),
        trainable_params=0,
        total_params=total,
    )
    write_summary(run_dir, summary)
    return summary


ICL_KEYS = (
    "limit",
    "shots",
    "prompt",
    "calibrate",
    "calibration",
    "draws",
    "max_text_tokens",
    "format",
    "template",
    "pre",
    "post",
    "instruction",
    "label_words",
    "layout",
)


def _optional_bool(value) -> bool | None:
    """A recipe's calibrate: true, false, or absent/auto for the default (evaluate/icl.py)."""
    return None if value is None or value == "auto" else bool(value)


def _icl(lm, config: dict, method: dict, seed: int) -> dict:
    """k-shot prompting on data.val_path (scored) with demonstrations from data.path; the
    prompt comes from the icl section, the method (a sweep's prompt) overriding it."""
    from tunelab.data import load_records
    from tunelab.data.templates import label_index, label_names
    from tunelab.evaluate.icl import DRAWS, evaluate_icl
    from tunelab.evaluate.prompts import SPEC_KEYS, PromptSpec

    data, c = config.get("data") or {}, config.get("classify") or {}
    options = {**(config.get("icl") or {}), **{k: v for k, v in method.items() if k != "name"}}
    for key in options:
        if key not in ICL_KEYS:
            raise ConfigError(f"icl: unknown key {key!r}{closest(key, ICL_KEYS)}")
    if c.get("template") and not {"template", "pre", "post"} & set(options):
        options["template"] = c["template"]  # the classify section's prompt modifiers
    text_field, label_field = data.get("text_field", "text"), c.get("label_field", "label")
    pool = load_records(data["path"])
    scored = load_records(data.get("val_path") or data["path"])
    labels = label_names(pool, label_field, c.get("labels"))
    limit = options.get("limit")
    scored = scored[:limit] if limit else scored
    k = int(options.get("shots", 0))
    spec = PromptSpec.from_dict({key: options[key] for key in SPEC_KEYS if key in options})
    result = evaluate_icl(
        lm.model,
        lm.tokenizer,
        scored,
        [label_index(r, label_field, labels) for r in scored],
        labels,
        [k],
        demo_records=pool,
        demo_gold=[label_index(r, label_field, labels) for r in pool],
        prompt=spec,
        calibrate_scores=_optional_bool(options.get("calibrate")),
        calibration=str(options.get("calibration", "batch")),
        text_field=text_field,
        label_field=label_field,
        seed=seed,
        draws=options.get("draws", DRAWS),
        max_text_tokens=int(options.get("max_text_tokens", 256)),
    )
    metrics = result["shots"][str(k)]
    return {
        "shots": k,
        "labels": labels,
        "prompt": result["prompt"],
        "prompt_name": options.get("prompt", "default"),
        **metrics,
    }


def _instructions(lm, config: dict, method: dict, seed: int, run_dir: Path) -> dict:
    """IFEval-style prompts (instructions.data, .limit, .max_new_tokens, .batch_size) answered
    with the method's decoding settings (temperature, top_k, top_p; greedy by default), scored;
    the responses and their verdicts go to run_dir/responses.jsonl."""
    from tunelab.evaluate.instructions import evaluate_instructions, write_responses
    from tunelab.generate import Sampling
    from tunelab.instructions.score import read_prompts

    c = config.get("instructions") or {}
    if not c.get("data"):
        raise ConfigError("an instructions cell needs instructions.data (IFEval-style JSONL)")
    unknown = set(method) - {"name", "temperature", "top_k", "top_p"}
    if unknown:
        raise ConfigError(
            f"instructions: decoding settings are temperature, top_k and top_p; "
            f"got {', '.join(sorted(unknown))}"
        )
    records = read_prompts(c["data"], c.get("limit"))
    s = Sampling(
        max_new_tokens=int(c.get("max_new_tokens", 256)),
        temperature=float(method.get("temperature", 0.0)),
        top_k=int(method.get("top_k", 0)),
        top_p=float(method.get("top_p", 1.0)),
        seed=seed,
    )
    summary, responses, scores = evaluate_instructions(
        lm.model, lm.tokenizer, records, s, int(c.get("batch_size", 8))
    )
    write_responses(run_dir / "responses.jsonl", records, responses, scores)
    summary["tokens_per_s"] = summary["generation"]["tokens_per_s"]
    return summary


COUNTING_KEYS = (
    "counter",
    "threshold",
    "prompts",
    "variants",
    "numbers",
    "classes",
    "plurals",
    "images",
    "steps",
    "guidance",
    "threads",
)


def _counting(model: str, config: dict, method: dict, seed: int, run_dir: Path, t0) -> dict:
    """Generate and count as the counting section says (prompts: a YAML file, or variants,
    numbers and classes inline), the method's keys (a sweep's guidance, steps, variants)
    overriding it; the images, scores, grid and report stay in the cell's folder."""
    from tunelab.runtime import threads

    options = {**(config.get("counting") or {}), **{k: v for k, v in method.items() if k != "name"}}
    for key in options:
        if key not in COUNTING_KEYS:
            raise ConfigError(f"counting: unknown key {key!r}{closest(key, COUNTING_KEYS)}")
    with threads(options.get("threads")):  # on a busy machine one thread contends least
        return _count(model, options, seed, run_dir, t0)


def _count(model: str, options: dict, seed: int, run_dir: Path, t0) -> dict:
    from tunelab.image.counters import make_counter
    from tunelab.image.counting import evaluate, generate_set
    from tunelab.image.pipeline import load_pipeline
    from tunelab.image.prompts import expand, read_spec
    from tunelab.train.run import write_summary

    extra = {"threshold": options["threshold"]} if options.get("threshold") is not None else {}
    counter = make_counter(options.get("counter", "ssd-mobilenet"), **extra)
    spec = read_spec(options["prompts"]) if options.get("prompts") else {}
    spec.update(
        {k: options[k] for k in ("variants", "numbers", "classes", "plurals") if k in options}
    )
    prompts = expand(spec, counter, where="counting")
    n = int(options.get("images", spec.get("images", 4)))
    rows = generate_set(
        load_pipeline(model),
        prompts,
        n,
        run_dir,
        seed,
        options.get("steps"),
        options.get("guidance"),
    )
    settings = {"n": n, "seed": seed, "steps": rows[0]["steps"], "guidance": rows[0]["guidance"]}
    summary = evaluate(
        run_dir / "images", rows, counter, run_dir, {"model": model, "settings": settings}
    )
    summary.update(
        task="counting", wall_time_s=round(time.perf_counter() - t0, 3), trainable_params=0
    )
    write_summary(run_dir, summary)
    return summary


def _perplexity(lm, config: dict) -> dict:
    from tunelab.evaluate.perplexity import perplexity, read_texts

    e = config.get("eval") or {}
    out = {}
    for name in ("domain", "general"):
        if e.get(name):
            r = perplexity(
                lm.model,
                lm.tokenizer,
                read_texts([e[name]]),
                e.get("window", 256),
                e.get("stride", 128),
                e.get("max_tokens", 8192),
            )
            out["in_domain" if name == "domain" else name] = r["perplexity"]
    if not out:
        raise ConfigError("a perplexity cell needs eval.domain or eval.general")
    return {"perplexity": out, "samples": _samples(lm, config)}


def _samples(lm, config: dict) -> list[str]:
    prompts = (config.get("train") or {}).get("samples") or []
    return [lm.generate(p, max_new_tokens=40) for p in prompts]
