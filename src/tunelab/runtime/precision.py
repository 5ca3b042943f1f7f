"""`--precision auto`: bf16 where the hardware multiplies it fast, fp32 where it does not.

On CPUs with AMX (Intel Xeon from Sapphire Rapids on) oneDNN runs bf16 products on the tile
units, several times faster than fp32; on CPUs without it (AMD Zen, older Xeons), even with
AVX512-BF16, bf16 training measured slower than fp32 for tunelab and for transformers alike
(docs/BENCHMARKS.md, "Training"), so auto stays fp32 there. GPUs with bf16 take it.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def has_amx() -> bool:
    """The CPU advertises AMX bf16 tiles (Linux's /proc/cpuinfo flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:
        return False


def auto_precision(device: str | torch.device = "cpu") -> tuple[str, str]:
    """(precision, why) for `device`."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "a CUDA device with bf16"
        return "fp32", "this GPU has no bf16"
    if dev.type == "cpu" and has_amx():
        return "bf16", "this CPU has AMX (amx_bf16): bf16 products run on its tile units"
    if dev.type == "cpu":
        return "fp32", "this CPU has no AMX: bf16 products are not faster than fp32 here"
    return "fp32", f"{dev.type}: fp32"


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> tuple[str, str | None]:
    """precision itself, or auto's choice with the reason."""
    return auto_precision(device) if precision == "auto" else (precision, None)
