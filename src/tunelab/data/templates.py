"""Records -> token examples {"input_ids", "labels"}; labels are -100 where not in the loss.

Three kinds: raw text (causal LM on every token), Alpaca-style instructions and chat
conversations (loss on the responses only, including the token that ends each response).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tunelab.data.load import fields_of, require_fields, where
from tunelab.errors import DataError, closest
from tunelab.tokenizer.tokenizer import Tokenizer

IGNORE = -100  # the label cross-entropy skips; never a token id, so never confused with pad
KINDS = ("auto", "text", "instruction", "chat")
log = logging.getLogger("tunelab")

# The prompts of the Stanford Alpaca repository, for tokenizers without a chat template.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class EncodeStats:
    """What encoding did to a dataset, so truncation is reported rather than silent."""

    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    loss_tokens: int = 0

    def __str__(self) -> str:
        return (
            f"{self.examples} examples, {self.tokens} tokens ({self.loss_tokens} in the loss); "
            f"{self.truncated} truncated, {self.dropped} dropped"
        )


def adds_bos(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer itself puts BOS first (Llama does, GPT-2 and SmolLM2 do not)."""
    bos = tokenizer.bos_id
    if bos is None:
        return False
    return tokenizer.encode("a")[:1] == [bos] and tokenizer.encode("a", False)[:1] != [bos]


def _text(record: dict, field: str, *, optional: bool = False) -> str:
    value = record.get(field)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise DataError(
            f"{where(record)}: field {field!r} is {type(value).__name__}, expected text"
        )
    return value


def _finish(ids: list[int], labels: list[int], seq_len: int | None, stats: EncodeStats):
    """Truncate to seq_len keeping the start; None when no loss token is left."""
    if seq_len is not None and len(ids) > seq_len:
        ids, labels = ids[:seq_len], labels[:seq_len]
        stats.truncated += 1
    # Position 0 is never a target (logits at t predict t+1), so it does not count.
    if all(label == IGNORE for label in labels[1:]):
        stats.dropped += 1
        return None
    stats.examples += 1
    stats.tokens += len(ids)
    stats.loss_tokens += sum(label != IGNORE for label in labels[1:])
    return {"input_ids": ids, "labels": labels}


def encode_texts(
    records: list[dict],
    tokenizer: Tokenizer,
    text_field: str = "text",
    *,
    seq_len: int | None = None,
    stats: EncodeStats | None = None,
) -> list[dict]:
    """One causal-LM example per document: [BOS if the tokenizer adds one] + text + EOS."""
    stats = stats if stats is not None else EncodeStats()
    require_fields(records, [text_field], _source(records))
    bos = [tokenizer.bos_id] if adds_bos(tokenizer) else []
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    texts = [_text(r, text_field) for r in records]
    out = []
    for text, ids in zip(texts, tokenizer.encode_batch(texts, add_special_tokens=False)):
        if not text.strip():
            stats.dropped += 1
            continue
        ids = bos + ids + eos
        example = _finish(ids, list(ids), seq_len, stats)
        if example is not None:
            out.append(example)
    return out


def special_ids(tokenizer: Tokenizer) -> set[int]:
    """Ids of special tokens (<|im_end|>, </s>, ...): the ones that can end a turn."""
    ids = {i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}
    return ids | {i for i in (tokenizer.eos_id, tokenizer.bos_id) if i is not None}


