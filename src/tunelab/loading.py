"""Loading a pretrained model for use: a name, directory, .gguf file or hub id becomes a model
whose weights are read one tensor at a time in the precision asked for (blocks quantized as
read for QLoRA), prepared for the runtime, with its tokenizer. `tunelab.load` is this function;
the training loop, studies and commands import it from here, below the public package.
"""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load(
    source: str | Path,
    precision: str = "fp32",
    device: str = "cpu",
    quantize: str | None = None,
    double_quant: bool = True,
    runtime="auto",
) -> Pretrained:
    """Load a model by name, directory, .gguf file or hub id (see `tunelab models`).

    precision: the dtype every floating-point weight is stored in as it is read (fp32, bf16,
    fp16, or auto: bf16 on CPUs with AMX and GPUs with bf16, else fp32; runtime/precision.py).
    quantize: 'nf4' or 'int8' stores the blocks' linear weights quantized as each is read
    (QLoRA's base), so the float model never exists whole.
    runtime: the CPU linear kernels, "auto" (measured per machine), "torch" or "onednn", or a
    run config's `runtime` section (see tunelab.runtime.prepare_runtime); None: plain layers."""
    from tunelab.errors import ConfigError
    from tunelab.hub import resolve
    from tunelab.model.checkpoint import load_model_dir

    if precision == "auto":
        from tunelab.runtime.precision import auto_precision

        precision = auto_precision(device)[0]
    if precision not in DTYPES:
        raise ConfigError(f"precision {precision!r}: expected auto or one of {', '.join(DTYPES)}")
    path = resolve(source)
    if path.suffix == ".gguf":
        from tunelab.model.gguf import gguf_to_hf_dir

        path = gguf_to_hf_dir(path)
    on_linear = None
    if quantize:
        from tunelab.adapt.quantize import quantizer

        on_linear = quantizer(quantize, double_quant)
    model, tokenizer = load_model_dir(path, DTYPES[precision], device, on_linear)
    if runtime is not None:
        from types import SimpleNamespace

        from tunelab.runtime import prepare_runtime

        prepare_runtime(
            model, SimpleNamespace(linear=runtime) if isinstance(runtime, str) else runtime
        )
    return Pretrained(model, tokenizer, str(source), path)


class Pretrained:
    """A loaded model with its tokenizer: the public API beside the CLI."""

    def __init__(self, model, tokenizer, name: str, path: Path):
        self.model, self.tokenizer, self.name, self.path = model, tokenizer, name, path

    @property
    def config(self):
        return self.model.cfg

    def generate(self, prompt: str | list[str], chat: bool = False, **sampling) -> str | list[str]:
        """Generated text for one prompt (or a list); sampling takes Sampling's fields."""
        from tunelab.generate import Sampling, generate

        prompts = [prompt] if isinstance(prompt, str) else prompt
        out = [
            r["text"]
            for r in generate(self.model, self.tokenizer, prompts, Sampling(**sampling), chat)
        ]
        return out[0] if isinstance(prompt, str) else out

    def perplexity(self, text: str, window: int | None = None, stride: int | None = None) -> dict:
        """Sliding-window perplexity of text: perplexity, tokens, window, stride."""
        from tunelab.evaluate.perplexity import perplexity

        return perplexity(self.model, self.tokenizer, text, window, stride)

    def save(self, path: str | Path) -> None:
        from tunelab.model.checkpoint import save_model_dir

        save_model_dir(self.model, self.tokenizer, path)

    def export(self, path: str | Path) -> None:
        """An HF-format directory that transformers loads."""
        from tunelab.model.checkpoint import export_hf

        export_hf(self.model, self.tokenizer, path)
