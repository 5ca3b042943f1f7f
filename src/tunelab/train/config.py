"""Run configuration: dataclasses loaded from YAML, with `--section.key value` overrides.

Every option has a default and a one-line doc (shown by --help). Unknown keys are errors
that name the key and the closest valid one.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunelab.errors import ConfigError, closest
from tunelab.files import read_yaml


def opt(default, doc: str, **kw):
    """A config field with its one-line documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc, **kw})
    return field(default=default, metadata={"doc": doc, **kw})


@dataclass
class DataConfig:
    path: str | None = opt(
        None, "training data: text file/folder, CSV/TSV, JSON/JSONL, Parquet or HF dataset"
    )
    val_path: str | None = opt(
        None, "validation data; default: a seeded split of the training data"
    )
    format: str | None = opt(
        None, "data format (text, csv, tsv, json, jsonl, parquet, hf); default: from suffix"
    )
    val_fraction: float = opt(0.05, "fraction held out for validation when no val_path is given")
    text_field: str = opt("text", "column holding raw text (pretraining)")
    text_mode: str = opt(
        "paragraph", "how text files split into documents: file, paragraph or line"
    )
    instruction_field: str = opt("instruction", "column holding the instruction (SFT)")
    input_field: str = opt("input", "column holding optional extra input (SFT)")
    output_field: str = opt("output", "column holding the response (SFT)")
    messages_field: str = opt("messages", "column holding chat messages [{role, content}] (SFT)")
    pack: bool = opt(
        False, "pack documents into full rows (causal LM), attention kept per document"
    )
    group_by_length: bool = opt(False, "batch examples of similar length together (less padding)")


@dataclass
class TrainConfig:
    max_steps: int | None = opt(None, "optimizer steps to run; default: from epochs")
    epochs: float = opt(1.0, "passes over the training data (when max_steps is not set)")
    max_tokens: int | None = opt(None, "stop after this many training tokens")
    batch_size: int = opt(4, "examples per micro-batch (per device)")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(5e-5, "peak learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay (not applied to biases and norms)")
    betas: list = opt([0.9, 0.999], "AdamW betas")
    warmup_steps: int | None = opt(None, "linear warmup steps; default: warmup_ratio of the run")
    warmup_ratio: float = opt(0.05, "warmup as a fraction of max_steps")
    schedule: str = opt("cosine", "learning-rate decay after warmup: cosine, linear or constant")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of lr")
    clip: float | None = opt(1.0, "max gradient norm; null disables clipping")
    seq_len: int = opt(512, "max tokens per example (or per packed row)")
    seed: int = opt(0, "seed for init, data order and sampling")
    precision: str = opt(
        "fp32",
        "dtype the weights are stored in: fp32, bf16 or fp16 (frozen weights stay in it, "
        "trainable ones get fp32 master copies, compute autocasts to it); auto: bf16 on CPUs "
        "with AMX and GPUs with bf16, else fp32 (the choice and why go in summary.json)",
    )
    autocast: str = opt(
        "auto",
        "compute dtype of matmuls: auto (follows precision), off, bf16 or fp16 (fp16 adds a "
        "grad scaler); --precision fp32 --autocast bf16 keeps fp32 weights, computes in bf16",
    )
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")
    dist: str = opt("auto", "distribution under torchrun: auto, ddp, fsdp or none")
    eval_every: int | None = opt(None, "evaluate every N steps; default: only at the end")
    eval_batches: int | None = opt(None, "cap the validation batches per evaluation")
    save_every: int | None = opt(None, "checkpoint every N steps; always at the end")
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep")
    early_stopping: int | None = opt(
        None, "stop after N evaluations without a better validation loss"
    )
    log_every: int = opt(1, "write metrics every N steps")
    dropout: float = opt(0.0, "residual dropout during training")
    activation_checkpointing: bool = opt(
        False, "recompute each block in backward: less activation memory, ~1/3 more compute"
    )
    samples: list = opt([], "prompts to generate from at each evaluation (generative runs)")
    sample_tokens: int = opt(40, "new tokens per sample")


