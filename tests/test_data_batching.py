"""Examples into batches: collate, packing (with loss equality), the seeded, sharded and
resumable Batches, length grouping, and the encoding cache."""

import json
import random

import pytest
import torch
import torch.nn.functional as F

from tunelab.data import IGNORE, Batches, cache_path, cached_encode, collate, file_fingerprint, pack
from tunelab.errors import DataError

# --- batching ----------------------------------------------------------------------------------


def test_collate_pads_right_with_ignored_labels():
    examples = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7], "label": 1}, {"input_ids": [8]}]
    examples[1]["labels"], examples[1]["label"] = [8], 0
    batch = collate(examples, pad_id=0, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE], [8, IGNORE, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["label"].tolist() == [1, 0]
    with pytest.raises(DataError, match="no pad id"):
        collate(examples, None)


def _docs(n, seed, vocab=64, prompt=False):
    g = random.Random(seed)
    docs = []
    for _ in range(n):
        ids = [g.randrange(vocab) for _ in range(g.randint(2, 20))]
        cut = g.randint(0, len(ids) - 1) if prompt else 0  # SFT-style: a masked prompt
        docs.append({"input_ids": ids, "labels": [IGNORE] * cut + ids[cut:]})
    return docs


def test_pack_layout():
    docs = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5, 6, 7, 8]}]
    rows = pack(docs, 4)
    assert [r["input_ids"] for r in rows] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert [r["segment_ids"] for r in rows] == [[0, 0, 0, 1], [0, 0, 0, 0]]
    assert [r["position_ids"] for r in rows] == [[0, 1, 2, 0], [0, 1, 2, 3]]
    assert [r["labels"] for r in rows] == [[IGNORE, 2, 3, IGNORE], [IGNORE, 6, 7, 8]]
    whole = pack(docs, 6, split=False)
    assert [r["input_ids"] for r in whole] == [[1, 2, 3], [4, 5, 6, 7, 8]]
    assert all(len(r["input_ids"]) == 16 for r in pack(_docs(40, 0), 16)[:-1])


def _summed_loss(model, batch, packed):
    extra = {k: batch[k] for k in ("position_ids", "segment_ids")} if packed else {}
    mask = None if packed else batch["attention_mask"]
    logits = model(batch["input_ids"], attention_mask=mask, **extra)
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return loss.item(), int((labels != IGNORE).sum())


@pytest.mark.parametrize("prompt", [False, True])
def test_packed_loss_equals_unpacked_loss(prompt):
    from tunelab.model.config import ModelConfig
    from tunelab.model.heads import CausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(
        family="llama", vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64
    )
    # float64: in float32 a ~500-nat sum differs by ~6e-5 from rounding alone (rel. 1e-7).
    model = CausalLM(cfg).double().eval()
    docs = _docs(12, seed=1, prompt=prompt)
    with torch.no_grad():
        reference = _summed_loss(model, collate(docs, pad_id=0), packed=False)
        rows = pack(docs, 32, split=False)
        assert len(rows) > 2
        packed = _summed_loss(model, collate(rows, pad_id=0), packed=True)
        one_row = _summed_loss(model, collate(pack(docs, 10_000), pad_id=0), packed=True)
        # The test can fail: without segments, or with document starts as targets, it does.
        leaky = collate(rows, pad_id=0)
        leaky["segment_ids"] = torch.zeros_like(leaky["segment_ids"])
        leaked = _summed_loss(model, leaky, packed=True)
    assert packed[1] == one_row[1] == reference[1]
    assert abs(packed[0] - reference[0]) < 1e-5 and abs(one_row[0] - reference[0]) < 1e-5
    assert abs(leaked[0] - reference[0]) > 1e-3
    starts = [
        {
            **r,
            "labels": [
                t if p == 0 else lab
                for t, p, lab in zip(r["input_ids"], r["position_ids"], r["labels"])
            ],
        }
        for r in rows
    ]  # document starts as targets: predicted from the previous document
    with torch.no_grad():
        assert _summed_loss(model, collate(starts, 0), packed=True)[1] > reference[1]


