"""A memory / FLOPs estimate of one training step, before anything trains.

The estimate builds the model on the meta device (no memory), applies the method with the real
code (freeze, LoRA), and counts what one step holds: weights, gradients, AdamW's two fp32
states, the tensors autograd saves for backward in each block (derived from transformer.py and
checked against saved-tensor hooks in tests), and the logits, often the biggest piece.
"""

from __future__ import annotations

import os

import torch

from tunelab.adapt import METHODS
from tunelab.adapt.params import mib_text
from tunelab.errors import ConfigError
from tunelab.model.config import ModelConfig
from tunelab.runtime import fused_adamw
from tunelab.runtime.dequant import CHUNK as DEQUANT_CHUNK

LOGIT_COPIES = 3  # logits, the shifted copy the loss reads, log-softmax (its grads in backward)
NF4_BYTES = 0.5 + 4 / 64  # 4-bit codes + one fp32 absmax per block of 64
NF4_DQ_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # double quantization: int8 absmax, fp32 per 256
QUANT_OPTIONS = ("bits", "double_quant")
# NF4 quantizes in chunks (adapt/quantize.py CHUNK): a few float32 and int64 copies of one
# chunk at a time, on top of the layer's own float weight. It dequantizes into one buffer the
# layers share (counted as the largest weight) through two int64 buffers of half a chunk
# (runtime/dequant.py CHUNK: codes and value pairs; codes are int32 with one thread).
QUANTIZE_TEMP = 24 * 2**18
DEQUANT_TEMP = DEQUANT_CHUNK // 2 * 16
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # the frozen weights' storage
AUTOCASTS = ("off", "bf16", "fp16")


def _meta_model(cfg: ModelConfig, method: str, options: dict):
    """The model on the meta device with the method applied by its own code (checks options too)."""
    from tunelab.model.heads import build_model

    with torch.device("meta"):
        model = build_model(cfg)
        if method == "freeze":
            from tunelab.adapt.freeze import GRADUAL_OPTIONS, freeze, freeze_method

            if any(k in GRADUAL_OPTIONS for k in options):  # sized for its end: all unfrozen
                freeze_method(model, options)
                embeddings = str(options.get("embeddings", True)).lower() not in ("false", "0")
                freeze(model, "all", train_embeddings=embeddings)
            else:
                freeze_method(model, options)
        elif method in ("lora", "qlora"):
            from tunelab.adapt.lora import lora_method

            lora_method(model, {k: v for k, v in options.items() if k not in QUANT_OPTIONS})
    return model


def _options(method: str, options, lora_r, lora_targets, trainable_layers, train_head) -> dict:
    """The method's options: as given, or from estimate's older keyword arguments."""
    if options is not None:
        return dict(options)
    if method in ("lora", "qlora"):
        return {"r": lora_r, "targets": lora_targets}
    if method == "freeze":
        return {
            "train_layers": "top:2" if trainable_layers is None else trainable_layers,
            "train_head": train_head,
        }
    return {}


def _quantized_bytes(shape: torch.Size, options: dict) -> float:
    """Stored bytes of one block linear under QLoRA's bits / double_quant options."""
    bits = {"4": "nf4", "8": "int8"}.get(str(options.get("bits", "nf4")), options.get("bits"))
    if bits == "int8":
        return shape.numel() + 4 * shape[0]  # one fp32 scale per output row
    double = str(options.get("double_quant", True)).lower() not in ("false", "0", "no")
    return shape.numel() * (NF4_DQ_BYTES if double else NF4_BYTES)


