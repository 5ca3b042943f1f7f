"""Parameter report and a memory / FLOPs estimate of one training step, before anything trains.

The estimate builds the model on the meta device (no memory), applies the method with the real
code (freeze, LoRA), and counts what one step holds: weights, gradients, AdamW's two fp32
states, the tensors autograd saves for backward in each block (derived from transformer.py and
checked against saved-tensor hooks in tests), and the logits, often the biggest piece.
"""

from __future__ import annotations

import os

import torch

from tunelab.errors import ConfigError
from tunelab.model.config import ModelConfig

METHODS = ("full", "lora", "qlora", "freeze")
LOGIT_COPIES = 3  # logits, the shifted copy the loss reads, log-softmax (its grads in backward)
NF4_BYTES = 0.5 + 4 / 64  # 4-bit codes + one fp32 absmax per block of 64


def param_report(model) -> dict:
    """Trainable and total parameters and their bytes, by dtype (tied tensors counted once)."""
    by_dtype: dict[str, dict] = {}
    for p in model.parameters():
        row = by_dtype.setdefault(str(p.dtype).removeprefix("torch."), dict.fromkeys(
            ("params", "bytes", "trainable_params", "trainable_bytes"), 0))  # fmt: skip
        size = p.numel() * p.element_size()
        row["params"] += p.numel()
        row["bytes"] += size
        if p.requires_grad:
            row["trainable_params"] += p.numel()
            row["trainable_bytes"] += size
    from tunelab.adapt.quantize import NF4Linear, QuantLinear

    for m in model.modules():  # quantized weights are buffers, yet still the model's parameters
        if isinstance(m, QuantLinear):
            row = by_dtype.setdefault("nf4" if isinstance(m, NF4Linear) else "int8", dict.fromkeys(
                ("params", "bytes", "trainable_params", "trainable_bytes"), 0))  # fmt: skip
            row["params"] += m.in_features * m.out_features
            row["bytes"] += m.storage_bytes()
    total = {k: sum(r[k] for r in by_dtype.values()) for k in ("params", "bytes")}
    train = {k: sum(r[f"trainable_{k}"] for r in by_dtype.values()) for k in ("params", "bytes")}
    quantized = sum(by_dtype[k]["bytes"] for k in ("nf4", "int8") if k in by_dtype)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers()) - quantized
    return dict(total_params=total["params"], trainable_params=train["params"],
                trainable_pct=100 * train["params"] / max(total["params"], 1),
                total_bytes=total["bytes"], trainable_bytes=train["bytes"],
                buffer_bytes=buffers, by_dtype=by_dtype)  # fmt: skip


def format_report(report: dict) -> str:
    """One line: 'trainable 1.6M of 134.5M parameters (1.2%); 6.3 MiB of 513.1 MiB'."""
    return (
        f"trainable {_count(report['trainable_params'])} of {_count(report['total_params'])} "
        f"parameters ({report['trainable_pct']:.2f}%); {_mib(report['trainable_bytes'])} of "
        f"{_mib(report['total_bytes'] + report['buffer_bytes'])}"
    )


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{int(n)}"


def _mib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _meta_model(cfg: ModelConfig, method: str, lora_r: int, lora_targets, trainable_layers,
                train_head: bool):  # fmt: skip
    from tunelab.model.heads import build_model

    with torch.device("meta"):
        model = build_model(cfg)
        if method == "freeze":
            from tunelab.adapt.freeze import freeze

            freeze(model, "top:2" if trainable_layers is None else trainable_layers,
                   train_head=train_head)  # fmt: skip
        elif method in ("lora", "qlora"):
            from tunelab.adapt.lora import apply_lora

            apply_lora(model, r=lora_r, targets=lora_targets)
    return model


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
    inputs = {"attn.q_proj": ("n1", d), "attn.k_proj": ("n1", d), "attn.v_proj": ("n1", d),
              "mlp.gate_proj": ("n2", d), "mlp.up_proj": ("n2", d), "mlp.down_proj": ("p", f)}  # fmt: skip
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