@dataclass
class EvalConfig:
    domain: str | None = opt(None, "in-domain text for perplexity before/after (pretrain)")
    general: str | None = opt(None, "out-of-domain text for perplexity before/after: forgetting")
    window: int = opt(256, "perplexity window in tokens")
    stride: int = opt(128, "perplexity stride in tokens")
    max_tokens: int | None = opt(8192, "score at most this many tokens of each text (null: all)")
    instructions: str | None = opt(
        None, "IFEval-style prompts (JSONL): instruction following before/after, greedy"
    )
    instructions_limit: int | None = opt(40, "score the first N prompts of eval.instructions")
    instructions_max_new_tokens: int = opt(256, "new tokens per response for eval.instructions")


@dataclass
class ClassifyConfig:
    label_field: str = opt("label", "column holding the class label (classify)")
    labels: list = opt([], "label names in index order; default: the sorted labels in the data")
    template: str = opt(
        "{text}", "prompt modifiers around the text, e.g. 'Review: {text}\\nSentiment:'"
    )
    pooling: str | None = opt(
        None, "last, cls or mean; default: last token (decoders), cls (encoders)"
    )
    class_weights: list = opt([], "loss weight per label (imbalanced data); default: equal")
    folds: int = opt(0, "k-fold cross-validation: train k runs, report mean and std (0: off)")


@dataclass
class AlignConfig:
    loss: str = opt("dpo", "preference loss (align): dpo (sigmoid), ipo or hinge")
    beta: float = opt(0.1, "strength of the pull towards the reference model (align)")
    label_smoothing: float = opt(0.0, "conservative DPO: assumed chance a pair is mislabeled")
    precompute_ref: bool = opt(
        True, "reference log-probs computed once and cached in the run; false: every step"
    )
    prompt_field: str = opt("prompt", "column holding the prompt (text or chat messages)")
    chosen_field: str = opt("chosen", "column holding the preferred response")
    rejected_field: str = opt("rejected", "column holding the dispreferred response")
    strict: bool = opt(
        False,
        "stop at the first unusable pair (identical, empty, prompts differ) "
        "instead of skipping and counting it",
    )


@dataclass
class RuntimeConfig:
    linear: str = opt(
        "auto",
        "CPU linear kernels: auto (measured per machine, see `tunelab runtime`), torch or onednn "
        "(TUNELAB_ONEDNN=0/1 overrides)",
        choices=("auto", "torch", "onednn"),
    )
    allocator: str = opt(
        "auto",
        "keep: the command keeps freed memory for the next step (glibc thresholds); system: "
        "glibc's defaults; auto: keep below 1B parameters, system from there "
        "(TUNELAB_MALLOC=0/1 overrides)",
        choices=("auto", "keep", "system"),
    )
    attention: str = opt(
        "auto",
        "packed-attention backend: auto (rows on CPU, nested on CUDA), rows, mask or nested "
        "(TUNELAB_VARLEN overrides)",
        choices=("auto", "rows", "mask", "nested"),
    )


@dataclass
class RunConfig:
    task: str = opt("pretrain", "pretrain, finetune, classify or align")
    model: str | None = opt("smollm2-135m-instruct", "model name, directory, .gguf or hub id")
    arch: str | None = opt(
        None, "train from scratch with this architecture preset (e.g. gpt2-tiny)"
    )
    tokenizer: str | None = opt(None, "tokenizer directory or model name (from-scratch runs)")
    out: str | None = opt(None, "run directory; default runs/<task>-<timestamp>")
    resume: bool = opt(False, "continue the run in `out` from its latest checkpoint")
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    method: dict = opt({}, "adaptation method and its options (see `tunelab finetune --help`)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {
    "data": DataConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "classify": ClassifyConfig,
    "align": AlignConfig,
    "runtime": RuntimeConfig,
}


def _convert(value: Any, tp, key: str):
    """Coerce a YAML/CLI value to the field's type, with an error naming the key."""
    if value is None:
        return None
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    target = args[0] if args else tp
    try:
        if target is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if target in (list, dict) and isinstance(value, str):
            value = yaml.safe_load(value)
        if target is int and isinstance(value, float) and value != int(value):
            raise ValueError(value)
        if target is list and not isinstance(value, list):
            return [value]
        return target(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{key}: cannot use {value!r} as {getattr(target, '__name__', target)}"
        ) from None


def _build(cls, data: dict, prefix: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"unknown config key {prefix + key!r}{closest(key, fields)}")
        if key in SECTIONS and cls is RunConfig:
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of options")
            kwargs[key] = _build(SECTIONS[key], value, f"{key}.")
        else:
            kwargs[key] = _convert(value, hints[key], prefix + key)
    return cls(**kwargs)