def chat_example(
    tokenizer: Tokenizer, messages: list[dict], at: str = "<data>", specials: set | None = None
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation with only the assistant turns in the loss.

    Each assistant turn's tokens run from the end of the prompt rendered with
    add_generation_prompt=True to its last special token (the end-of-turn token, kept in the
    loss); template text after it (ChatML's newline) is not. Both boundaries are checked to
    be token prefixes of the whole conversation, so a template that renders a prompt
    differently from the conversation is an error instead of a silently wrong mask.
    """
    specials = specials if specials is not None else special_ids(tokenizer)
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    labels = [IGNORE] * len(full)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise DataError(f"{at}: the conversation has no assistant turn to learn from")
    end = 0
    for i in turns:
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        upto = full
        if i < len(messages) - 1:
            upto = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        for part, what in ((prompt, "prompt"), (upto, "conversation up to this turn")):
            if full[: len(part)] != part:
                raise DataError(
                    f"{at}: message {i}: the chat template's {what} does not tokenize as a prefix "
                    "of the whole conversation, so the response boundary is unknown"
                )
        start, end = len(prompt), len(upto)
        last = [j for j in range(start, end) if full[j] in specials]
        end = last[-1] + 1 if last else end
        labels[start:end] = full[start:end]
    if not last and turns[-1] == len(messages) - 1 and tokenizer.eos_id is not None:
        # The template closes the final answer with no special token: EOS teaches stopping.
        full, labels = full[:end] + [tokenizer.eos_id], labels[:end] + [tokenizer.eos_id]
    return full, labels


def _messages(record: dict, field: str) -> list[dict]:
    messages = record.get(field)
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where(record)}: field {field!r} must be a non-empty list of messages")
    for i, m in enumerate(messages):
        ok = isinstance(m, dict) and isinstance(m.get("role"), str)
        if not ok or not isinstance(m.get("content"), str):
            raise DataError(
                f"{where(record)}: message {i} must be {{'role': str, 'content': str}}, got {m!r}"
            )
    return messages


def encode_chats(
    records: list[dict],
    tokenizer: Tokenizer,
    messages_field: str = "messages",
    *,
    seq_len: int | None = None,
    stats: EncodeStats | None = None,
) -> list[dict]:
    """Conversations through the chat template (ChatML when the model has none)."""
    stats = stats if stats is not None else EncodeStats()
    require_fields(records, [messages_field], _source(records))
    specials, out = special_ids(tokenizer), []
    for record in records:
        messages = _messages(record, messages_field)
        ids, labels = chat_example(tokenizer, messages, where(record), specials)
        example = _finish(ids, labels, seq_len, stats)
        if example is not None:
            out.append(example)
    return out


def instruction_messages(instruction: str, input: str, output: str, system: str | None = None):
    """The Alpaca record as a user turn (instruction, blank line, input) and an assistant turn."""
    user = f"{instruction}\n\n{input}" if input.strip() else instruction
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": user}, {"role": "assistant", "content": output}]


def alpaca_prompt(instruction: str, input: str) -> str:
    """The classic Alpaca prompt text, ending with '### Response:\\n'."""
    if input.strip():
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def encode_instructions(
    records: list[dict],
    tokenizer: Tokenizer,
    *,
    instruction_field: str = "instruction",
    input_field: str = "input",
    output_field: str = "output",
    system: str | None = None,
    use_chat_template: bool | None = None,
    seq_len: int | None = None,
    stats: EncodeStats | None = None,
) -> list[dict]:
    """Alpaca-style records; the chat template when the tokenizer has one (or when asked)."""
    stats = stats if stats is not None else EncodeStats()
    require_fields(records, [instruction_field, output_field], _source(records))
    chat = bool(tokenizer.chat_template) if use_chat_template is None else use_chat_template
    if records and all(not _text(r, output_field).strip() for r in records):
        raise DataError(
            f"{_source(records)}: every {output_field!r} is empty; nothing to learn "
            "(give responses, or --data.output_field for the column that has them)"
        )
    specials = special_ids(tokenizer)
    bos = [tokenizer.bos_id] if adds_bos(tokenizer) else []
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    out = []
    for record in records:
        instruction, output = _text(record, instruction_field), _text(record, output_field)
        input = _text(record, input_field, optional=True)
        if chat:
            messages = instruction_messages(instruction, input, output, system)
            ids, labels = chat_example(tokenizer, messages, where(record), specials)
        else:
            prompt = tokenizer.encode(alpaca_prompt(instruction, input), add_special_tokens=False)
            full = tokenizer.encode(alpaca_prompt(instruction, input) + output, False)
            if full[: len(prompt)] != prompt:
                # A merge across the boundary; the prompt alone is what the model sees at
                # inference, so encode the response separately rather than fail.
                full = prompt + tokenizer.encode(output, add_special_tokens=False)
            ids = bos + full + eos
            labels = [IGNORE] * (len(bos) + len(prompt)) + full[len(prompt) :] + eos
        example = _finish(ids, labels, seq_len, stats)
        if example is not None:
            out.append(example)
    return out


def _source(records: list[dict]) -> str:
    return records[0].get("_source", "<data>") if records else "<data>"


def detect_kind(records: list[dict], text_field: str = "text") -> str:
    """'chat', 'instruction' or 'text' from the first record's fields."""
    if not records:
        raise DataError("<data>: no records")
    have = fields_of(records[0])
    if "messages" in have:
        return "chat"
    if "instruction" in have and "output" in have:
        return "instruction"
    if text_field in have:
        return "text"
    raise DataError(
        f"{where(records[0])}: cannot tell the data kind from fields {', '.join(have)}; expected "
        f"'messages' (chat), 'instruction'+'output' (instructions) or {text_field!r} (raw text)"
    )


def encode_records(
    records: list[dict],
    tokenizer: Tokenizer,
    *,
    kind: str = "auto",
    seq_len: int | None = None,
    **options,
) -> tuple[list[dict], EncodeStats]:
    """Encode by kind (auto-detected from the fields), logging truncations and drops."""
    if kind not in KINDS:
        raise DataError(f"{_source(records)}: unknown data kind {kind!r}; expected one of {KINDS}")
    if kind == "auto":
        kind = detect_kind(records, options.get("text_field", "text"))
    stats = EncodeStats()
    encode = {"text": encode_texts, "chat": encode_chats, "instruction": encode_instructions}[kind]
    examples = encode(records, tokenizer, seq_len=seq_len, stats=stats, **options)
    if stats.truncated or stats.dropped:
        log.warning("%s: %s (seq_len=%s)", _source(records), stats, seq_len)
    if not examples:
        raise DataError(f"{_source(records)}: no example left to train on ({stats})")
    return examples, stats


def label_names(records: list[dict], label_field: str, given: list | None = None) -> list[str]:
    """The label names in index order: as given, else the sorted distinct labels of the data."""
    if given:
        if len(given) == 1 and "," in str(given[0]):  # --labels negative,positive
            given = str(given[0]).split(",")
        return [str(x).strip() for x in given]
    require_fields(records, [label_field], _source(records))
    values = {r[label_field] for r in records}
    if all(isinstance(v, int) for v in values):  # 0/1 labels: names are the indices
        return [str(i) for i in range(max(values) + 1)]
    return sorted(str(v) for v in values)


def label_index(record: dict, field: str, labels: list[str]) -> int:
    """A record's label as an index; integer labels may index the names ('0' -> negative)."""
    value = record[field]
    if str(value) in labels:
        return labels.index(str(value))
    if isinstance(value, int) and 0 <= value < len(labels):
        return value
    raise DataError(
        f"{where(record)}: label {value!r} is not one of {labels}{closest(str(value), labels)}"
    )


def encode_classification(
    records: list[dict],
    tokenizer: Tokenizer,
    labels: list[str],
    *,
    text_field: str = "text",
    label_field: str = "label",
    template: str = "{text}",
    seq_len: int | None = None,
    stats: EncodeStats | None = None,
) -> list[dict]:
    """{"input_ids", "label"} per record: the text inside its prompt modifiers, tokenized with
    the tokenizer's own special tokens ([CLS] ... [SEP] for BERT). A long text is cut in the
    middle of the text, never in the modifiers, so a post-modifier ('Sentiment:') survives."""
    stats = stats if stats is not None else EncodeStats()
    require_fields(records, [text_field, label_field], _source(records))
    if "{text}" not in template:
        raise DataError(f"template {template!r} has no {{text}} placeholder")
    pre, post = template.split("{text}", 1)
    out = []
    for record in records:
        y = label_index(record, label_field, labels)
        text = _text(record, text_field)
        ids = tokenizer.encode(pre + text + post)
        if seq_len is not None and len(ids) > seq_len:
            tail = tokenizer.encode(post, add_special_tokens=False) if post else []
            keep = max(1, seq_len - len(tail) - len(tokenizer.encode("")))
            head = tokenizer.encode(pre + text, add_special_tokens=False)[:keep]
            ids = _with_specials(tokenizer, head + tail)
            stats.truncated += 1
        stats.examples += 1
        stats.tokens += len(ids)
        out.append({"input_ids": ids, "label": y})
    return out


def _with_specials(tokenizer: Tokenizer, ids: list[int]) -> list[int]:
    """ids wrapped the way the tokenizer wraps a text: its post-processor's specials around it."""
    around = tokenizer.encode("")
    if not around:
        return ids
    return around[:1] + ids + around[1:] if len(around) == 2 else around + ids
