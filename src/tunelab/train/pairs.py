"""Preference records -> pairs of token ids {'prompt', 'chosen', 'rejected'}, for align.py.

A record gives a prompt, or instruction/input fields, or neither: then the prompt is split off
the two responses (HH-RLHF dialogues at their last Assistant turn). A pair that cannot be used
is skipped and counted with its file:line, or stops the run under align.strict.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tunelab.data.dialogue import is_transcript, split_transcript, transcript_messages
from tunelab.data.load import fields_of, where
from tunelab.errors import DataError, closest
from tunelab.train.config import RunConfig

log = logging.getLogger("tunelab")


def split_prompt(chosen, rejected) -> tuple:
    """(prompt, chosen, rejected) from two transcripts that share their start.

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
        if not (
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
        ):
            raise DataError(f"{at}: {field} message {i} must be {{'role': str, 'content': str}}")
    return value


def _as_messages(response) -> list[dict]:
    return [{"role": "assistant", "content": response}] if isinstance(response, str) else response


SKIPS = {  # why a pair was skipped -> how the summary line says it
    "identical": "chosen == rejected",
    "empty_response": "an empty response",
    "prompt_mismatch": "prompts that differ between chosen and rejected",
    "no_prompt": "no prompt to split off",
    "long_prompt": "a prompt >= seq_len",
    "cut_identical": "responses identical once cut to seq_len",
}
SEQ_LEN_SKIPS = ("long_prompt", "cut_identical")  # follow from train.seq_len: never strict


class UnusablePair(DataError):
    """A well-formed record that makes no pair: skipped and counted, raised under align.strict."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class PairEncoder:
    """One record -> {'prompt', 'chosen', 'rejected'} token ids, or None for a skipped pair.

    Message lists go through the chat template (the response ends at its end-of-turn token);
    text is used as is, with the tokenizer's BOS and an EOS after each response. Records with
    instruction/input fields instead of a prompt are rendered as SFT renders them; HH-RLHF
    dialogues are split at their last Assistant turn (data/dialogue.py).
    """

    def __init__(self, tokenizer, cfg: RunConfig):
        from tunelab.data.templates import adds_bos, special_ids

        a, d = cfg.align, cfg.data
        self.tok, self.seq_len, self.strict = tokenizer, cfg.train.seq_len, a.strict
        self.prompt_field, self.chosen_field, self.rejected_field = (
            a.prompt_field,
            a.chosen_field,
            a.rejected_field,
        )
        self.instruction_field, self.input_field = d.instruction_field, d.input_field
        self.specials, self.eos = special_ids(tokenizer), tokenizer.eos_id
        self.bos = [tokenizer.bos_id] if adds_bos(tokenizer) else []
        self.skipped: dict[str, list[str]] = {}  # reason -> file:line of each skipped pair

    def texts(self, record: dict) -> tuple:
        """(prompt, chosen, rejected), each text or a list of messages, checked."""
        at = where(record)
        for f in (self.chosen_field, self.rejected_field):
            if f not in record:
                have = fields_of(record)
                raise DataError(
                    f"{at}: pair has no field {f!r}{closest(f, have)}; "
                    f"fields: {', '.join(have) or '(none)'}"
                )
        chosen, rejected = record[self.chosen_field], record[self.rejected_field]
        for f, v in ((self.chosen_field, chosen), (self.rejected_field, rejected)):
            if not isinstance(v, str | list):
                raise DataError(f"{at}: field {f!r} must be non-empty text or a list of messages")
            if isinstance(v, list):
                _check_messages(v, f, at)
            if not v or (isinstance(v, str) and not v.strip()):
                raise UnusablePair("empty_response", f"{at}: field {f!r} is empty")
        if chosen == rejected:
            raise UnusablePair("identical", f"{at}: chosen and rejected are the same")
        if record.get(self.prompt_field) is not None:
            prompt = record[self.prompt_field]
        elif isinstance(record.get(self.instruction_field), str):
            prompt = self._instruction_prompt(record)
        elif is_transcript(chosen) and is_transcript(rejected):
            prompt, chosen, rejected = self._transcripts(chosen, rejected, at)
        else:
            prompt, chosen, rejected = split_prompt(chosen, rejected)
            if not prompt or not chosen or not rejected:
                raise UnusablePair(
                    "no_prompt",
                    f"{at}: no field {self.prompt_field!r}, and the "
                    "responses share no start to split off as the prompt",
                )
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

    def _transcripts(self, chosen: str, rejected: str, at: str) -> tuple:
        """An HH-RLHF pair: messages through the chat template when the model has one, else text."""
        (prompt, c), (other, r) = split_transcript(chosen), split_transcript(rejected)
        if prompt != other:
            raise UnusablePair(
                "prompt_mismatch",
                f"{at}: the dialogues differ before their last "
                "Assistant turn, so the two responses answer different prompts",
            )
        if not c.strip() or not r.strip():
            raise UnusablePair("empty_response", f"{at}: a last Assistant turn is empty")
        if not self.tok.chat_template:
            return prompt, c, r
        reply = lambda text: [{"role": "assistant", "content": text.strip()}]  # noqa: E731
        return transcript_messages(prompt), reply(c), reply(r)

    def __call__(self, record: dict) -> dict | None:
        try:
            return self.encode(record)
        except UnusablePair as e:
            if self.strict and e.reason not in SEQ_LEN_SKIPS:
                raise
            self.skipped.setdefault(e.reason, []).append(where(record))
            return None

    def encode(self, record: dict) -> dict:
        """The pair's token ids; UnusablePair when it makes no pair."""
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
        if c == r:
            raise UnusablePair("identical", f"{at}: chosen and rejected encode to the same tokens")
        room = self.seq_len - len(p)
        if room < 1:  # no response token would be left to score
            raise UnusablePair("long_prompt", f"{at}: the prompt fills train.seq_len")
        c, r = c[:room], r[:room]  # keep the start, as TRL's default truncation does
        if c == r:
            raise UnusablePair("cut_identical", f"{at}: the responses are the same once cut")
        return {"prompt": p, "chosen": c, "rejected": r}

    def _chat(self, p: list[int], prompt: list, response: list, at: str) -> list[int]:
        full = self.tok.apply_chat_template(prompt + response, add_generation_prompt=False)
        if full[: len(p)] != p:
            raise DataError(
                f"{at}: the chat template's prompt does not tokenize as a prefix of "
                "prompt + response, so the response boundary is unknown"
            )
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


