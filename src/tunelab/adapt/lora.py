"""LoRA: low-rank updates beside frozen linear layers (PEFT's file format: adapt/peft_format.py)."""

from __future__ import annotations

import fnmatch
import math
from contextlib import contextmanager

import torch
from torch import nn

from tunelab.adapt.quantize import QuantLinear, quantize
from tunelab.errors import ConfigError, closest
from tunelab.model.transformer import autocast_dtype


class LoRALinear(nn.Module):
    """base(x) + B(A(dropout(x))) * scaling, with the base (float or quantized) frozen."""

    def __init__(
        self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False
    ):
        super().__init__()
        if r < 1:
            raise ConfigError(f"LoRA rank r must be at least 1, got {r}")
        self.base, self.r, self.alpha, self.rslora, self.merged = base, r, alpha, rslora, False
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base.weight if isinstance(base, nn.Linear) else None
        dtype = w.dtype if w is not None and w.is_floating_point() else torch.float32
        device = next(iter(base.buffers()), w).device if w is None else w.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as peft does
        nn.init.zeros_(self.lora_B.weight)  # so a new adapter starts as the identity
        for p in base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        # under autocast, A reads x in autocast's dtype: no float32 copy first
        h = self.dropout(x).to(autocast_dtype(x.device.type) or self.lora_A.weight.dtype)
        return y + (self.lora_B(self.lora_A(h)) * self.scaling).to(y.dtype)

    def delta(self) -> torch.Tensor:
        """The update B @ A * scaling, in float32."""
        a, b = self.lora_A.weight, self.lora_B.weight
        return self.add_delta_(b.new_zeros(b.shape[0], a.shape[1], dtype=torch.float32))

    def add_delta_(self, w: torch.Tensor) -> torch.Tensor:
        """w += B @ A * scaling in place (float32 w): no weight-sized temporaries, which is
        what keeps saving a 7B model's merged layers within a little of the model itself."""
        b, a = self.lora_B.weight.detach().float(), self.lora_A.weight.detach().float()
        return w.addmm_(b, a, alpha=self.scaling)

    def merge(self) -> None:
        """Fold the update into the base weight (a quantized base becomes a float nn.Linear)."""
        if self.merged:
            return
        if isinstance(self.base, QuantLinear):
            self.base = self.base.to_linear().requires_grad_(False)
        with torch.no_grad():
            w = self.base.weight
            if w.dtype == torch.float32:
                self.add_delta_(w)
            else:
                w.copy_(self.add_delta_(w.float()))
        self.merged = True

    def unmerge(self) -> None:
        """Undo merge(); the base stays float if it was quantized."""
        if not self.merged:
            return
        with torch.no_grad():
            w = self.base.weight
            w.copy_((w.float() - self.delta()).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, rslora={self.rslora}, merged={self.merged}"


def _linears(model: nn.Module, wrapped: bool = False) -> dict[str, nn.Module]:
    """The blocks' linear layers (float or quantized) by full name; heads excluded.

    wrapped=True also lists LoRA-wrapped layers (under their own name, not their parts').
    """
    layers = model.transformer.layers
    lora = {n for n, m in layers.named_modules() if isinstance(m, LoRALinear)}
    kinds = (nn.Linear, QuantLinear) + ((LoRALinear,) if wrapped else ())
    return {
        f"transformer.layers.{n}": m
        for n, m in layers.named_modules()
        if isinstance(m, kinds) and n.rpartition(".")[0] not in lora
    }


def _matches(name: str, target: str) -> bool:
    if any(c in target for c in "*?["):
        return fnmatch.fnmatchcase(name, target) or fnmatch.fnmatchcase(name, "*." + target)
    return name == target or name.endswith("." + target)


def _resolve(model: nn.Module, targets) -> list[str]:
    """Module names the targets pick; a target that picks nothing is an error naming the options."""
    names = list(_linears(model))
    if targets == "all-linear":
        return names
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    picked = []
    for t in targets:
        hits = [n for n in names if _matches(n, t)]
        if not hits:
            leaves = sorted({n.split(".", 3)[-1] for n in names})
            raise ConfigError(
                f"LoRA target {t!r} matches no linear layer; available: {', '.join(leaves)}"
                " (or 'all-linear')"
            )
        picked += [n for n in hits if n not in picked]
    return picked


def _wrap(
    model: nn.Module,
    specs: dict[str, tuple[int, float]],
    dropout: float,
    rslora: bool,
    train_embeddings: bool,
    train_head: bool,
) -> nn.Module:
    """Wrap each named module with its (r, alpha), freezing everything else."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, (r, alpha) in specs.items():
        parent, _, leaf = name.rpartition(".")
        base = model.get_submodule(name)
        setattr(model.get_submodule(parent), leaf, LoRALinear(base, r, alpha, dropout, rslora))
    if train_embeddings:
        model.transformer.tok_embed.weight.requires_grad_(True)
    if train_head and hasattr(model, "lm_head"):
        model.lm_head.weight.requires_grad_(True)  # tied models: this is the embedding too
    if hasattr(model, "score"):  # a classifier's head is new: it always trains (PEFT's SEQ_CLS)
        model.score.requires_grad_(True)
    return model


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    targets: str | tuple[str, ...] = ("q_proj", "v_proj"),
    rslora: bool = False,
    train_embeddings: bool = False,
    train_head: bool = False,
) -> nn.Module:
    """Wrap the target linear layers (suffixes, globs or 'all-linear') with LoRA, in place."""
    names = _resolve(model, targets)
    specs = {n: (r, alpha) for n in names}
    return _wrap(model, specs, dropout, rslora, train_embeddings, train_head)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding base + update, in place."""
    for name, module in lora_modules(model).items():
        module.merge()  # a quantized base becomes a float nn.Linear here
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, module.base)
    return model


