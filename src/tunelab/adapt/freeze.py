"""Freezing by layer range or name pattern, and gradual unfreezing (ULMFiT) as a loop callback.

Parameters fall into parts by name: `transformer.layers.{i}` (block i), `transformer.norm`
(final norm), the embeddings (`tok_embed`, `pos_embed`, `type_embed`, `embed_norm`) and the head
(everything outside `transformer.`: `lm_head`, a pooler, an MLM or classification head).
A head tied to the embeddings (SmolLM2, Gemma, BERT's MLM decoder) is one tensor with two
names: it trains when either the head or the embeddings are asked to train.
"""

from __future__ import annotations

import logging
import math
from fnmatch import fnmatch

import torch

from tunelab.errors import ConfigError, closest

log = logging.getLogger("tunelab")

LAYER_FORMS = (
    "'all', 'none', 'top:K', 'bottom:K', an index 'I', a range 'I-J', "
    "a comma-separated mix ('0-3,10') or a list of indices"
)
_EMBED = ("tok_embed", "pos_embed", "type_embed", "embed_norm")


def part_of(name: str) -> str | int:
    """'head', 'embed', 'norm', 'other' or the block index a parameter name belongs to."""
    parts = name.split(".")
    if parts[0] != "transformer":
        return "head"
    if parts[1] == "layers":
        return int(parts[2])
    if parts[1] == "norm":
        return "norm"
    return "embed" if parts[1] in _EMBED else "other"


def n_blocks(model) -> int:
    """Number of transformer blocks; a ConfigError for models without `transformer.layers`."""
    layers = getattr(getattr(model, "transformer", None), "layers", None)
    if layers is None:
        raise ConfigError("freeze needs a tunelab model with transformer.layers")
    return len(layers)


def parse_layers(spec, n_layer: int) -> list[int]:
    """Block indices named by a spec such as 'top:2', '0-3', '0-3,10', 5 or [0, 1]."""

    def bad(why: str = "") -> ConfigError:
        why = f" ({why})" if why else ""
        return ConfigError(f"train_layers={spec!r}{why}: expected {LAYER_FORMS}")

    if spec is None:
        return []
    if isinstance(spec, bool):
        raise bad()
    if isinstance(spec, int):
        items = [str(spec)]
    elif isinstance(spec, (list, tuple)):
        items = [str(s) for s in spec]
    elif isinstance(spec, str):
        items = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        raise bad()
    out: set[int] = set()
    for item in items:
        low = item.lower()
        if low in ("all", "none"):
            out |= set(range(n_layer)) if low == "all" else set()
            continue
        try:
            if ":" in low:
                side, k = low.split(":")
                if side not in ("top", "bottom") or int(k) < 0:
                    raise bad()
                k = min(int(k), n_layer)
                out |= set(range(n_layer - k, n_layer) if side == "top" else range(k))
                continue
            lo, _, hi = item.partition("-") if not item.startswith("-") else (item, "", "")
            lo_i, hi_i = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise bad() from None
        if not 0 <= lo_i <= hi_i < n_layer:
            raise bad(f"the model has blocks 0-{n_layer - 1}")
        out |= set(range(lo_i, hi_i + 1))
    return sorted(out)


def _patterns(patterns) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [p.strip() for p in patterns.split(",") if p.strip()]
    if isinstance(patterns, (list, tuple)) and all(isinstance(p, str) for p in patterns):
        return list(patterns)
    raise ConfigError(f"patterns={patterns!r}: expected a glob or a list of globs on names")


