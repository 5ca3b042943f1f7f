"""LoRA: low-rank updates beside frozen linear layers, and adapters in PEFT's file format.

Adapters are saved under the module names of the equivalent transformers model (from
model/convert.py's tables), so `peft.PeftModel.from_pretrained` reads them and we read peft's.
GPT-2's fused c_attn is written as one exact block LoRA: A stacks the q/k/v A's, B is
block-diagonal, and rank_pattern/alpha_pattern keep each part's scaling.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab.adapt.quantize import QuantLinear, quantize
from tunelab.errors import ConfigError, ModelError, closest
from tunelab.model.convert import _COMPILED, _canonical_hf, _rename

CONFIG, WEIGHTS, PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."
_QKV = re.compile(r"^transformer\.layers\.(\d+)\.attn\.([qkv])_proj$")


class LoRALinear(nn.Module):
    """base(x) + B(A(dropout(x))) * scaling, with the base (float or quantized) frozen."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False):  # fmt: skip
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
        h = self.dropout(x).to(self.lora_A.weight.dtype)
        return y + (self.lora_B(self.lora_A(h)) * self.scaling).to(y.dtype)

    def delta(self) -> torch.Tensor:
        """The update B @ A * scaling, in float32."""
        return self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scaling

    def merge(self) -> None:
        """Fold the update into the base weight (a quantized base becomes a float nn.Linear)."""
        if self.merged:
            return
        if isinstance(self.base, QuantLinear):
            self.base = self.base.to_linear().requires_grad_(False)
        with torch.no_grad():
            w = self.base.weight
            w.copy_((w.float() + self.delta()).to(w.dtype))
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


def _wrap(model: nn.Module, specs: dict[str, tuple[int, float]], dropout: float, rslora: bool,
          train_embeddings: bool, train_head: bool) -> nn.Module:  # fmt: skip
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
        module.merge()
        base = module.base
        if isinstance(base, QuantLinear):  # merged already made it float; be safe
            base = base.to_linear()
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, base)
    return model


# ---- PEFT format --------------------------------------------------------------------------


def _hf_module(name: str, cfg) -> str:
    """The transformers module name of one of our linear layers."""
    m = _QKV.match(name)
    if cfg.family == "gpt2" and m:
        return f"transformer.h.{m[1]}.attn.c_attn"
    hf = _rename(name + ".weight", _COMPILED[cfg.family], forward=False)
    if hf is None:
        raise ModelError(f"{name} has no transformers name in family {cfg.family}")
    hf = hf[: -len(".weight")]
    # export_hf writes a BertModel, whose names lack 'bert.'; its classifier keeps them
    return hf if cfg.labels else hf.removeprefix("bert.")


def _our_modules(hf: str, cfg) -> list[str]:
    """Our module names for a transformers module name (three for GPT-2's c_attn)."""
    hf = _canonical_hf(hf + ".weight", cfg.family)[: -len(".weight")]
    m = re.match(r"^transformer\.h\.(\d+)\.attn\.c_attn$", hf)
    if cfg.family == "gpt2" and m:
        return [f"transformer.layers.{m[1]}.attn.{p}_proj" for p in "qkv"]
    ours = _rename(hf + ".weight", _COMPILED[cfg.family], forward=True)
    if ours is None:
        raise ModelError(f"adapter module {hf!r} has no place in a {cfg.family} model")
    return [ours[: -len(".weight")]]


def _fused_gpt2(parts: dict[str, LoRALinear], d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An exact block LoRA for c_attn: A stacks the parts' A's, B places each B on its rows."""
    a = torch.cat([m.lora_A.weight.detach() for m in parts.values()])
    b = torch.zeros(3 * d, a.shape[0], dtype=a.dtype, device=a.device)
    col = 0
    for p, m in parts.items():
        row = "qkv".index(p) * d
        b[row : row + d, col : col + m.r] = m.lora_B.weight.detach()
        col += m.r
    return a, b


def save_adapter(model: nn.Module, path: str | Path) -> None:
    """Write adapter_config.json + adapter_model.safetensors in PEFT's layout and names."""
    cfg, mods = model.cfg, lora_modules(model)
    if not mods:
        raise ConfigError("the model has no LoRA layers to save; apply_lora first")
    drop = {(m.rslora, getattr(m.dropout, "p", 0.0)) for m in mods.values()}
    if len(drop) > 1:
        raise ConfigError("LoRA layers differ in rslora or dropout; PEFT stores one of each")
    ((rslora, dropout),) = drop
    tensors, ranks, alphas, fused = {}, {}, {}, {}
    for name, m in mods.items():
        if m.merged:
            raise ConfigError(f"{name} is merged; unmerge before saving the adapter")
        hf = _hf_module(name, cfg)
        if cfg.family == "gpt2" and _QKV.match(name):
            fused.setdefault(hf, {})[_QKV.match(name)[2]] = m
            continue
        tensors[f"{PREFIX}{hf}.lora_A.weight"] = m.lora_A.weight.detach()
        tensors[f"{PREFIX}{hf}.lora_B.weight"] = m.lora_B.weight.detach()
        ranks[hf], alphas[hf] = m.r, m.alpha
    for hf, parts in fused.items():
        if len({(m.r, m.alpha) for m in parts.values()}) > 1:
            raise ConfigError(f"{hf}: q/k/v LoRA ranks differ; one fused GPT-2 adapter needs one")
        m, total = next(iter(parts.values())), sum(p.r for p in parts.values())
        a, b = _fused_gpt2(parts, cfg.n_head * cfg.head_dim)
        tensors[f"{PREFIX}{hf}.lora_A.weight"], tensors[f"{PREFIX}{hf}.lora_B.weight"] = a, b
        # keep each part's scaling: alpha'/r' (or alpha'/sqrt(r')) equal to the part's
        ratio = total / m.r
        ranks[hf], alphas[hf] = total, m.alpha * (math.sqrt(ratio) if m.rslora else ratio)
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    leaves = sorted({".".join(h.split(".")[-2:]) for h in ranks})
    every = {_hf_module(n, cfg) for n in _linears(model, wrapped=True)}
    covered = {h for h in every if any(h.endswith("." + s) for s in leaves)}
    # a suffix list is what people write; fall back to an exact regex when it would over-reach
    targets = leaves if covered == set(ranks) else "^(" + "|".join(map(re.escape, ranks)) + ")$"
    to_save = []
    if model.transformer.tok_embed.weight.requires_grad:
        to_save.append(_hf_module_param(model, "transformer.tok_embed", tensors))
    head = getattr(model, "lm_head", None)
    if head is not None and head.weight.requires_grad and not cfg.tie_embeddings:
        to_save.append(_hf_module_param(model, "lm_head", tensors))
    if hasattr(model, "score"):
        to_save.append(_hf_module_param(model, "score", tensors))
    config = dict(
        peft_type="LORA", task_type=_task_type(cfg), r=r, lora_alpha=alpha,
        lora_dropout=dropout, target_modules=targets, use_rslora=rslora, bias="none",
        fan_in_fan_out=cfg.family == "gpt2",  # its Conv1D stores (in, out)
        rank_pattern={re.escape(h): v for h, v in ranks.items() if v != r},
        alpha_pattern={re.escape(h): v for h, v in alphas.items() if v != alpha},
        modules_to_save=to_save or None, init_lora_weights=True, inference_mode=True,
        base_model_name_or_path=None, layers_to_transform=None, use_dora=False,
    )  # fmt: skip
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.float().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})
    (path / CONFIG).write_text(json.dumps(config, indent=2))


