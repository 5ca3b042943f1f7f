"""The check every training command makes before loading: the step's estimate (estimate.py)
against the device's free memory, and a one-line error naming what would fit instead of the
operating system killing the run."""

from __future__ import annotations

import os

from tunelab.adapt.estimate import estimate
from tunelab.errors import MemoryLimitError
from tunelab.model.config import ModelConfig


def run_settings(method: str, method_options: dict | None, train_cfg, device="cpu") -> dict:
    """estimate()'s keyword arguments for a training run: the method and its options, and
    train_cfg's (a TrainConfig) seq_len, batch_size, precision, autocast and checkpointing."""
    return dict(
        method=method,
        options={k: v for k, v in (method_options or {}).items() if k != "name"},
        seq_len=train_cfg.seq_len,
        batch=train_cfg.batch_size,
        precision=getattr(train_cfg, "precision", "fp32"),
        autocast=getattr(train_cfg, "autocast", None),
        activation_checkpointing=bool(getattr(train_cfg, "activation_checkpointing", False)),
        device=str(device),
    )


def check_memory(
    model_cfg: ModelConfig, method: str, method_options: dict, train_cfg, device="cpu"
) -> dict:
    """Estimate the run before loading; raise MemoryLimitError, naming what would fit, if it won't.

    train_cfg is a TrainConfig (seq_len, batch_size, precision, autocast,
    activation_checkpointing). TUNELAB_SKIP_MEMORY_CHECK=1 skips the check (returns {}).
    """
    if os.environ.get("TUNELAB_SKIP_MEMORY_CHECK", "") not in ("", "0"):
        return {}
    run = run_settings(method, method_options, train_cfg, device)
    est = estimate(model_cfg, **run)
    if est["fits"]:
        return est
    lora = run["options"] if method in ("lora", "qlora") else {}
    tries = []  # (flag, changes): each alternative alone, then all of them together
    if method != "qlora":
        tries.append(("--method qlora", dict(method="qlora", options=lora)))
    if method in ("full", "freeze"):
        tries.append(("--method lora", dict(method="lora", options={})))
    if run["precision"] == "fp32":
        tries.append(("--precision bf16", dict(precision="bf16", autocast=None)))
    if not run["activation_checkpointing"]:
        tries.append(("--activation-checkpointing", dict(activation_checkpointing=True)))
    if run["batch"] > 1:
        tries.append(("--batch-size 1", dict(batch=1)))
    fitting = [flag for flag, change in tries if estimate(model_cfg, **{**run, **change})["fits"]]
    needs = f"needs ~{est['memory']['total'] / 2**30:.1f} GiB, {est['device_free'] / 2**30:.1f} GiB free"
    where = f" on {device}" if str(device) != "cpu" else ""
    if fitting:
        advice = f"try {' or '.join(fitting)}"
    else:  # none alone: all of them together (qlora, the smallest method, over lora)
        together = [(f, c) for f, c in tries if f != "--method lora"]
        flags = " ".join(f for f, _ in together)
        least = estimate(model_cfg, **{**run, **{k: v for _, c in together for k, v in c.items()}})
        if not together:
            advice = (
                "no smaller setting to try: use a shorter --seq-len, a smaller model or more memory"
            )
        elif least["fits"]:
            advice = f"try {flags} together"
        else:
            advice = (
                f"even {flags} together needs ~{least['memory']['total'] / 2**30:.1f} GiB: "
                "use a shorter --seq-len, a smaller model or more memory"
            )
    raise MemoryLimitError(
        f"this run {needs}{where}: {advice} (TUNELAB_SKIP_MEMORY_CHECK=1 skips this check)"
    )
