"""What runs inside each process bench/scale.py measures: a load, or the reference's training.

    python bench/scale_workers.py load|train JOB_JSON

The load worker prints 'RESULT {json}'; the training worker prints 'EVENT {json}' lines ('ready'
once the model is loaded and adapted, then one per step) that scale.py watches for.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

LORA = dict(r=16, alpha=32, dropout=0.0)


def status_mb(pid: int | str = "self") -> dict:
    """VmRSS and VmHWM (the high-water mark since exec) of a process, in MiB; {} once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: int(v) / 1024 for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M)}


def _emit(kind: str, **data) -> None:
    print("EVENT " + json.dumps({"kind": kind, **data}), flush=True)


def _bnb(job: dict) -> bool:
    """Whether bitsandbytes imports here (from --bnb-path when given)."""
    if job.get("bnb_path"):
        sys.path.insert(0, job["bnb_path"])
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def _reference_model(job: dict, method: str):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = dict(low_cpu_mem_usage=True, dtype=torch.float32 if method == "full" else torch.bfloat16)
    if method in ("qlora", "nf4") and _bnb(job):
        kw.update(
            device_map="cpu",
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            ),
        )
    if json.loads((Path(job["model"]) / "config.json").read_text())["model_type"] == "gpt2":
        kw.update(attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)  # tunelab trains without
    return AutoModelForCausalLM.from_pretrained(job["model"], **kw)


SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "uint8": "nf4", "int8": "int8"}


def storage(model, split: bool = True) -> str:
    """The dtypes that hold the frozen and the trainable weights, e.g. 'nf4+bf16 / fp32'
    (split=False: all weights, e.g. 'nf4+bf16')."""
    kinds: dict[bool, set] = {True: set(), False: set()}
    for p in model.parameters():  # bitsandbytes' Params4bit are uint8; tunelab's NF4 are buffers
        kinds[p.requires_grad].add(SHORT.get(str(p.dtype).split(".")[-1], str(p.dtype)))
    if any(type(m).__name__ == "NF4Linear" for m in model.modules()):
        kinds[False].add("nf4")
    if not split:
        return "+".join(sorted(kinds[False] | kinds[True]))
    return " / ".join("+".join(sorted(kinds[k])) or "–" for k in (False, True))


def worker_load(job: dict) -> dict:
    """Load in this process, timed around the call; RSS before, after, and its peak."""
    import torch

    nf4, how = job["method"] == "nf4", None
    if job["side"] == "tunelab":
        import inspect

        import tunelab
        from tunelab.adapt.quantize import quantize
        from tunelab.model import checkpoint  # noqa: F401  (imported before the clock starts)

        on_read = "quantize" in inspect.signature(tunelab.load).parameters
        how = "load, then quantize" if nf4 and not on_read else None

        def load():
            if nf4 and not on_read:  # before the NF4-on-read loader
                return quantize(tunelab.load(job["model"], precision="bf16").model, "nf4")
            kw = {"quantize": "nf4"} if nf4 else {}
            return tunelab.load(job["model"], precision="bf16", **kw).model
    else:
        from transformers import AutoModelForCausalLM  # noqa: F401

        if nf4 and not _bnb(job):
            raise SystemExit("bitsandbytes is not installed (see --bnb-path)")

        def load():
            return _reference_model(job, job["method"])

    before, t = status_mb(), time.perf_counter()
    model = load()
    seconds, after = time.perf_counter() - t, status_mb()
    return dict(
        seconds=seconds,
        rss_before_mb=before["VmRSS"],
        rss_after_mb=after["VmRSS"],
        peak_mb=after["VmHWM"],
        threads=torch.get_num_threads(),
        how=how,
        storage=storage(model, split=False),
        params=sum(p.numel() for p in model.parameters()),
    )


def tunelab_batches(job: dict) -> list[dict]:
    """The first batches tunelab's command trains on, from its own pipeline and seed."""
    from tunelab.tokenizer.tokenizer import Tokenizer
    from tunelab.train.config import load_config
    from tunelab.train.lm import build_data

    cfg = load_config(
        None,
        {
            "task": "finetune",
            "model": job["model"],
            "data.path": job["data"],
            "data.val_fraction": 0.0,
            "train.seq_len": job["seq_len"],
            "train.batch_size": job["batch"],
            "train.seed": job["seed"],
        },
    )
    stream = build_data(cfg, Tokenizer.from_dir(job["model"]), "auto")[0].forever()
    return [next(stream) for _ in range(job["steps"])]


def worker_train(job: dict) -> None:
    """transformers + peft on tunelab's batches; 'ready' and 'step' events on stdout."""
    import torch

    torch.manual_seed(job["seed"])
    model = _reference_model(job, job["method"])
    if job["method"] != "full":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=LORA["r"],
                lora_alpha=LORA["alpha"],
                lora_dropout=LORA["dropout"],
                bias="none",
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            ),
        )
    params = [p for p in model.parameters() if p.requires_grad]
    _emit("ready", trainable=sum(p.numel() for p in params), storage=storage(model))
    batches = tunelab_batches(job)
    opt = torch.optim.AdamW(params, lr=job["lr"], weight_decay=0.0, fused=True)
    model.train()
    for i, batch in enumerate(batches, 1):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=batch["labels"],
            ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _emit(
            "step",
            step=i,
            seconds=time.perf_counter() - t,
            loss=loss.item(),
            tokens=int(batch["attention_mask"].sum()),
            threads=torch.get_num_threads(),
        )


if __name__ == "__main__":
    kind, job = sys.argv[1], json.loads(sys.argv[2])
    if kind == "load":
        print("RESULT " + json.dumps(worker_load(job)), flush=True)
    else:
        worker_train(job)
