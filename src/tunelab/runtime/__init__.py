"""The CPU runtime as one explicit layer: which kernels the linear layers run on, how memory is
kept between steps, how packed rows attend. Chosen once, from the run config's `runtime`
section, when a model is prepared (`prepare_runtime`), and recorded in summary.json.

  linear     auto | torch | onednn          TUNELAB_ONEDNN=0 forces torch, =1 onednn
  allocator  auto | keep | system           TUNELAB_MALLOC=0 means system, =1 keep
  attention  auto | rows | mask | nested    TUNELAB_VARLEN=rows|mask|nested

The environment variables are overrides of these keys and nothing more. `linear: auto` takes,
per shape class, the kernel measured fastest on this machine (runtime/choose.py; `tunelab
runtime` shows the table); kernels.py holds the kernels, allocator.py the malloc settings.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from tunelab.errors import ConfigError, closest
from tunelab.runtime import choose
from tunelab.runtime.allocator import CHOICES as ALLOCATOR
from tunelab.runtime.allocator import active, allocator_choice, keep_freed_memory
from tunelab.runtime.kernels import FastLinear, decoding, onednn_works, prepare_linears

__all__ = [
    "Runtime",
    "resolve",
    "prepare_runtime",
    "decoding",
    "FastLinear",
    "keep_freed_memory",
    "fused_adamw",
]

LINEAR = ("auto", "torch", "onednn")
ATTENTION = ("auto", "rows", "mask", "nested")


@dataclass(frozen=True)
class Runtime:
    """The resolved choices: the kernel per shape class, and where they came from."""

    linear: str = "torch"
    kernels: dict = field(default_factory=lambda: {c: "torch" for c in choose.KEYS})
    source: str = "forced"
    allocator: str = "auto"
    attention: str = "auto"
    machine: dict | None = None

    def record(self, model: nn.Module | None = None) -> dict:
        """What summary.json keeps: the configured values, the resolved ones, and why."""
        rec = dict(
            linear=self.linear,
            kernels=dict(self.kernels),
            source=self.source,
            allocator=self.allocator,
            malloc_settings=active(),
            attention=self.attention,
        )
        if model is not None:
            rec["attention_backend"] = attention_backend(model, self.attention)
        if self.machine:
            rec["machine"] = self.machine
        return rec


def _check(key: str, value: str, allowed: tuple, env: str | None = None) -> str:
    if value not in allowed:
        where = f"{env}={value!r}" if env else f"runtime.{key} {value!r}"
        raise ConfigError(
            f"{where}{closest(str(value), allowed)}; expected one of {', '.join(allowed)}"
        )
    return value


def _env(name: str, value: str, mapping: dict | None = None) -> tuple[str, str | None]:
    got = os.environ.get(name)
    if not got:
        return value, None
    return (mapping or {}).get(got, got), name


def resolve(
    linear: str = "auto",
    allocator: str = "auto",
    attention: str = "auto",
    device: str | torch.device = "cpu",
    sharded: bool = False,
    rerun: bool = False,
) -> Runtime:
    """The choices for a model on `device`, environment overrides applied; `linear: auto`
    reads this machine's measured table (measuring it the first time)."""
    linear, lenv = _env("TUNELAB_ONEDNN", linear, {"0": "torch", "1": "onednn"})
    _check("linear", linear, LINEAR, lenv)
    attention, aenv = _env("TUNELAB_VARLEN", attention)
    _check("attention", attention, ATTENTION, aenv)
    alloc = _check("allocator", allocator_choice(allocator), ALLOCATOR)
    common = dict(linear=linear, allocator=alloc, attention=attention)
    if torch.device(device).type != "cpu":
        return Runtime(**common, source="not on the CPU: torch")
    if sharded:
        return Runtime(**common, source="FSDP's sharded parameters keep torch's path")
    if linear == "torch":
        return Runtime(**common, source=f"forced ({lenv})" if lenv else "forced")
    if linear == "onednn":
        kernels = {}
        for cls in choose.KEYS:
            phase, dtype = cls.removesuffix(choose.ONE_ROW).split("-")
            if phase == "dequant":  # not a oneDNN product: torch's threads
                kernels[cls] = "torch"
                continue
            works = onednn_works(choose.DTYPES[dtype])
            kernels[cls] = ("onednn" if phase == "train" else "packed+fused") if works else "torch"
        why = "forced" + (f" ({lenv})" if lenv else "")
        if "torch" in kernels.values():
            why += "; oneDNN does not run here for " + ", ".join(
                c for c, k in kernels.items() if k == "torch"
            )
        return Runtime(**common, kernels=kernels, source=why)
    found = choose.measured(rerun=rerun)
    return Runtime(
        **common,
        kernels=dict(found["choice"]),
        source=f"measured {found['measured']}",
        machine=found["machine"],
    )


def prepare_runtime(model: nn.Module, config=None, *, sharded: bool = False) -> Runtime:
    """Prepare model for the runtime `config` (the run config's `runtime` section, anything
    with its fields, or None for the defaults): its linear layers become FastLinear holding
    the chosen kernels, its transformer gets the attention backend. Returns the choices."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    runtime = resolve(
        getattr(config, "linear", "auto"),
        getattr(config, "allocator", "auto"),
        getattr(config, "attention", "auto"),
        device,
        sharded,
    )
    prepare_linears(model, runtime.kernels)
    one = runtime.kernels.get("dequant-nf4") == "one-thread"
    for m in model.modules():
        if hasattr(m, "attention_backend"):
            m.attention_backend = runtime.attention
        if hasattr(m, "dequant_threads"):  # NF4Linear
            m.dequant_threads = 1 if one else None
    return runtime


def attention_backend(model: nn.Module, choice: str) -> str | None:
    """The packed-attention backend the model's transformer will run (model/varlen.py)."""
    from tunelab.model.varlen import backend_for

    cfg = next((m.cfg for m in model.modules() if hasattr(m, "attention_backend")), None)
    param = next(model.parameters(), None)
    if cfg is None or param is None:
        return None
    return backend_for(param.device, param.dtype, cfg.head_dim, cfg.causal, choice)


@contextmanager
def threads(n: int | None):
    """torch's thread count set to n for a block of work and restored after it, so a study
    cell's setting (one thread on a busy machine) does not outlive the cell."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fused_adamw(device) -> bool:
    """Whether AdamW runs fused on this device: one kernel, no model-sized temporaries (CPU since
    torch 2.4, CUDA); elsewhere foreach, whose step makes a temporary the size of the parameters.
    The optimizer (train/optim.py) and the memory estimate (adapt/estimate.py) both follow it."""
    return torch.device(device).type in ("cuda", "cpu")