def _file_order(position: str) -> tuple:
    path, _, line = position.rpartition(":")
    return (path, int(line)) if line.isdigit() else (position, 0)


def _short(position: str) -> str:
    path, _, line = position.rpartition(":")
    return f"{Path(path).name}:{line}"


def skip_summary(skipped: dict[str, list[str]], total: int, first: int = 5) -> str:
    """'9 of 1812 pairs skipped (4 with an empty response, ...); first at f:75, f:411, ...'."""
    n = sum(map(len, skipped.values()))
    why = ", ".join(f"{len(at)} with {SKIPS[k]}" for k, at in skipped.items() if at)
    positions = sorted((p for at in skipped.values() for p in at), key=_file_order)
    shown = ", ".join(map(_short, positions[:first])) + (", ..." if len(positions) > first else "")
    return f"{n} of {total} pairs skipped ({why}); first at {shown}"


def encode_pairs(
    records: list[dict], tokenizer, cfg: RunConfig, skipped: dict | None = None
) -> list[dict]:
    """Every usable record as a pair of token ids; align.strict raises on the first unusable one.

    Skipped pairs are added to skipped ({reason: [file:line]}), or logged in one line here when
    no dict is given.
    """
    encoder = PairEncoder(tokenizer, cfg)
    pairs = [p for p in map(encoder, records) if p is not None]
    source = records[0].get("_source", "<data>") if records else "<data>"
    if skipped is not None:
        for reason, at in encoder.skipped.items():
            skipped.setdefault(reason, []).extend(at)
    elif encoder.skipped:
        log.warning("%s: %s", source, skip_summary(encoder.skipped, len(records)))
    if records and not pairs:
        why = skip_summary(encoder.skipped, len(records))
        raise DataError(f"{source}: no usable preference pair left: {why}")
    return pairs
