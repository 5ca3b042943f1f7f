"""The language-modelling task: causal LM on raw text (pretrain) or instructions and chat
(finetune), with its data, its measurements and its samples; `run_training` runs it by default.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.train.config import RunConfig


def encode_options(cfg: RunConfig, kind: str) -> dict:
    d = cfg.data
    return {
        "text": {"text_field": d.text_field},
        "instruction": {
            "instruction_field": d.instruction_field,
            "input_field": d.input_field,
            "output_field": d.output_field,
        },
        "chat": {"messages_field": d.messages_field},
    }[kind]


def build_data(cfg: RunConfig, tokenizer, kind: str, rank: int = 0, world: int = 1):
    """(train batches, validation batches, data stats) from the data section of the config."""
    from tunelab.data import (
        Batches,
        cached_encode,
        detect_kind,
        encode_records,
        file_fingerprint,
        load_split,
        pack,
        tokenizer_fingerprint,
    )

    d, t = cfg.data, cfg.train
    records, train, val = load_split(
        d.path, d.val_path, d.val_fraction, t.seed, fmt=d.format, text_mode=d.text_mode
    )
    kind = detect_kind(records, d.text_field) if kind == "auto" else kind
    options = encode_options(cfg, kind)

    # Packed raw text is cut into rows by pack(); cutting documents here would drop their tails.
    cut = None if d.pack and kind == "text" else t.seq_len

    def encode(part: list[dict], name: str) -> list[dict]:
        key = dict(
            data=file_fingerprint([p for p in (d.path, d.val_path) if p]),
            part=name,
            val=d.val_fraction,
            seed=t.seed,
            tok=tokenizer_fingerprint(tokenizer),
            kind=kind,
            seq_len=cut,
            options=options,
            n=len(part),
        )
        return cached_encode(
            key, lambda: encode_records(part, tokenizer, kind=kind, seq_len=cut, **options)[0]
        )

    train_ex, val_ex = encode(train, "train"), encode(val, "val") if val else []
    if d.pack:
        train_ex, val_ex = (
            pack(train_ex, t.seq_len, split=kind == "text"),
            pack(val_ex, t.seq_len, split=kind == "text"),
        )
    pad = tokenizer.batch_pad_id
    common = dict(pad_id=pad, rank=rank, world_size=world)
    train_b = Batches(
        train_ex, t.batch_size, seed=t.seed, group_by_length=d.group_by_length, **common
    )
    val_b = (
        Batches(val_ex, t.batch_size, shuffle=False, keep_all=True, **common) if val_ex else None
    )
    stats = {
        "kind": kind,
        "train_examples": len(train_ex),
        "val_examples": len(val_ex),
        "train_tokens": sum(len(e["input_ids"]) for e in train_ex),
    }
    return train_b, val_b, stats


def perplexities(cfg: RunConfig, model, tokenizer) -> dict:
    """Perplexity on the in-domain and general evaluation texts named in the config."""
    from tunelab.evaluate.perplexity import perplexity, read_texts

    out = {}
    for name, path in (("in_domain", cfg.eval.domain), ("general", cfg.eval.general)):
        if path:
            e = cfg.eval
            r = perplexity(model, tokenizer, read_texts([path]), e.window, e.stride, e.max_tokens)
            out[name] = r["perplexity"]
    model.train()
    return out


def sampler(cfg: RunConfig, tokenizer, chat: bool):
    """A function generating from the configured prompts, for evaluations of generative runs."""
    if not cfg.train.samples:
        return None
    from tunelab.generate import Sampling, generate

    def sample(model) -> list[str]:
        s = Sampling(max_new_tokens=cfg.train.sample_tokens, seed=cfg.train.seed)
        return [
            r["text"] for r in generate(model, tokenizer, list(cfg.train.samples), s, chat=chat)
        ]

    return sample


class LMTask:
    """Causal language modelling: raw text (pretrain) or instructions/chat (finetune).

    A task is what a training command plugs into `run_training` (the `Task` protocol in
    train/tasks.py): how the model is prepared before the method is applied, the data, the
    objective, and what is measured before and after training and at each evaluation.
    Classification and alignment are tasks too.
    """

    def __init__(self, kind: str = "auto"):
        from tunelab.train.objectives import causal_lm

        self.kind, self.objective = kind, causal_lm

    def prepare(self, model, tokenizer, cfg: RunConfig):
        return model

    def data(self, cfg: RunConfig, tokenizer, rank: int = 0, world: int = 1):
        kind = "text" if cfg.task == "pretrain" else self.kind
        return build_data(cfg, tokenizer, kind, rank, world)

    def measure(self, model, tokenizer, cfg: RunConfig, val_batches) -> dict:
        """Metrics recorded before and after training: {name: value or {sub-name: value}}."""
        ppl = perplexities(cfg, model, tokenizer)
        out = {"perplexity": ppl} if ppl else {}
        if cfg.eval.instructions:
            from tunelab.evaluate.instructions import measure_instructions

            e = cfg.eval
            out["instructions"] = measure_instructions(
                model,
                tokenizer,
                e.instructions,
                e.instructions_limit,
                e.instructions_max_new_tokens,
            )
        return out

    def evaluators(self, cfg: RunConfig, tokenizer) -> list:
        chat = cfg.task == "finetune" and tokenizer.chat_template is not None
        sample = sampler(cfg, tokenizer, chat)
        return [lambda model: {"samples": sample(model)}] if sample else []

    def finish(self, model, tokenizer, cfg: RunConfig, val_batches, run_dir: Path) -> dict:
        """Top-level summary entries computed on the final model (e.g. accuracy)."""
        return {}