def _task_type(cfg) -> str | None:
    return "SEQ_CLS" if cfg.labels else "CAUSAL_LM" if cfg.causal else None


def _hf_module_param(model: nn.Module, ours: str, tensors: dict) -> str:
    """Add a fully trained module (PEFT's modules_to_save) to tensors; return its HF leaf."""
    module = model.get_submodule(ours)
    for kind in ("weight", "bias"):
        if getattr(module, kind, None) is not None:
            hf = _rename(f"{ours}.{kind}", _COMPILED[model.cfg.family], forward=False)
            tensors[PREFIX + hf] = getattr(module, kind).detach()
    return hf.split(".")[-2]


def _pattern(table: dict, hf: str, default):
    """peft's rank/alpha_pattern lookup: a key matches the end of the module name."""
    for key, value in (table or {}).items():
        if re.match(rf"(.*\.)?({key})$", hf) or re.fullmatch(key, hf):
            return value
    return default


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply and load a PEFT LoRA adapter (ours or one peft trained) onto the model, in place."""
    path, cfg = Path(path), model.cfg
    try:
        config = json.loads((path / CONFIG).read_text())
        state = load_file(str(path / WEIGHTS))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: not a PEFT adapter directory ({e})") from None
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise ModelError(f"{path}: only plain LoRA adapters are supported (not DoRA or others)")
    if config.get("bias", "none") != "none":
        raise ModelError(
            f"{path}: adapters that train biases (bias={config['bias']!r}) are not supported"
        )
    weights, extra = {}, {}
    for key, tensor in state.items():
        key = key.removeprefix(PREFIX)
        m = re.match(r"^(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
        if m:
            weights.setdefault(m[1], {})[m[2]] = tensor
        else:
            extra[key] = tensor
    specs, loaded = {}, {}
    for hf, ab in weights.items():
        r = ab["A"].shape[0]
        alpha = _pattern(config.get("alpha_pattern"), hf, config.get("lora_alpha", r))
        ours = _our_modules(hf, cfg)
        d = ab["B"].shape[0] // len(ours)
        for i, name in enumerate(ours):  # GPT-2's c_attn: each part gets A and its rows of B
            specs[name] = (r, alpha)
            loaded[name] = (ab["A"], ab["B"][i * d : (i + 1) * d])
    _wrap(model, specs, config.get("lora_dropout", 0.0), bool(config.get("use_rslora")),
          False, False)  # fmt: skip
    with torch.no_grad():
        for name, (a, b) in loaded.items():
            m = model.get_submodule(name)
            m.lora_A.weight.copy_(a)
            m.lora_B.weight.copy_(b)
        for key, tensor in extra.items():  # modules_to_save: whole trained embeddings or head
            key = key.replace(".modules_to_save.default", "")
            ours = _rename(_canonical_hf(key, cfg.family), _COMPILED[cfg.family], forward=True)
            if ours is None:
                raise ModelError(f"{path}: adapter tensor {key!r} has no place in the model")
            param = model.get_parameter(ours)
            param.copy_(tensor)
            param.requires_grad_(True)
    return model


# ---- options from recipes and the command line ---------------------------------------------

_OPTIONS = {"r": int, "alpha": float, "dropout": float, "targets": tuple, "rslora": bool,
            "train_embeddings": bool, "train_head": bool}  # fmt: skip
_QOPTIONS = {"bits": str, "double_quant": bool}
# peft's and others' names for our options, for a better "did you mean"
_ALIASES = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
            "target_modules": "targets", "use_rslora": "rslora"}  # fmt: skip


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
    if quantized:
        bits = opts.pop("bits", "nf4")
        bits = {"4": "nf4", "8": "int8"}.get(bits, bits)
        quantize(model, bits=bits, double_quant=opts.pop("double_quant", True))
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