def estimate(cfg: ModelConfig, method: str = "full", seq_len: int = 512, batch: int = 1,
             precision: str = "fp32", lora_r: int = 8, lora_targets=("q_proj", "v_proj"),
             trainable_layers=None, train_head: bool = True, device: str = "cpu") -> dict:  # fmt: skip
    """Predicted peak memory (bytes, by piece) and FLOPs of one AdamW training step."""
    if method not in METHODS:
        raise ConfigError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision {precision!r}: expected fp32 or bf16")
    model = _meta_model(cfg, method, lora_r, lora_targets, trainable_layers, train_head)
    named = dict(model.named_parameters())
    n_total = sum(p.numel() for p in named.values())
    n_train = sum(p.numel() for p in named.values() if p.requires_grad)
    half, tokens = precision == "bf16", batch * seq_len
    act_bytes = 2 if half else 4

    weights = 4 * n_total
    if method == "qlora":  # block linears stored as NF4; embeddings, norms and adapters in fp32
        base = sum(p.numel() for n, p in named.items()
                   if ".layers." in n and p.dim() == 2 and "lora_" not in n)  # fmt: skip
        weights -= base * (4 - NF4_BYTES)
    grads, adam = 4 * n_train, 8 * n_train
    cast = 2 * n_train if half else 0  # autocast keeps bf16 copies of trainable weights

    # Activations: walk up the stack; gradient flows into block i if anything below trains.
    grad_in = any(p.requires_grad for n, p in named.items() if n.startswith("transformer.") and
                  ".layers." not in n and not n.startswith("transformer.norm"))  # fmt: skip
    acts = 0.0
    for block in model.transformer.layers:
        fp32, low = _block_saved(cfg, block, grad_in, half)
        acts += 4 * fp32 + act_bytes * low
        grad_in = grad_in or any(p.requires_grad for p in block.parameters())
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
    dequant = 0
    if method == "qlora":  # one linear's weight dequantized at a time
        dequant = 4 * max((p.numel() for n, p in named.items()
                           if ".layers." in n and p.dim() == 2), default=0)  # fmt: skip
    backward_phase = acts + logits_phase + dequant
    # A trained tied embedding gets a second dense V x d grad from the lookup, added to the head's
    # out of place; measured on SmolLM2 (freeze), it sets the peak at short lengths.
    end_phase = grads + (2 * head_grad if tied and head_trains else 0)
    optimizer_phase = grads + 4 * n_train  # grads + AdamW's foreach sqrt temporary
    phases = {"backward": backward_phase, "end of backward": end_phase,
              "optimizer": optimizer_phase}  # fmt: skip
    step = adam + cast + max(phases.values())
    memory = dict(weights=weights, gradients=grads, optimizer=adam, activations=acts,
                  logits=logits, autocast_copies=cast, dequantize=dequant,
                  peak_phase=max(phases, key=phases.get),
                  step_peak=step, total=weights + step)  # fmt: skip
    return dict(model=dict(params=n_total, trainable=n_train), method=method, seq_len=seq_len,
                batch=batch, precision=precision, memory=memory,
                flops=_flops(cfg, named, tokens, seq_len, method),
                **fits(weights + step, device))  # fmt: skip


def _flops(cfg: ModelConfig, named: dict, tokens: int, seq_len: int, method: str) -> dict:
    """Matmul FLOPs: 2N forward, 2N for input grads where grad flows, 2N for trainable weights."""
    linear = sum(p.numel() for n, p in named.items() if ".layers." in n and p.dim() == 2)
    head = cfg.vocab_size * cfg.d_model
    trainable = sum(p.numel() for n, p in named.items() if p.requires_grad and p.dim() == 2
                    and "embed" not in n)  # fmt: skip
    attn = 2 * 2 * cfg.n_layer * seq_len * cfg.n_head * cfg.head_dim  # QK^T and AV per token
    forward = 2 * (linear + head) + attn
    lowest = min((int(n.split(".")[2]) for n, p in named.items()
                  if p.requires_grad and ".layers." in n), default=None)  # fmt: skip
    if method == "full" or any(p.requires_grad for n, p in named.items() if "embed" in n):
        lowest = 0
    flow = 0.0 if lowest is None else (cfg.n_layer - lowest) / cfg.n_layer
    backward = flow * (2 * linear + 2 * attn) + 2 * head + 2 * trainable
    return dict(forward=forward * tokens, backward=backward * tokens,
                total=(forward + backward) * tokens, per_token=forward + backward)  # fmt: skip


def fits(needed: float, device: str = "cpu") -> dict:
    """Whether `needed` bytes fit the device: CUDA memory, or the machine's RAM."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(torch.device(device))
    else:
        try:
            import psutil

            vm = psutil.virtual_memory()
            free, total = vm.available, vm.total
        except ImportError:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return dict(device=str(device), device_total=total, device_free=free, fits=needed <= free)


def format_estimate(est: dict) -> str:
    """A small table of the estimate for the terminal."""
    m, f = est["memory"], est["flops"]
    rows = [(k, _mib(m[k])) for k in ("weights", "gradients", "optimizer", "activations",
                                      "logits", "autocast_copies", "dequantize") if m[k]]  # fmt: skip
    rows += [("peak (total)", f"{_mib(m['total'])}  ({m['peak_phase']} phase)"),
             ("FLOPs / step", f"{f['total']:.3g}  ({f['per_token']:.3g} per token)"),
             ("fits", f"{'yes' if est['fits'] else 'NO'}: {_mib(est['device_free'])} free of "
                      f"{_mib(est['device_total'])} on {est['device']}")]  # fmt: skip
    return "\n".join(f"{k:<16}{v}" for k, v in rows)
