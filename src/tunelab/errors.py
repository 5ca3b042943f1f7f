"""Errors the CLI prints in one line; each message says what to do about it."""

import difflib


class TunelabError(Exception):
    """Base class for every error tunelab raises on purpose."""


class ConfigError(TunelabError):
    """A bad key or value in a config, a recipe or on the command line."""


class ModelError(TunelabError):
    """A model that cannot be found, read or converted."""


class DataError(TunelabError):
    """Input data that cannot be used; the message names file and line."""


# Names other tools give our options: a match here beats spelling.
SYNONYMS = {
    "learning_rate": "lr",
    "learningrate": "lr",
    "steps": "max_steps",
    "num_steps": "max_steps",
    "train_steps": "max_steps",
    "max_train_steps": "max_steps",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "bs": "batch_size",
    "batch": "batch_size",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "accumulation": "grad_accum",
    "max_length": "seq_len",
    "max_seq_length": "seq_len",
    "seq_length": "seq_len",
    "context_length": "seq_len",
    "block_size": "seq_len",
    "wd": "weight_decay",
    "warmup": "warmup_steps",
    "max_grad_norm": "clip",
    "grad_clip": "clip",
    "lr_scheduler_type": "schedule",
    "scheduler": "schedule",
    "dtype": "precision",
    "output_dir": "out",
    "output": "out",
    "resume_from_checkpoint": "resume",
}


def _words(name: str) -> set[str]:
    return {w for w in name.lower().lstrip("-").replace("-", "_").replace(".", "_").split("_") if w}


def closest(name: str, options) -> str:
    """' (did you mean X?)' for the closest option, or '' when nothing is close: a known
    synonym first (learning_rate -> lr), then spelling, then shared words."""
    options = list(options)
    bare = {o.lower().lstrip("-").replace("-", "_"): o for o in options}
    key = name.lower().lstrip("-").replace("-", "_")
    for candidate in (key, key.rsplit(".", 1)[-1]):
        target = SYNONYMS.get(candidate)
        for o_key, o in bare.items():
            if target and (o_key == target or o_key.endswith("." + target)):
                return f" (did you mean {o!r}?)"
    match = difflib.get_close_matches(key, list(bare), n=1, cutoff=0.6)
    if not match:
        shared = [(len(_words(key) & _words(k)), k) for k in bare]
        best = max(shared, default=(0, ""))
        match = (
            [best[1]] if best[0] else difflib.get_close_matches(key, list(bare), n=1, cutoff=0.4)
        )
    return f" (did you mean {bare[match[0]]!r}?)" if match else ""


class MemoryLimitError(TunelabError):
    """A run that the memory estimate says will not fit; the message names what would."""