def _block_saved(cfg: ModelConfig, block, grad_in: bool, half: bool) -> tuple[float, float]:
    """(fp32 elements, activation elements) autograd saves per token in one block."""
    d, hq, hkv, f = cfg.d_model, cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.d_ff
    trains = {n for n, p in block.named_parameters() if p.requires_grad}
    if not trains and not grad_in:
        return 0.0, 0.0
    stats = 1 if cfg.norm == "rmsnorm" else 2  # rsqrt, or LayerNorm's mean and rstd
    wide: float = 2 * hq + 2 * hkv + cfg.n_head  # SDPA: q, k, v, out, logsumexp
    wide += 3 * f if cfg.mlp != "gelu" else f  # act input, act output and up (gated)
    narrow: float = 0
    flows = {"attn_norm": grad_in, "mlp_norm": grad_in or any(n.startswith("attn") for n in trains)}
    for norm, flow in flows.items():
        own = any(n.startswith(norm) for n in trains)
        if flow or (own and cfg.norm == "layernorm"):
            narrow += d + stats  # the residual stream in, with the norm's statistics
        if own and cfg.norm == "rmsnorm":
            narrow += d  # normalised x, for the norm weight's grad
    # A trainable linear (or LoRA's A) saves its input: the norm output (shared by q/k/v and
    # by gate/up), the attention output (already saved by SDPA), the MLP product.
    inputs = {
        "attn.q_proj": ("n1", d),
        "attn.k_proj": ("n1", d),
        "attn.v_proj": ("n1", d),
        "mlp.gate_proj": ("n2", d),
        "mlp.up_proj": ("n2", d),
        "mlp.down_proj": ("p", f),
    }
    saved = {}
    for name in trains:
        for mod, (key, size) in inputs.items():
            if name.startswith(mod + "."):
                saved[key] = size
        if "lora_A" in name:
            wide += block.get_parameter(name).shape[0]  # A's output, saved for B
    lin = sum(saved.values())
    # Under bf16 autocast linear inputs are saved as bf16 copies and outputs are bf16.
    return narrow + (0 if half else lin), wide + (lin if half else 0)


def resolve_autocast(precision: str, autocast: str | None = None) -> str:
    """The autocast dtype (off, bf16, fp16); by default it follows precision."""
    if precision not in PRECISION_BYTES:
        raise ConfigError(f"precision {precision!r}: expected one of {', '.join(PRECISION_BYTES)}")
    if autocast in (None, "auto"):
        return "off" if precision == "fp32" else precision
    if autocast not in AUTOCASTS:
        raise ConfigError(f"autocast {autocast!r}: expected one of {', '.join(AUTOCASTS)}")
    return autocast