def test_split_pack_equals_unpacked_pieces():
    from tunelab.model.config import ModelConfig
    from tunelab.model.heads import CausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(family="llama", vocab_size=64, n_layer=1, n_head=2, d_model=16, d_ff=32)
    model = CausalLM(cfg).double().eval()
    docs, seq_len = _docs(6, seed=2), 16
    # Independent reference: cut the token stream every seq_len and at every document end.
    pieces, filled = [], 0
    for doc in docs:
        ids = doc["input_ids"]
        while ids:
            take = min(seq_len - filled, len(ids))
            pieces.append({"input_ids": ids[:take], "labels": ids[:take]})
            ids, filled = ids[take:], (filled + take) % seq_len
    with torch.no_grad():
        packed = _summed_loss(model, collate(pack(docs, seq_len), 0), packed=True)
        reference = _summed_loss(model, collate(pieces, 0), packed=False)
    assert packed[1] == reference[1] and abs(packed[0] - reference[0]) < 1e-5


def _examples(n, seed=0):
    g = random.Random(seed)
    return [{"input_ids": [i] * g.randint(1, 40), "labels": [i], "id": i} for i in range(n)]


def _ids(batches):
    return [b["id"].tolist() for b in batches]


def test_batches_shuffle_by_seed_and_epoch():
    data = _examples(23)
    a, b, c = (Batches(data, 4, pad_id=0, seed=s) for s in (1, 1, 2))
    first = _ids(a)
    assert len(a) == len(first) == 6 and sorted(sum(first, [])) == list(range(23))
    assert first == _ids(b) and first != _ids(c)
    assert _ids(a) != first  # the second epoch has its own order
    assert len(Batches(data, 4, pad_id=0, drop_last=True)) == 5
    with pytest.raises(DataError, match="make no batch"):
        Batches(data[:3], 4, pad_id=0, drop_last=True)


@pytest.mark.parametrize("n", [24, 27])
def test_batches_shard_disjoint_equal_and_covering(n):
    data = _examples(n)
    shards = [_ids(Batches(data, 3, pad_id=0, seed=5, rank=r, world_size=4)) for r in range(4)]
    flat = [sum(s, []) for s in shards]
    assert len({len(s) for s in shards}) == 1 and len({len(f) for f in flat}) == 1
    seen = sum(flat, [])
    assert len(seen) == len(set(seen)) == n - n % 4  # disjoint; at most world_size-1 left out
    assert [len(b) for b in shards[0]] == [len(b) for b in shards[3]]


def test_batches_resume_at_the_next_batch():
    data = _examples(30)
    full = Batches(data, 4, pad_id=0, seed=3, group_by_length=True)
    expected = _ids(full) + _ids(full)  # two epochs
    run = Batches(data, 4, pad_id=0, seed=3, group_by_length=True)
    it, seen = run.forever(), []
    for _ in range(10):  # into the second epoch
        seen.append(next(it)["id"].tolist())
    state = json.loads(json.dumps(run.state_dict()))
    assert state == {"epoch": 1, "index": 2}
    resumed = Batches(data, 4, pad_id=0, seed=3, group_by_length=True)
    resumed.load_state_dict(state)
    assert seen + _ids(resumed) == expected


def test_group_by_length_reduces_padding():
    data = _examples(400, seed=7)

    def padding(**kw):
        return sum(int((b["attention_mask"] == 0).sum()) for b in Batches(data, 8, pad_id=0, **kw))

    assert padding(group_by_length=True) < padding() / 4
    grouped = Batches(data, 8, pad_id=0, group_by_length=True, mega_batch_mult=100)
    assert sorted(sum(_ids(grouped), [])) == list(range(400))
    # One mega-batch sorted by length; the batch order is still shuffled, not longest first.
    longest = [b["input_ids"].shape[1] for b in grouped]
    assert longest != sorted(longest, reverse=True)


def test_cache_reuses_and_separates_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "d.txt"
    data.write_text("hello")
    calls = []

    def encode():
        calls.append(1)
        return [{"input_ids": [1, 2], "labels": [IGNORE, 2]}]

    key = {"data": file_fingerprint([data]), "tokenizer": "abc", "seq_len": 8}
    assert cached_encode(key, encode) == encode() and len(calls) == 2
    assert cached_encode(key, encode) == encode() and len(calls) == 3  # second call: from disk
    path = cache_path(key)
    assert path.parent == tmp_path / "cache" / "tokenized" and path.exists()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    cached_encode({**key, "seq_len": 16}, encode)
    assert len(calls) == 4
    data.write_text("hello, changed")
    assert cache_path({**key, "data": file_fingerprint([data])}) != path
    path.write_text("{broken")
    assert cached_encode(key, encode) == encode() and len(calls) == 6  # damaged: recomputed
