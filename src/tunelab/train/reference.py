"""The reference model of preference alignment: the model as alignment started.

Its log-probs are computed once and cached in the run directory (keyed by the pairs, the
start model and the precision), or recomputed each step: by the policy with its LoRA adapters
disabled, or by a frozen copy when more than LoRA trains.
"""

from __future__ import annotations

import copy
import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from tunelab.data.preference import collate_pairs, pair_logps, pair_tokens
from tunelab.files import atomic_file
from tunelab.model.weights import write_file
from tunelab.train.config import RunConfig, compute_precision

REFERENCE_FILE = "reference_logps.safetensors"


@contextmanager
def evaluating(model):
    """The model in eval mode (no dropout) inside, its previous mode after."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def only_lora_trains(model) -> bool:
    """True when the LoRA weights, all of them, are all that trains: disabling them then gives
    the starting model (a frozen adapter loaded before, e.g. an SFT one, would be lost)."""
    from tunelab.adapt.lora import lora_modules

    prefixes = tuple(f"{n}.lora_" for n in lora_modules(model))
    params = dict(model.named_parameters())
    lora = {n for n in params if prefixes and n.startswith(prefixes)}
    trainable = {n for n, p in params.items() if p.requires_grad}
    return bool(lora) and lora == trainable


def live_reference(model):
    """(fn(batch) -> reference log-probs, description) computed each step from the start model.

    With LoRA the policy itself with its adapters off: the base holds the starting weights
    (an SFT model's merged weights when alignment starts from its final/). Otherwise a frozen
    copy of the model taken now, before any step.
    """
    from tunelab.adapt.lora import adapters_disabled

    if only_lora_trains(model):

        def disabled(batch):
            with torch.no_grad(), evaluating(model), adapters_disabled(model):
                return pair_logps(model, batch)

        return disabled, "policy with LoRA disabled, each step"
    frozen = copy.deepcopy(model).requires_grad_(False).eval()

    def copied(batch):
        with torch.no_grad():
            return pair_logps(frozen, batch)

    return copied, "frozen copy, each step"


def compute_reference(model, parts: dict[str, list[dict]], cfg: RunConfig, pad_id: int) -> dict:
    """{part: (chosen, rejected) float tensors}: the model's log-probs for every pair, now."""
    from tunelab.train.loop import autocast

    device = next(model.parameters()).device
    out = {}
    with torch.no_grad(), evaluating(model):
        for name, examples in parts.items():
            chosen, rejected = torch.zeros(len(examples)), torch.zeros(len(examples))
            if name == "val":  # the validation batches themselves: 'before' is then an exact tie
                order, size = list(range(len(examples))), cfg.train.batch_size
            else:  # longest first, in similar-length batches: little padding, one memory peak
                order = sorted(range(len(examples)), key=lambda i: -pair_tokens(examples[i]))
                size = max(8, cfg.train.batch_size)
            for k in range(0, len(order), size):
                idx = order[k : k + size]
                batch = collate_pairs([examples[i] for i in idx], pad_id)
                batch = {key: v.to(device) for key, v in batch.items()}
                with autocast(device, compute_precision(cfg.train)):
                    c, r = pair_logps(model, batch)
                chosen[idx], rejected[idx] = c.float().cpu(), r.float().cpu()
            out[name] = (chosen, rejected)
    return out


def reference_key(parts: dict[str, list[dict]], cfg: RunConfig) -> str:
    """What the cached reference log-probs depend on: the pairs, the start model and precision."""
    h = hashlib.sha256()
    start = dict(
        model=cfg.model,
        arch=cfg.arch,
        tokenizer=cfg.tokenizer,
        method=cfg.method,
        seed=cfg.train.seed,
        precision=cfg.train.precision,
        compute=compute_precision(cfg.train),
    )
    h.update(json.dumps(start, sort_keys=True, default=str).encode())
    for name, examples in parts.items():
        h.update(name.encode())
        for e in examples:
            h.update(json.dumps([e["prompt"], e["chosen"], e["rejected"]]).encode())
    return h.hexdigest()


def cached_reference(model, parts: dict, cfg: RunConfig, pad_id: int, path: Path) -> dict:
    """compute_reference's result, read from `path` when it was written for the same key."""
    key = reference_key(parts, cfg)
    if path.exists():
        try:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    return {
                        n: (f.get_tensor(f"{n}.chosen"), f.get_tensor(f"{n}.rejected"))
                        for n in parts
                    }
        except Exception:  # a damaged cache is recomputed, never fatal
            pass
    ref = compute_reference(model, parts, cfg, pad_id)
    tensors = {
        f"{n}.{side}": t.contiguous()
        for n, (c, r) in ref.items()
        for side, t in (("chosen", c), ("rejected", r))
    }
    path.parent.mkdir(parents=True, exist_ok=True)  # before the run directory is opened
    with atomic_file(path) as tmp:  # a kill never leaves a half-written cache
        write_file(tensors, tmp, {"key": key})  # into atomic_file's file, keeping its mode
    return ref