def _tensors(model) -> dict[int, tuple[torch.nn.Parameter, list[str]]]:
    """Each distinct parameter tensor with all the names it goes by (tied weights have two)."""
    found: dict[int, tuple[torch.nn.Parameter, list[str]]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        found.setdefault(id(p), (p, []))[1].append(name)
    return found


def freeze(
    model,
    train_layers="top:2",
    patterns=None,
    train_head: bool = True,
    train_embeddings: bool = False,
    train_norm: bool = True,
):
    """Freeze everything, then let the chosen blocks, name patterns, head and final norm train."""
    layers = set(parse_layers(train_layers, n_blocks(model)))
    globs = _patterns(patterns)
    used: set[str] = set()
    wanted = {"head": train_head, "embed": train_embeddings, "norm": train_norm}
    for p, names in _tensors(model).values():
        on = False
        for name in names:
            part = part_of(name)
            hits = {g for g in globs if fnmatch(name, g)}
            used |= hits
            on = on or bool(hits) or (part in layers if isinstance(part, int) else wanted.get(part))
        parts = {part_of(n) for n in names}
        if {"head", "embed"} <= parts and train_head != train_embeddings:
            log.warning(
                "%s share one tensor (tied embeddings): it %s because train_head=%s and "
                "train_embeddings=%s; set both to false to freeze it",
                " and ".join(names),
                "trains" if on else "stays frozen",
                train_head,
                train_embeddings,
            )
        p.requires_grad_(bool(on))
    unused = [g for g in globs if g not in used]
    if unused:
        names = [n for n, _ in model.named_parameters()]
        raise ConfigError(
            f"patterns {unused} match no parameter name{closest(unused[0], names)}; "
            f"names look like {names[0]!r}"
        )
    return model


class GradualUnfreezing:
    """ULMFiT: the head (and final norm) train first; every N steps one more block, top down.

    Every eventually-trainable tensor is in the optimizer from the start, in a group per stage
    with its learning-rate factor (`optimizer_stages`: the loop builds the groups, the method
    never touches the optimizer); not-yet-unfrozen ones keep requires_grad=False, so they get
    no gradient, AdamW skips them (no state, weights bit-identical) and the LR schedule covers
    every group. The stage follows from the step alone, so a resumed run rebuilds it exactly.
    """

    def __init__(
        self,
        every_steps: int | None = None,
        every_epochs: float | None = None,
        start: str = "head",
        lr_decay: float | None = None,
        embeddings: bool = True,
    ):
        if (every_steps is None) == (every_epochs is None):
            raise ConfigError("gradual unfreezing: give exactly one of every_steps, every_epochs")
        if every_steps is not None and (isinstance(every_steps, bool) or int(every_steps) < 1):
            raise ConfigError(f"every_steps={every_steps!r}: expected an integer >= 1")
        if every_epochs is not None and not float(every_epochs) > 0:
            raise ConfigError(f"every_epochs={every_epochs!r}: expected a number > 0")
        if start not in ("head", "top"):
            raise ConfigError(
                f"start={start!r}{closest(start, ('head', 'top'))}: expected head or top"
            )
        if lr_decay is not None and not 0 < float(lr_decay) <= 1:
            raise ConfigError(f"lr_decay={lr_decay!r}: expected a factor in (0, 1], e.g. 0.38")
        self.every_steps = None if every_steps is None else int(every_steps)
        self.every_epochs = None if every_epochs is None else float(every_epochs)
        self.start, self.lr_decay, self.embeddings = start, lr_decay, embeddings
        self.stages: list[tuple[list[str], float]] = []  # (parameter names, lr factor), in order
        self.every = self.every_steps or 0

    def plan(self, model) -> list[tuple[list[str], float]]:
        """Stages in unfreezing order: head + final norm, blocks top down, then embeddings."""
        n, decay = n_blocks(model), self.lr_decay or 1.0
        first = ["head", "norm"] + ([n - 1] if self.start == "top" else [])
        keys = [first] + [[i] for i in range(n - 1, -1, -1) if i not in first]
        keys += [["embed"]] if self.embeddings else []
        stage_of = {k: s for s, ks in enumerate(keys) for k in ks}
        # Block i learns at lr * decay^(n-1-i); head, norm and (with start=top) the top block at lr.
        factor = [
            1.0 if s == 0 else decay ** (n - 1 - ks[0] if ks[0] != "embed" else n)
            for s, ks in enumerate(keys)
        ]
        named = {name for name, _ in model.named_parameters()}  # one name per tensor
        stages: list[list[str]] = [[] for _ in keys]
        for _, names in _tensors(model).values():
            found = [stage_of[part_of(n)] for n in names if part_of(n) in stage_of]
            if found:  # a tied tensor joins the earlier of its stages
                stages[min(found)].append(next(n for n in names if n in named))
        return [(s, factor[i]) for i, s in enumerate(stages) if s]

    def stage_count(self, step: int) -> int:
        """How many stages train during optimizer step `step` (0-based)."""
        return min(len(self.stages), 1 + step // self.every)

    def _apply(self, trainer, step: int) -> None:
        params = dict(trainer.model.named_parameters())
        for i, (names, _) in enumerate(self.stages[: self.stage_count(step)]):
            if not params[names[0]].requires_grad:
                log.info(
                    "gradual unfreezing: stage %d (%s...) trains from step %d",
                    i,
                    names[0],
                    step + 1,
                )
            for name in names:
                params[name].requires_grad_(True)

    # -- loop callbacks ----------------------------------------------------------------------
    def on_start(self, trainer) -> None:
        """Plan the stages and freeze all but the first."""
        self.stages = self.plan(trainer.model)
        if self.every_epochs is not None:
            if not hasattr(trainer.batches, "__len__"):
                raise ConfigError("every_epochs needs data with a length; use every_steps")
            per_epoch = len(trainer.batches) / trainer.cfg.grad_accum
            self.every = max(1, math.ceil(self.every_epochs * per_epoch - 1e-9))
        for p in trainer.model.parameters():
            p.requires_grad_(False)
        self._apply(trainer, 0)

    def optimizer_stages(self) -> list[tuple[list[str], float]]:
        """(parameter names, lr factor) per stage, unfrozen or not: the loop makes one optimizer
        group per stage (train/optim.py stage_groups), so every stage is in from the start."""
        return self.stages

    def on_step(self, trainer, step: int) -> None:
        self._apply(trainer, step)

    def on_resume(self, trainer, step: int) -> None:
        self._apply(trainer, step)

    def on_optimizer(self, trainer) -> None:
        pass


FREEZE_OPTIONS = ("train_layers", "patterns", "train_head", "train_embeddings", "train_norm")
GRADUAL_OPTIONS = ("every_steps", "every_epochs", "start", "lr_decay", "embeddings")


def freeze_method(model, options: dict) -> list:
    """The `freeze` method: a static freeze, or gradual unfreezing when every_* is given."""
    valid = FREEZE_OPTIONS + GRADUAL_OPTIONS
    for key in options:
        if key not in valid:
            raise ConfigError(f"method freeze: unknown option {key!r}{closest(key, valid)}")
    gradual = {k: v for k, v in options.items() if k in GRADUAL_OPTIONS}
    if not gradual:
        freeze(model, **options)
        return []
    static = [k for k in options if k in FREEZE_OPTIONS]
    if static:
        raise ConfigError(
            f"method freeze: {', '.join(static)} cannot be combined with gradual unfreezing "
            "(every_steps / every_epochs), which decides by itself what trains"
        )
    return [GradualUnfreezing(**gradual)]
