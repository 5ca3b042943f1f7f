"""Examples -> tensors: padding, packing, the epoch/shard/resume-aware batch iterator, and the
tokenization cache."""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from tunelab.data.templates import IGNORE
from tunelab.errors import DataError
from tunelab.files import atomic_file
from tunelab.tokenizer.tokenizer import Tokenizer

# Marks a batch that `Batches(keep_all=True)` hands a rank with no examples left: the rank
# runs it only to stay in step with the others (FSDP gathers weights in every forward).
FILLER = "filler"
_SEQUENCE_KEYS = ("input_ids", "labels", "segment_ids", "position_ids")


def collate(
    examples: list[dict], pad_id: int | None, *, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example: input_ids, labels, attention_mask.

    Packed rows also give segment_ids (pad: -1, a segment of its own) and position_ids.
    Labels are padded with -100, never pad_id, so passing EOS as pad_id is safe.
    Scalar fields (e.g. a class 'label') are stacked; other fields are left out.
    """
    if pad_id is None:
        raise DataError(
            "collate: no pad id; use the tokenizer's pad id, or its EOS id (labels are -100 there)"
        )
    if not examples:
        raise DataError("collate: empty batch")
    n = max(len(e["input_ids"]) for e in examples)
    if pad_to_multiple_of:
        n = -(-n // pad_to_multiple_of) * pad_to_multiple_of
    fill = {"input_ids": pad_id, "labels": IGNORE, "segment_ids": -1, "position_ids": 0}
    keys = [k for k in _SEQUENCE_KEYS if k in examples[0]]
    batch = {k: torch.full((len(examples), n), fill[k], dtype=torch.long) for k in keys}
    batch["attention_mask"] = torch.zeros(len(examples), n, dtype=torch.long)
    for i, example in enumerate(examples):
        length = len(example["input_ids"])
        for k in keys:
            batch[k][i, :length] = torch.tensor(example[k], dtype=torch.long)
        batch["attention_mask"][i, :length] = 1
    for k, v in examples[0].items():
        if k not in batch and not k.startswith("_") and isinstance(v, int | float):
            batch[k] = torch.tensor([e[k] for e in examples])
    return batch


def pack(examples: list[dict], seq_len: int, *, split: bool = True) -> list[dict]:
    """Concatenate documents into rows of seq_len tokens with segment_ids and position_ids.

    Positions restart at 0 and the label at each document start is -100: a loss that shifts
    labels by one then never predicts a document's first token from the previous document,
    and a document that fits in a row gets exactly the loss it gets unpacked.
    split=True fills every row (the last may be shorter), cutting documents at row ends;
    each piece is then a document of its own (positions restart, it cannot see the piece
    before it, and the one prediction across the cut is lost). split=False starts a new
    row for a document that does not fit the space left (for instruction data, where a
    response must keep its prompt); only documents longer than seq_len are still cut.
    """
    if seq_len < 2:
        raise DataError(f"pack: seq_len={seq_len} is too short (need >= 2)")
    rows: list[dict] = []
    row: dict = {k: [] for k in _SEQUENCE_KEYS}
    segment = 0

    def flush() -> None:
        nonlocal row, segment
        if row["input_ids"]:
            rows.append(row)
        row, segment = {k: [] for k in _SEQUENCE_KEYS}, 0

    for doc in examples:
        ids = doc["input_ids"]
        labels = doc.get("labels", ids)
        pos = 0
        while pos < len(ids):
            room = seq_len - len(row["input_ids"])
            if not split and len(ids) - pos > room and row["input_ids"]:
                flush()
                continue
            take = min(room, len(ids) - pos)
            row["input_ids"] += ids[pos : pos + take]
            row["labels"] += [IGNORE, *labels[pos + 1 : pos + take]]
            row["segment_ids"] += [segment] * take
            row["position_ids"] += range(take)
            segment, pos = segment + 1, pos + take
            if len(row["input_ids"]) == seq_len:
                flush()
    flush()
    return rows


class Batches:
    """Batches of a dataset: seeded per-epoch shuffle, optional length grouping, equal disjoint
    shards per rank, and a resumable position (state_dict / load_state_dict).

    Iterating runs the rest of the current epoch and then moves to the next one.

    keep_all (for evaluation): no example is dropped to even out the shards, so the ranks
    together see the whole set whatever its size. Every rank still gets the same number of
    batches; one whose share of the last global batch is empty gets a batch marked FILLER,
    whose results it must discard.
    """

    def __init__(
        self,
        examples: list[dict],
        batch_size: int,
        *,
        pad_id: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        group_by_length: bool = False,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        pad_to_multiple_of: int | None = None,
        mega_batch_mult: int = 50,
        collate_fn: Callable[[list[dict]], dict] | None = None,
        keep_all: bool = False,
    ):
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be >= 1")
        if pad_id is None and collate_fn is None:
            raise DataError("Batches: no pad_id; pass the tokenizer's pad id, or its EOS id")
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
        self.examples, self.batch_size = examples, batch_size
        self.seed, self.shuffle, self.group_by_length = seed, shuffle, group_by_length
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.mega_batch_mult, self.keep_all = mega_batch_mult, keep_all
        self.collate_fn = collate_fn or (
            lambda b: collate(b, pad_id, pad_to_multiple_of=pad_to_multiple_of)
        )
        self.epoch = self.index = 0
        if len(self) == 0:
            raise DataError(
                f"{len(examples)} examples make no batch of {batch_size} on each of "
                f"{world_size} rank(s){' with drop_last' if drop_last else ''}"
            )

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        usable = len(self.examples)
        if not self.keep_all:
            usable -= usable % self.world_size
        per_step = self.batch_size * self.world_size
        return usable // per_step if self.drop_last else -(-usable // per_step)

    def plan(self, epoch: int) -> list[list[int]]:
        """This rank's batches in an epoch, as example indices (keep_all: [] for a filler)."""
        order = list(range(len(self.examples)))
        rng = random.Random(f"{self.seed}/{epoch}")  # str seeds are stable across processes
        if self.shuffle:
            rng.shuffle(order)
        # Equal shares keep ranks in lockstep; the few dropped differ from epoch to epoch.
        if not self.keep_all:
            order = order[: len(order) - len(order) % self.world_size]
        step = self.batch_size * self.world_size
        if self.group_by_length:
            mega = step * self.mega_batch_mult
            length = [len(e["input_ids"]) for e in self.examples]
            order = [
                i
                for k in range(0, len(order), mega)
                for i in sorted(order[k : k + mega], key=lambda i: -length[i])
            ]
        steps = [order[k : k + step] for k in range(0, len(order), step)]
        if self.drop_last and steps and len(steps[-1]) < step:
            steps.pop()
        if self.group_by_length and self.shuffle:
            rng.shuffle(steps)  # else every epoch would start with its longest batches
        # Striding through a global batch gives every rank examples of similar length.
        return [s[self.rank :: self.world_size] for s in steps]

    def __iter__(self) -> Iterator[dict]:
        plan = self.plan(self.epoch)
        while self.index < len(plan):
            indices = plan[self.index]
            # Advance before yielding: a checkpoint taken after this batch resumes at the next.
            self.index += 1
            if not indices:
                yield self.collate_fn(self.examples[:1]) | {FILLER: True}
                continue
            yield self.collate_fn([self.examples[i] for i in indices])
        self.epoch, self.index = self.epoch + 1, 0

    def forever(self) -> Iterator[dict]:
        """Batches across epochs without end, for step-based training."""
        while True:
            yield from self

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.index = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if not 0 <= index <= len(self):
            raise DataError(f"data position index={index} is outside an epoch of {len(self)}")
        self.epoch, self.index = epoch, index


def file_fingerprint(paths: list[str | Path]) -> list[list]:
    """[path, size, mtime_ns] for each file (folders: every file inside), for cache keys."""
    out = []
    for p in map(Path, paths):
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            stat = f.stat()
            out.append([str(f.resolve()), stat.st_size, stat.st_mtime_ns])
    return out


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A hash of everything that changes token ids: tokenizer.json, specials, chat template."""
    h = hashlib.sha256(tokenizer.backend.to_str().encode())
    h.update(json.dumps([tokenizer.special, tokenizer.chat_template], sort_keys=True).encode())
    return h.hexdigest()


CACHE_FORMAT = 1  # bump when the stored layout or the encoding rules change


def cache_path(key_parts: dict) -> Path:
    """Where the examples for key_parts are stored."""
    root = Path(os.environ.get("TUNELAB_CACHE") or "~/.cache/tunelab").expanduser()
    text = json.dumps({"format": CACHE_FORMAT, **key_parts}, sort_keys=True, default=str)
    return root / "tokenized" / f"{hashlib.sha256(text.encode()).hexdigest()}.json"


def cached_encode(key_parts: dict, fn: Callable[[], list[dict]]) -> list[dict]:
    """fn()'s examples, computed once per key and stored under $TUNELAB_CACHE/tokenized.

    key_parts must name all inputs: file_fingerprint(...) of the data, tokenizer_fingerprint,
    template settings and seq_len.
    """
    path = cache_path(key_parts)
    if path.exists():
        try:
            return json.loads(path.read_text())["examples"]
        except (OSError, ValueError, KeyError):
            pass  # a damaged entry is recomputed and overwritten, never fatal
    examples = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp, open(tmp, "w") as f:  # a kill never leaves a half entry
        json.dump({"key": key_parts, "examples": examples}, f, separators=(",", ":"), default=str)
    return examples