def estimate(
    cfg: ModelConfig,
    method: str = "full",
    seq_len: int = 512,
    batch: int = 1,
    precision: str = "fp32",
    lora_r: int = 8,
    lora_targets=("q_proj", "v_proj"),
    trainable_layers=None,
    train_head: bool = True,
    device: str = "cpu",
    autocast: str | None = None,
    activation_checkpointing: bool = False,
    options: dict | None = None,
    source_bytes: float | None = None,
) -> dict:
    """Predicted peak memory (bytes, by piece and phase) and FLOPs of loading and one AdamW step.

    precision is the dtype frozen weights are stored in; trainable ones are fp32 (master
    weights); autocast (default: follows precision) is the compute dtype. options are the
    method's own (as in a recipe), else built from lora_r / lora_targets / trainable_layers /
    train_head. source_bytes: bytes per element in the checkpoint file (default 4).
    """
    if method not in METHODS:
        raise ConfigError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    autocast = resolve_autocast(precision, autocast)
    options = _options(method, options, lora_r, lora_targets, trainable_layers, train_head)
    model = _meta_model(cfg, method, options)
    named = dict(model.named_parameters())
    n_total = sum(p.numel() for p in named.values())
    n_train = sum(p.numel() for p in named.values() if p.requires_grad)
    half, tokens = autocast != "off", batch * seq_len
    store, act_bytes = PRECISION_BYTES[precision], 2 if half else 4
    src = 4 if source_bytes is None else source_bytes

    # Weights: trainable in fp32, frozen in precision's dtype, QLoRA's block linears quantized.
    base = {
        n: p
        for n, p in named.items()
        if ".layers." in n and p.dim() == 2 and "lora_" not in n and not p.requires_grad
    }
    quantized = base if method == "qlora" else {}
    weights = 4 * n_train + store * (n_total - n_train)
    weights += sum(
        _quantized_bytes(p.shape, options) - store * p.numel() for p in quantized.values()
    )
    grads, adam = 4 * n_train, 8 * n_train
    # Loading converts one tensor at a time: its stored copy, plus NF4's temporaries.
    largest = max((p.numel() for n, p in named.items() if n not in quantized), default=0)
    loading = src * largest
    if quantized:
        loading = max(loading, src * max(p.numel() for p in quantized.values()) + QUANTIZE_TEMP)

    # Activations: walk up the stack; gradient flows into block i if anything below trains.
    grad_in = any(
        p.requires_grad
        for n, p in named.items()
        if n.startswith("transformer.")
        and ".layers." not in n
        and not n.startswith("transformer.norm")
    )
    embed_frozen = not any(p.requires_grad for n, p in named.items() if "embed" in n)
    resid = 2 if half and store == 2 and embed_frozen else 4  # the residual stream's dtype
    blocks, frozen_saved = [], 0
    for block in model.transformer.layers:
        fp32, low = _block_saved(cfg, block, grad_in, half)
        blocks.append((resid if half else 4) * fp32 + act_bytes * low)
        grad_in = grad_in or any(p.requires_grad for p in block.parameters())
        if grad_in:  # a frozen weight in another dtype than autocast's: its cast copy is saved
            frozen_saved += sum(
                p.numel() for p in block.parameters() if p.dim() == 2 and not p.requires_grad
            )
    if activation_checkpointing:  # block inputs kept; one block's activations at a time
        acts = sum(resid * cfg.d_model for b in blocks if b) + max(blocks, default=0)
        frozen_saved = 0  # recomputed block by block in backward, not kept
    else:
        acts = sum(blocks)
    aliases = dict(model.named_parameters(remove_duplicate=False))  # a tied head has its name
    head_trains = any(
        p.requires_grad for n, p in aliases.items() if not n.startswith("transformer.")
    )
    tied = aliases.get("lm_head.weight") is named.get("transformer.tok_embed.weight")
    norm_trains = any(p.requires_grad for n, p in named.items() if n.startswith("transformer.norm"))
    stats = 1 if cfg.norm == "rmsnorm" else 2
    rms_w = norm_trains and cfg.norm == "rmsnorm"  # RMSNorm keeps x-hat for its weight's grad
    final_in = grad_in or (norm_trains and cfg.norm == "layernorm")
    acts += 4 * ((cfg.d_model + stats) * final_in + cfg.d_model * (rms_w + head_trains))
    acts += 4 * 2 * cfg.head_dim if cfg.pos == "rope" else 0  # cos / sin tables
    acts *= tokens
    logits = LOGIT_COPIES * tokens * cfg.vocab_size * 4
    head_grad = 4 * cfg.vocab_size * cfg.d_model if head_trains else 0
    # At the head's backward: two logits-sized grads beside its weight grad.
    logits_phase = max(logits, 2 * logits / LOGIT_COPIES + head_grad)

    # Autocast caches a half copy of each trainable matmul weight (an untied embedding table is
    # only indexed); a frozen fp32 weight's copy is saved for backward where gradient flows.
    cast = 0
    if half:
        cast = sum(
            p.numel()
            for n, p in named.items()
            if p.requires_grad and p.dim() == 2 and ("embed" not in n or tied)
        )
        if store != 2 and method != "qlora":  # half-stored weights need no copy
            head_frozen = "lm_head.weight" in named and not head_trains
            cast += frozen_saved + (cfg.vocab_size * cfg.d_model if head_frozen else 0)
        cast *= 2
    dequant = 0
    if quantized:  # one linear's weight dequantized at a time, in the compute dtype
        dequant = act_bytes * max(p.numel() for p in quantized.values()) + DEQUANT_TEMP
    fused = fused_adamw(device)  # the optimizer training makes for this device
    # A trained tied embedding gets a second dense V x d grad from the lookup, added to the head's
    # out of place; measured on SmolLM2 (freeze), it sets the peak at short lengths.
    phases = {
        "loading": weights + loading,
        "backward": weights + adam + acts + logits_phase + dequant + cast,
        "end of backward": weights + adam + grads + (2 * head_grad if tied and head_trains else 0),
        # fused AdamW steps in place; foreach makes a sqrt temporary
        "optimizer": weights + adam + grads + (0 if fused else 4 * n_train),
    }
    total = max(phases.values())
    memory = dict(
        weights=weights,
        gradients=grads,
        optimizer=adam,
        activations=acts,
        logits=logits,
        autocast_copies=cast,
        dequantize=dequant,
        loading=loading,
        phases=phases,
        peak_phase=max(phases, key=phases.get),
        step_peak=max(v for k, v in phases.items() if k != "loading") - weights,
        total=total,
    )
    return dict(
        model=dict(params=n_total, trainable=n_train),
        method=method,
        options=options,
        seq_len=seq_len,
        batch=batch,
        precision=precision,
        autocast=autocast,
        activation_checkpointing=activation_checkpointing,
        memory=memory,
        flops=_flops(cfg, named, tokens, seq_len, method, activation_checkpointing),
        **fits(total, device),
    )