def merged_tensors(model: nn.Module, dtype: torch.dtype | None = None):
    """(name, tensor) of the model as a plain one holds them, one at a time: each LoRA update
    folded into its base and each quantized base dequantized (in dtype, or the base's), without
    changing the model, so saving a QLoRA 7B never makes a float copy of all its layers.
    Tied heads are left out, as a saved state dict leaves them out."""
    tied = getattr(model.cfg, "tie_embeddings", False)
    done: set[str] = set()
    for name, m in model.named_modules():
        if any(name.startswith(d) for d in done):
            continue
        prefix = f"{name}." if name else ""
        if isinstance(m, (LoRALinear, QuantLinear)):
            base = m.base if isinstance(m, LoRALinear) else m
            out = dtype or torch.float32
            if isinstance(base, QuantLinear):
                w = base.dequantize(torch.float32)
            else:
                out = dtype or base.weight.dtype
                w = base.weight.detach().to(torch.float32, copy=True)  # the model stays as is
            if isinstance(m, LoRALinear) and not m.merged:
                m.add_delta_(w)
            yield prefix + "weight", w.to(out)
            if base.bias is not None:
                yield prefix + "bias", base.bias.detach().to(out)
            done.add(prefix)
            continue
        for key, t in [*m._parameters.items(), *m._buffers.items()]:
            if t is None or key in m._non_persistent_buffers_set:
                continue
            if tied and prefix + key in ("lm_head.weight", "mlm_head.decoder.weight"):
                continue
            yield (
                prefix + key,
                t.detach().to(dtype) if dtype and t.is_floating_point() else t.detach(),
            )


# ---- options from recipes and the command line ---------------------------------------------

_OPTIONS = {
    "r": int,
    "alpha": float,
    "dropout": float,
    "targets": tuple,
    "rslora": bool,
    "train_embeddings": bool,
    "train_head": bool,
}
_QOPTIONS = {"bits": str, "double_quant": bool}
# peft's and others' names for our options, for a better "did you mean"
_ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target_modules": "targets",
    "use_rslora": "rslora",
}


def _coerce(key: str, value, kind):
    """A recipe or CLI value (often a string) as the type the option needs."""
    if kind is bool and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"method option {key}: expected true or false, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    if kind is tuple:
        if isinstance(value, str):
            value = value.strip()
            return value if value == "all-linear" else tuple(v.strip() for v in value.split(","))
        return tuple(value)
    if kind is str:
        return str(value).lower()
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"method option {key}: expected {kind.__name__}, got {value!r}") from None


def quantization(options: dict) -> tuple[str, bool]:
    """(bits, double_quant) of a qlora method's options, e.g. for quantizing as weights are read."""
    bits = _coerce("bits", options.get("bits", "nf4"), str)
    double = _coerce("double_quant", options.get("double_quant", True), bool)
    return {"4": "nf4", "8": "int8"}.get(bits, bits), double


def lora_method(model: nn.Module, options: dict, quantized: bool = False) -> list:
    """The 'lora' and 'qlora' methods: checked, coerced options; quantize first for qlora."""
    allowed = {**_OPTIONS, **(_QOPTIONS if quantized else {})}
    opts = {}
    for key, value in options.items():
        if key not in allowed:
            hint = (
                f" (did you mean {_ALIASES[key]!r}?)" if key in _ALIASES else closest(key, allowed)
            )
            raise ConfigError(
                f"unknown {'qlora' if quantized else 'lora'} option {key!r}{hint};"
                f" valid: {', '.join(allowed)}"
            )
        opts[key] = _coerce(key, value, allowed[key])
    if quantized:  # a base loaded with quantize_on_read's options is quantized already
        quantize(model, *quantization(opts))
        opts.pop("bits", None), opts.pop("double_quant", None)
    apply_lora(model, **opts)
    return []


@contextmanager
def adapters_disabled(model: nn.Module):
    """Inside, the model runs as its base alone (LoRA updates skipped): e.g. a DPO reference."""
    live = [m for m in lora_modules(model).values() if not m.merged]
    for m in live:
        m.merged = True  # forward() then returns base(x) only; the weights are not touched
    try:
        yield model
    finally:
        for m in live:
            m.merged = False
