"""Preference alignment (DPO, IPO, hinge): records to pairs, and the align task.

A pair is encoded as prompt, chosen and rejected token ids; evaluate/preference.py batches it
as one row [prompt, chosen, rejected] and scores it with the prompt run once.
The reference model's log-probs come from train/reference.py.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tunelab.data.load import fields_of, where
from tunelab.errors import ConfigError, DataError, closest
from tunelab.evaluate.preference import (
    collate_pairs,
    pair_logps,
    pair_tokens,
    preference_metrics,
    reward_sums,
)
from tunelab.train.config import RunConfig, compute_precision
from tunelab.train.objectives import PREFERENCE_LOSSES, preference_loss
from tunelab.train.reference import (
    REFERENCE_FILE,
    cached_reference,
    compute_reference,
    live_reference,
)

log = logging.getLogger("tunelab")


# ---- records -> pairs of token ids ------------------------------------------------------------


def split_prompt(chosen, rejected) -> tuple:
    """(prompt, chosen, rejected) from two transcripts that share their start (HH-RLHF style).

    Messages split at the first differing message; text at the last whitespace before the
    first differing character, so each response starts with a whole word.
    """
    n = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), None)
    n = min(len(chosen), len(rejected)) if n is None else n
    if isinstance(chosen, str):
        space = [i for i in range(1, min(n, len(chosen) - 1) + 1) if chosen[i].isspace()]
        if space:  # back to the start of that whitespace run
            n = space[-1]
            while n > 0 and chosen[n - 1].isspace():
                n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def _check_messages(value, field: str, at: str) -> list[dict]:
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):  # fmt: skip
            raise DataError(f"{at}: {field} message {i} must be {{'role': str, 'content': str}}")
    return value


def _as_messages(response) -> list[dict]:
    return [{"role": "assistant", "content": response}] if isinstance(response, str) else response


class PairEncoder:
    """One record -> {'prompt', 'chosen', 'rejected'} token ids, or None for an unusable pair.

    Message lists go through the chat template (the response ends at its end-of-turn token);
    text is used as is, with the tokenizer's BOS and an EOS after each response. Records with
    instruction/input fields instead of a prompt are rendered as SFT renders them.
    """

    def __init__(self, tokenizer, cfg: RunConfig):
        from tunelab.data.templates import adds_bos, special_ids

        a, d = cfg.align, cfg.data
        self.tok, self.seq_len = tokenizer, cfg.train.seq_len
        self.prompt_field, self.chosen_field, self.rejected_field = (
            a.prompt_field, a.chosen_field, a.rejected_field)  # fmt: skip
        self.instruction_field, self.input_field = d.instruction_field, d.input_field
        self.specials, self.eos = special_ids(tokenizer), tokenizer.eos_id
        self.bos = [tokenizer.bos_id] if adds_bos(tokenizer) else []
        self.dropped = {"identical": [], "long_prompt": []}

    def texts(self, record: dict) -> tuple:
        """(prompt, chosen, rejected), each text or a list of messages, checked."""
        at = where(record)
        for f in (self.chosen_field, self.rejected_field):
            if f not in record:
                have = fields_of(record)
                raise DataError(f"{at}: pair has no field {f!r}{closest(f, have)}; "
                                f"fields: {', '.join(have) or '(none)'}")  # fmt: skip
        chosen, rejected = record[self.chosen_field], record[self.rejected_field]
        for f, v in ((self.chosen_field, chosen), (self.rejected_field, rejected)):
            if not isinstance(v, str | list) or not v or (isinstance(v, str) and not v.strip()):
                raise DataError(f"{at}: field {f!r} must be non-empty text or a list of messages")
            if isinstance(v, list):
                _check_messages(v, f, at)
        if record.get(self.prompt_field) is not None:
            prompt = record[self.prompt_field]
        elif isinstance(record.get(self.instruction_field), str):
            prompt = self._instruction_prompt(record)
        else:
            prompt, chosen, rejected = split_prompt(chosen, rejected)
            if not prompt or not chosen or not rejected:
                raise DataError(f"{at}: no field {self.prompt_field!r}, and the responses "
                                "share no start to split off as the prompt")  # fmt: skip
        if not isinstance(prompt, str | list) or not prompt:
            raise DataError(f"{at}: field {self.prompt_field!r} must be text or a list of messages")
        if isinstance(prompt, list):
            _check_messages(prompt, self.prompt_field, at)
            chosen, rejected = _as_messages(chosen), _as_messages(rejected)
        elif isinstance(chosen, list) or isinstance(rejected, list):
            raise DataError(f"{at}: a text prompt needs text responses (or give messages for all)")
        return prompt, chosen, rejected

    def _instruction_prompt(self, record: dict):
        from tunelab.data.templates import alpaca_prompt, instruction_messages

        instruction = record[self.instruction_field]
        extra = record.get(self.input_field) or ""
        if self.tok.chat_template:
            return instruction_messages(instruction, extra, "")[:-1]
        return alpaca_prompt(instruction, extra)

    def __call__(self, record: dict) -> dict | None:
        at = where(record)
        prompt, chosen, rejected = self.texts(record)
        if isinstance(prompt, list):
            p = self.tok.apply_chat_template(prompt, add_generation_prompt=True)
            c, r = self._chat(p, prompt, chosen, at), self._chat(p, prompt, rejected, at)
        else:
            p = self.bos + self.tok.encode(prompt, add_special_tokens=False)
            c, r = self._plain(p, prompt, chosen), self._plain(p, prompt, rejected)
        if not p:
            raise DataError(f"{at}: the prompt encodes to no tokens")
        room = self.seq_len - len(p)
        if room < 1:  # no response token would be left to score
            self.dropped["long_prompt"].append(at)
            return None
        c, r = c[:room], r[:room]  # keep the start, as TRL's default truncation does
        if c == r:
            self.dropped["identical"].append(at)
            return None
        return {"prompt": p, "chosen": c, "rejected": r}

    def _chat(self, p: list[int], prompt: list, response: list, at: str) -> list[int]:
        full = self.tok.apply_chat_template(prompt + response, add_generation_prompt=False)
        if full[: len(p)] != p:
            raise DataError(f"{at}: the chat template's prompt does not tokenize as a prefix of "
                            "prompt + response, so the response boundary is unknown")  # fmt: skip
        ids = full[len(p) :]
        last = [j for j, t in enumerate(ids) if t in self.specials]
        # The response ends at its end-of-turn token (in the loss); template text after it is not.
        if last:
            return ids[: last[-1] + 1]
        return ids + ([self.eos] if self.eos is not None else [])

    def _plain(self, p: list[int], prompt: str, response: str) -> list[int]:
        full = self.bos + self.tok.encode(prompt + response, add_special_tokens=False)
        # A merge across the boundary: encode the response alone rather than move the boundary.
        ids = full[len(p) :] if full[: len(p)] == p else self.tok.encode(response, False)
        if self.eos is not None and ids[-1:] != [self.eos]:
            ids = ids + [self.eos]
        return ids

    def report(self, source: str) -> None:
        why = {"identical": "chosen == rejected", "long_prompt": "prompt >= seq_len"}
        for key, at in self.dropped.items():
            if at:
                log.warning("%s: dropped %d pair(s) with %s (first at %s)", source, len(at),
                            why[key], at[0])  # fmt: skip


def encode_pairs(records: list[dict], tokenizer, cfg: RunConfig) -> list[dict]:
    """Every record as a pair of token ids; unusable pairs are dropped with a warning."""
    encoder = PairEncoder(tokenizer, cfg)
    pairs = [p for p in map(encoder, records) if p is not None]
    source = records[0].get("_source", "<data>") if records else "<data>"
    encoder.report(source)
    if records and not pairs:
        raise DataError(f"{source}: no usable preference pair left")
    return pairs


# ---- the reference model ----------------------------------------------------------------------


# ---- the task run_training plugs in -------------------------------------------------------------


class AlignTask:
    """Preference alignment for `run_training`: pairs, a preference loss, agreement before/after."""

    def __init__(self):
        self.reference = None  # fn(batch) -> reference log-probs, when they are not precomputed
        self.info: dict = {}

    def prepare(self, model, tokenizer, cfg: RunConfig):
        from tunelab.model.heads import require_causal

        require_causal(model, "alignment")
        a = cfg.align
        if a.loss not in PREFERENCE_LOSSES:
            raise ConfigError(f"align.loss {a.loss!r}{closest(a.loss, PREFERENCE_LOSSES)}; "
                              f"expected one of {', '.join(PREFERENCE_LOSSES)}")  # fmt: skip
        if a.beta <= 0:
            raise ConfigError(f"align.beta must be positive, got {a.beta}")
        if not 0.0 <= a.label_smoothing < 0.5:
            raise ConfigError(f"align.label_smoothing must be in [0, 0.5), got {a.label_smoothing}")
        self.cfg, self.model = cfg, model  # the method is applied to this same object next
        return model

    def data(self, cfg: RunConfig, tokenizer, rank: int = 0, world: int = 1):
        """Train/val pairs; the reference log-probs of the model as it is now (method applied)."""
        from tunelab.data import Batches, load_records, split_records

        d, t = cfg.data, cfg.train
        if not d.path:
            raise ConfigError("no preference data: give --data PATH (or data.path in the recipe)")
        records = load_records(d.path, fmt=d.format)
        if d.val_path:
            train, val = records, load_records(d.val_path, fmt=d.format)
        else:
            train, val = split_records(records, d.val_fraction, t.seed)
        parts = {"train": self._encode(train, "train", tokenizer, cfg)}
        if val:
            parts["val"] = self._encode(val, "val", tokenizer, cfg)
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id or 0
        model = self.model
        started = time.perf_counter()
        if cfg.align.precompute_ref:
            ref = (cached_reference(model, parts, cfg, pad, Path(cfg.out) / REFERENCE_FILE)
                   if cfg.out else compute_reference(model, parts, cfg, pad))  # fmt: skip
            for name, examples in parts.items():
                chosen, rejected = ref[name]
                for e, c, r in zip(examples, chosen.tolist(), rejected.tolist()):
                    e["ref_chosen"], e["ref_rejected"] = c, r
            how = "precomputed once, cached in the run"
        else:
            self.reference, how = live_reference(model)
        self.info = {"reference": how, "reference_s": round(time.perf_counter() - started, 3)}
        collate = lambda b: collate_pairs(b, pad)  # noqa: E731
        common = dict(collate_fn=collate, rank=rank, world_size=world)
        train_b = Batches(parts["train"], t.batch_size, seed=t.seed, **common)
        val_b = Batches(parts["val"], t.batch_size, shuffle=False, **common) if val else None
        stats = {"kind": "preference", "train_examples": len(parts["train"]),
                 "val_examples": len(parts.get("val", [])),
                 "train_tokens": sum(map(pair_tokens, parts["train"]))}  # fmt: skip
        return train_b, val_b, stats

    def _encode(self, records: list[dict], part: str, tokenizer, cfg: RunConfig) -> list[dict]:
        from tunelab.data import cached_encode, file_fingerprint, tokenizer_fingerprint

        d, a = cfg.data, cfg.align
        paths = [p for p in (d.path, d.val_path) if p]
        if not all(Path(p).exists() for p in paths):  # hub datasets: nothing to fingerprint
            return encode_pairs(records, tokenizer, cfg)
        fields = [
            a.prompt_field,
            a.chosen_field,
            a.rejected_field,
            d.instruction_field,
            d.input_field,
        ]
        key = dict(data=file_fingerprint(paths), part=part, val=d.val_fraction, seed=cfg.train.seed,
                   tok=tokenizer_fingerprint(tokenizer), kind="preference",
                   seq_len=cfg.train.seq_len, fields=fields, n=len(records))  # fmt: skip
        return cached_encode(key, lambda: encode_pairs(records, tokenizer, cfg))

    def objective(self, model, batch: dict):
        """The preference loss summed over the pairs; rewards and log-probs as metric sums."""
        a = self.cfg.align
        pc, pr = pair_logps(model, batch)
        if "ref_chosen" in batch:
            rc, rr = batch["ref_chosen"], batch["ref_rejected"]
        else:
            rc, rr = self.reference(batch)
        loss = preference_loss(a.loss, pc, pr, rc, rr, beta=a.beta,
                               label_smoothing=a.label_smoothing,
                               chosen_tokens=batch["chosen_tokens"],
                               rejected_tokens=batch["rejected_tokens"])  # fmt: skip
        return loss.sum(), len(loss), reward_sums(pc, pr, rc, rr, a.beta)

    def measure(self, model, tokenizer, cfg: RunConfig, val_batches) -> dict:
        """Agreement with the validation pairs, recorded before and after training."""
        from tunelab.train.loop import autocast

        if val_batches is None:
            return {}
        device = next(model.parameters()).device
        val_batches.set_epoch(val_batches.epoch)  # a capped evaluation may have stopped mid-epoch
        with autocast(device, compute_precision(cfg.train)):
            m = preference_metrics(model, val_batches, cfg.align.beta, self.reference)
        out = {"preference_accuracy": m["reward_accuracy"], "reward_margin": m["reward_margin"],
               "logp_chosen": m["logp_chosen"], "logp_rejected": m["logp_rejected"]}  # fmt: skip
        if cfg.eval.instructions:  # does aligning change instruction following?
            from tunelab.evaluate.instructions import measure_instructions

            e = cfg.eval
            out["instructions"] = measure_instructions(model, tokenizer, e.instructions,
                                                       e.instructions_limit,
                                                       e.instructions_max_new_tokens)  # fmt: skip
        return out

    def evaluators(self, cfg: RunConfig, tokenizer) -> list:
        from tunelab.train.run import sampler

        sample = sampler(cfg, tokenizer, chat=tokenizer.chat_template is not None)
        return [lambda model: {"samples": sample(model)}] if sample else []

    def finish(self, model, tokenizer, cfg: RunConfig, val_batches, run_dir: Path) -> dict:
        a = cfg.align
        return {"align": {"loss": a.loss, "beta": a.beta, "label_smoothing": a.label_smoothing,
                          **self.info}}  # fmt: skip