def _flops(
    cfg: ModelConfig, named: dict, tokens: int, seq_len: int, method: str, recompute: bool = False
) -> dict:
    """Matmul FLOPs: 2N forward, 2N for input grads where grad flows, 2N for trainable weights;
    with activation checkpointing, the forward of those blocks once more."""
    linear = sum(p.numel() for n, p in named.items() if ".layers." in n and p.dim() == 2)
    head = cfg.vocab_size * cfg.d_model
    trainable = sum(
        p.numel() for n, p in named.items() if p.requires_grad and p.dim() == 2 and "embed" not in n
    )
    attn = 2 * 2 * cfg.n_layer * seq_len * cfg.n_head * cfg.head_dim  # QK^T and AV per token
    forward = 2 * (linear + head) + attn
    lowest = min(
        (int(n.split(".")[2]) for n, p in named.items() if p.requires_grad and ".layers." in n),
        default=None,
    )
    if method == "full" or any(p.requires_grad for n, p in named.items() if "embed" in n):
        lowest = 0
    flow = 0.0 if lowest is None else (cfg.n_layer - lowest) / cfg.n_layer
    backward = flow * (2 * linear + 2 * attn) + 2 * head + 2 * trainable
    backward += flow * (2 * linear + attn) if recompute else 0
    return dict(
        forward=forward * tokens,
        backward=backward * tokens,
        total=(forward + backward) * tokens,
        per_token=forward + backward,
    )


def free_memory(device: str = "cpu") -> tuple[int, int]:
    """(free, total) bytes of the device: CUDA memory, or the machine's available RAM."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.mem_get_info(torch.device(device))
    try:
        import psutil

        vm = psutil.virtual_memory()
        return vm.available, vm.total
    except ImportError:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_AVPHYS_PAGES"), page * os.sysconf("SC_PHYS_PAGES")


def fits(needed: float, device: str = "cpu") -> dict:
    """Whether `needed` bytes fit the device's free memory."""
    free, total = free_memory(device)
    return dict(device=str(device), device_total=total, device_free=free, fits=needed <= free)


def format_estimate(est: dict) -> str:
    """A small table of the estimate for the terminal."""
    m, f = est["memory"], est["flops"]
    rows = [
        (
            "setting",
            f"{est['method']}, precision {est['precision']}, autocast "
            f"{est['autocast']}, activation checkpointing "
            f"{'on' if est['activation_checkpointing'] else 'off'}",
        )
    ]
    rows += [
        (k, mib_text(m[k]))
        for k in (
            "weights",
            "gradients",
            "optimizer",
            "activations",
            "logits",
            "autocast_copies",
            "dequantize",
        )
        if m[k]
    ]
    rows += [(f"{phase} phase", mib_text(v)) for phase, v in m["phases"].items()]
    rows += [
        ("peak (total)", f"{mib_text(m['total'])}  ({m['peak_phase']} phase)"),
        ("FLOPs / step", f"{f['total']:.3g}  ({f['per_token']:.3g} per token)"),
        (
            "fits",
            f"{'yes' if est['fits'] else 'NO'}: {mib_text(est['device_free'])} free of "
            f"{mib_text(est['device_total'])} on {est['device']}",
        ),
    ]
    return "\n".join(f"{k:<22}{v}" for k, v in rows)
