"""What a model holds: trainable and total parameters and their bytes, by dtype, and the one
line a run prints of it."""

from __future__ import annotations


def param_report(model) -> dict:
    """Trainable and total parameters and their bytes, by dtype (tied tensors counted once)."""
    by_dtype: dict[str, dict] = {}
    for p in model.parameters():
        row = by_dtype.setdefault(
            str(p.dtype).removeprefix("torch."),
            dict.fromkeys(("params", "bytes", "trainable_params", "trainable_bytes"), 0),
        )
        size = p.numel() * p.element_size()
        row["params"] += p.numel()
        row["bytes"] += size
        if p.requires_grad:
            row["trainable_params"] += p.numel()
            row["trainable_bytes"] += size
    from tunelab.adapt.quantize import NF4Linear, QuantLinear

    for m in model.modules():  # quantized weights are buffers, yet still the model's parameters
        if isinstance(m, QuantLinear):
            row = by_dtype.setdefault(
                "nf4" if isinstance(m, NF4Linear) else "int8",
                dict.fromkeys(("params", "bytes", "trainable_params", "trainable_bytes"), 0),
            )
            row["params"] += m.in_features * m.out_features
            row["bytes"] += m.storage_bytes()
    total = {k: sum(r[k] for r in by_dtype.values()) for k in ("params", "bytes")}
    train = {k: sum(r[f"trainable_{k}"] for r in by_dtype.values()) for k in ("params", "bytes")}
    quantized = sum(by_dtype[k]["bytes"] for k in ("nf4", "int8") if k in by_dtype)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers()) - quantized
    return dict(
        total_params=total["params"],
        trainable_params=train["params"],
        trainable_pct=100 * train["params"] / max(total["params"], 1),
        total_bytes=total["bytes"],
        trainable_bytes=train["bytes"],
        buffer_bytes=buffers,
        by_dtype=by_dtype,
    )


def format_report(report: dict) -> str:
    """One line: 'trainable 1.6M of 134.5M parameters (1.2%); 6.3 MiB of 513.1 MiB'."""
    return (
        f"trainable {count_text(report['trainable_params'])} of {count_text(report['total_params'])} "
        f"parameters ({report['trainable_pct']:.2f}%); {mib_text(report['trainable_bytes'])} of "
        f"{mib_text(report['total_bytes'] + report['buffer_bytes'])}"
    )


def count_text(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{int(n)}"


def mib_text(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
