"""LoRA adapters in PEFT's file format (adapter_config.json + adapter_model.safetensors).

Adapters are saved under the module names of the equivalent transformers model (from
model/convert.py's tables), so `peft.PeftModel.from_pretrained` reads them and we read peft's.
GPT-2's fused c_attn is written as one exact block LoRA: A stacks the q/k/v A's, B is
block-diagonal, and rank_pattern/alpha_pattern keep each part's scaling.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from tunelab.adapt.lora import LoRALinear, _linears, _wrap, lora_modules
from tunelab.errors import ConfigError, ModelError
from tunelab.model.convert import _COMPILED, _canonical_hf, _rename
from tunelab.model.weights import write_file

CONFIG, WEIGHTS, PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."
_QKV = re.compile(r"^transformer\.layers\.(\d+)\.attn\.([qkv])_proj$")


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
        peft_type="LORA",
        task_type=_task_type(cfg),
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        use_rslora=rslora,
        bias="none",
        fan_in_fan_out=cfg.family == "gpt2",  # its Conv1D stores (in, out)
        rank_pattern={re.escape(h): v for h, v in ranks.items() if v != r},
        alpha_pattern={re.escape(h): v for h, v in alphas.items() if v != alpha},
        modules_to_save=to_save or None,
        init_lora_weights=True,
        inference_mode=True,
        base_model_name_or_path=None,
        layers_to_transform=None,
        use_dora=False,
    )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.float().contiguous().cpu() for k, v in tensors.items()}
    # our writer: no second copy of the adapter in bytes, and the file follows the umask
    write_file(tensors, path / WEIGHTS, {"format": "pt"})
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
    _wrap(
        model, specs, config.get("lora_dropout", 0.0), bool(config.get("use_rslora")), False, False
    )
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
