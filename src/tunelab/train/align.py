"""Preference alignment (DPO, IPO, hinge): the align task.

A pair is encoded as prompt, chosen and rejected token ids (train/pairs.py);
data/preference.py batches it as one row [prompt, chosen, rejected] and scores it with the
prompt run once.
The reference model's log-probs come from train/reference.py.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tunelab.data.preference import collate_pairs, pair_logps, pair_tokens
from tunelab.errors import ConfigError, closest
from tunelab.evaluate.preference import preference_metrics, reward_sums
from tunelab.train.config import RunConfig, compute_precision
from tunelab.train.objectives import PREFERENCE_LOSSES, preference_loss
from tunelab.train.pairs import encode_pairs, skip_summary
from tunelab.train.reference import (
    REFERENCE_FILE,
    cached_reference,
    compute_reference,
    live_reference,
)

log = logging.getLogger("tunelab")


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
            raise ConfigError(
                f"align.loss {a.loss!r}{closest(a.loss, PREFERENCE_LOSSES)}; "
                f"expected one of {', '.join(PREFERENCE_LOSSES)}"
            )
        if a.beta <= 0:
            raise ConfigError(f"align.beta must be positive, got {a.beta}")
        if not 0.0 <= a.label_smoothing < 0.5:
            raise ConfigError(f"align.label_smoothing must be in [0, 0.5), got {a.label_smoothing}")
        self.cfg, self.model = cfg, model  # the method is applied to this same object next
        return model

    def data(self, cfg: RunConfig, tokenizer, rank: int = 0, world: int = 1):
        """Train/val pairs; the reference log-probs of the model as it is now (method applied)."""
        from tunelab.data import Batches, load_split

        d, t = cfg.data, cfg.train
        # No text_mode: a text file holds no preference pairs (they come from JSON, CSV, the hub).
        _, train, val = load_split(
            d.path, d.val_path, d.val_fraction, t.seed, fmt=d.format, what="preference"
        )
        skipped: dict[str, list[str]] = {}
        parts = {"train": self._encode(train, "train", tokenizer, cfg, skipped)}
        if val:
            parts["val"] = self._encode(val, "val", tokenizer, cfg, skipped)
        if skipped:
            log.warning(
                "%s: %s (align.strict stops at the first instead)",
                d.path,
                skip_summary(skipped, len(train) + len(val)),
            )
        pad = tokenizer.batch_pad_id
        model = self.model
        started = time.perf_counter()
        if cfg.align.precompute_ref:
            ref = (
                cached_reference(model, parts, cfg, pad, Path(cfg.out) / REFERENCE_FILE)
                if cfg.out
                else compute_reference(model, parts, cfg, pad)
            )
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
        val_b = (
            Batches(parts["val"], t.batch_size, shuffle=False, keep_all=True, **common)
            if val
            else None
        )
        stats = {
            "kind": "preference",
            "train_examples": len(parts["train"]),
            "val_examples": len(parts.get("val", [])),
            "train_tokens": sum(map(pair_tokens, parts["train"])),
            "skipped_pairs": sum(map(len, skipped.values())),
            "skipped_reasons": {k: len(at) for k, at in skipped.items()},
        }
        return train_b, val_b, stats

    def _encode(
        self, records: list[dict], part: str, tokenizer, cfg: RunConfig, skipped: dict
    ) -> list[dict]:
        """The part's pairs, cached with the file:line of the pairs skipped (added to skipped)."""
        from tunelab.data import cached_encode, file_fingerprint, tokenizer_fingerprint

        def encode() -> dict:
            mine: dict[str, list[str]] = {}
            return {"pairs": encode_pairs(records, tokenizer, cfg, mine), "skipped": mine}

        d, a = cfg.data, cfg.align
        paths = [p for p in (d.path, d.val_path) if p]
        if all(Path(p).exists() for p in paths):
            fields = [
                a.prompt_field,
                a.chosen_field,
                a.rejected_field,
                d.instruction_field,
                d.input_field,
            ]
            key = dict(
                data=file_fingerprint(paths),
                part=part,
                val=d.val_fraction,
                seed=cfg.train.seed,
                tok=tokenizer_fingerprint(tokenizer),
                kind="preference-2",
                seq_len=cfg.train.seq_len,
                fields=fields,
                n=len(records),
                strict=a.strict,
            )
            got = cached_encode(key, encode)
        else:  # hub datasets: nothing to fingerprint
            got = encode()
        for reason, at in got["skipped"].items():
            skipped.setdefault(reason, []).extend(at)
        return got["pairs"]

    def objective(self, model, batch: dict):
        """The preference loss summed over the pairs; rewards and log-probs as metric sums."""
        a = self.cfg.align
        pc, pr = pair_logps(model, batch)
        if "ref_chosen" in batch:
            rc, rr = batch["ref_chosen"], batch["ref_rejected"]
        else:
            rc, rr = self.reference(batch)
        loss = preference_loss(
            a.loss,
            pc,
            pr,
            rc,
            rr,
            beta=a.beta,
            label_smoothing=a.label_smoothing,
            chosen_tokens=batch["chosen_tokens"],
            rejected_tokens=batch["rejected_tokens"],
        )
        return loss.sum(), len(loss), reward_sums(pc, pr, rc, rr, a.beta)

    def measure(self, model, tokenizer, cfg: RunConfig, val_batches) -> dict:
        """Agreement with the validation pairs and perplexity on eval.domain/eval.general texts,
        recorded before and after training."""
        from tunelab.train.lm import perplexities
        from tunelab.train.loop import autocast

        out = {}
        if val_batches is not None:
            device = next(model.parameters()).device
            val_batches.set_epoch(val_batches.epoch)  # a capped evaluation may stop mid-epoch
            with autocast(device, compute_precision(cfg.train)):
                m = preference_metrics(model, val_batches, cfg.align.beta, self.reference)
            out = {
                "preference_accuracy": m["reward_accuracy"],
                "reward_margin": m["reward_margin"],
                "logp_chosen": m["logp_chosen"],
                "logp_rejected": m["logp_rejected"],
            }
        if cfg.eval.instructions:  # does aligning change instruction following?
            from tunelab.evaluate.instructions import measure_instructions

            e = cfg.eval
            out["instructions"] = measure_instructions(
                model,
                tokenizer,
                e.instructions,
                e.instructions_limit,
                e.instructions_max_new_tokens,
            )
        ppl = perplexities(cfg, model, tokenizer)
        model.eval()  # perplexities() leaves the model in training mode
        return out | ({"perplexity": ppl} if ppl else {})

    def evaluators(self, cfg: RunConfig, tokenizer) -> list:
        from tunelab.train.lm import sampler

        sample = sampler(cfg, tokenizer, chat=tokenizer.chat_template is not None)
        return [lambda model: {"samples": sample(model)}] if sample else []

    def finish(self, model, tokenizer, cfg: RunConfig, val_batches, run_dir: Path) -> dict:
        a = cfg.align
        return {
            "align": {
                "loss": a.loss,
                "beta": a.beta,
                "label_smoothing": a.label_smoothing,
                **self.info,
            }
        }