def compute_precision(train: TrainConfig) -> str:
    """The dtype matmuls run in (fp32, bf16 or fp16): autocast's choice, else precision's."""
    if train.precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision {train.precision!r}: expected fp32, bf16 or fp16")
    if train.autocast == "auto":
        return train.precision
    if train.autocast == "off":
        if train.precision != "fp32":
            raise ConfigError(
                f"train.autocast off needs precision fp32: {train.precision} weights sit beside "
                "fp32 trainable ones, so compute must autocast"
            )
        return "fp32"
    return train.autocast


def set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        tree = tree.setdefault(p, {})
    tree[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> RunConfig:
    """A RunConfig from an optional YAML file plus dotted overrides ({'train.lr': 1e-4})."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        data = read_yaml(path, "config file") or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of options at the top level")
        if "study" in data or "experiments" in data:
            raise ConfigError(
                f"{path}: a study recipe, not a run's: run it with `tunelab study {path}`"
            )
    for dotted, value in (overrides or {}).items():
        if dotted.startswith("method."):
            set_dotted(data, dotted, yaml.safe_load(value) if isinstance(value, str) else value)
        else:
            set_dotted(data, dotted, value)
    return _build(RunConfig, data, "")


def option_docs() -> list[tuple[str, Any, str, type]]:
    """(dotted key, default, doc, type) for every option, for --help and the docs."""
    rows = []
    for f in dataclasses.fields(RunConfig):
        if f.name in SECTIONS:
            for g in dataclasses.fields(SECTIONS[f.name]):
                default = (
                    g.default_factory()
                    if g.default_factory is not dataclasses.MISSING
                    else g.default
                )
                rows.append((f"{f.name}.{g.name}", default, g.metadata.get("doc", ""), g.type))
        elif f.name != "method":
            rows.append((f.name, f.default, f.metadata.get("doc", ""), f.type))
    return rows


# (dotted key, flag, smallest value, whether the smallest is excluded) checked before any work.
LIMITS = (
    ("train.lr", "--lr", 0, True),
    ("train.max_steps", "--max-steps", 1, False),
    ("train.seq_len", "--seq-len", 1, False),
    ("train.batch_size", "--batch-size", 1, False),
    ("train.grad_accum", "--grad-accum", 1, False),
    ("train.epochs", "--epochs", 0, True),
    ("train.max_tokens", "--train.max_tokens", 1, False),
    ("train.eval_every", "--eval-every", 1, False),
    ("train.save_every", "--save-every", 1, False),
    ("train.log_every", "--train.log_every", 1, False),
    ("eval.window", "--eval.window", 2, False),
    ("eval.stride", "--eval.stride", 1, False),
    ("eval.instructions_limit", "--eval.instructions_limit", 1, False),
    ("eval.instructions_max_new_tokens", "--eval.instructions_max_new_tokens", 1, False),
    ("data.val_fraction", "--data.val_fraction", 0, False),
)
CHOICES = {
    "train.precision": ("--precision", ("fp32", "bf16", "fp16", "auto")),
    "train.autocast": ("--autocast", ("auto", "off", "bf16", "fp16")),
    "train.schedule": ("--train.schedule", ("cosine", "linear", "constant")),
}


def check_options(cfg: RunConfig) -> None:
    """Values no run can use, named by their flag, before anything is loaded or written."""

    def value(dotted: str):
        section, key = dotted.split(".")
        return getattr(getattr(cfg, section), key)

    for dotted, flag, low, strict in LIMITS:
        v = value(dotted)
        if v is not None and (v <= low if strict else v < low):
            bound = f"greater than {low}" if strict else f"at least {low}"
            raise ConfigError(f"{flag} {v}: must be {bound} ({dotted})")
    for dotted, (flag, allowed) in CHOICES.items():
        if value(dotted) not in allowed:
            raise ConfigError(
                f"{flag} {value(dotted)!r}: expected one of {', '.join(allowed)}"
                f"{closest(str(value(dotted)), allowed)}"
            )
    if cfg.eval.instructions:  # a bad prompt file stops the run before any training
        from tunelab.instructions.score import read_prompts

        read_prompts(cfg.eval.instructions, cfg.eval.instructions_limit)
    if cfg.classify.folds == 1 or cfg.classify.folds < 0:
        raise ConfigError(f"--folds {cfg.classify.folds}: use 0 (off) or at least 2 folds")
