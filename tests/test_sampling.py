"""Sampling and stopping: scores against transformers' logits processors, seeds, stop strings,
EOS per row, no padding in what stopped rows report, bad prompts."""

import pytest
import torch
from test_generate import PROMPTS, _tiny  # tests/ is on sys.path

from tunelab.errors import ConfigError
from tunelab.generate import Sampling, generate_from_ids, generate_ids, next_token_scores

transformers = pytest.importorskip("transformers")


# ---- sampling scores against transformers' logits processors ----

SCORE_CASES = [
    dict(temperature=0.7),
    dict(temperature=1.0, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=0.9, top_k=10, top_p=0.6),
    dict(temperature=1.0, repetition_penalty=1.3),
    dict(temperature=0.0, repetition_penalty=0.7),  # greedy with a penalty (and a reward)
    dict(temperature=0.5, top_k=40, top_p=0.95, repetition_penalty=1.2),
]


def _hf_scores(ids, logits, kw):
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()  # transformers' order: penalty, then temperature, top-k, top-p
    if kw.get("repetition_penalty", 1.0) != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(kw["repetition_penalty"]))
    if kw.get("temperature", 0.0) > 0:
        procs.append(TemperatureLogitsWarper(kw["temperature"]))
        if kw.get("top_k", 0) > 0:
            procs.append(TopKLogitsWarper(kw["top_k"]))
        if kw.get("top_p", 1.0) < 1.0:
            procs.append(TopPLogitsWarper(kw["top_p"]))
    return procs(ids, logits.clone())


@pytest.mark.parametrize(
    "kw", SCORE_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items())
)
def test_scores_match_transformers_processors(kw):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 200, generator=g) * 3
    seen = torch.randint(0, 200, (4, 30), generator=g)
    ours = next_token_scores(logits, seen, Sampling(**kw))
    theirs = _hf_scores(seen, logits, kw)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = torch.isfinite(theirs)
    assert torch.allclose(ours[finite], theirs[finite], rtol=1e-6, atol=1e-6)
    if kw.get("top_k") or kw.get("top_p", 1.0) < 1:
        assert torch.isinf(ours).any()  # the filter did remove something
    assert not torch.equal(ours, logits) or kw == {}  # something was applied


def test_sampling_validates_its_fields():
    for bad in (
        dict(max_new_tokens=0),
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(repetition_penalty=0),
    ):
        with pytest.raises(ConfigError):
            Sampling(**bad)


# ---- seeds, stop strings, EOS ----


def test_seed_makes_sampling_reproducible(tmp_path):
    _, ours, _ = _tiny("qwen2", tmp_path, peaky=False)
    runs = {}
    for seed in (1, 1, 2, 3):
        s = Sampling(max_new_tokens=24, temperature=1.5, seed=seed)
        out = generate_ids(ours, PROMPTS, s, eos_ids=set(), pad_id=0)
        assert runs.setdefault(seed, out) == out  # the same seed, the same tokens
    assert len({str(v) for v in runs.values()}) == 3  # different seeds, different tokens
    greedy = generate_ids(ours, PROMPTS, Sampling(max_new_tokens=24), eos_ids=set(), pad_id=0)
    assert greedy not in runs.values()  # it did sample


def test_stop_string_ends_generation_and_is_cut(tmp_path):
    _, ours, tok = _tiny("llama", tmp_path)
    full = generate_from_ids(ours, tok, PROMPTS, Sampling(max_new_tokens=16))
    ids0 = full[0]["ids"]
    assert len(ids0) == 16 and not full[0]["stopped"]
    k = next(i for i in range(3, 16) if ids0[i] not in ids0[:i])  # a token seen first at step k
    stop = tok.decode(ids0[k : k + 1])
    out = generate_from_ids(ours, tok, PROMPTS, Sampling(max_new_tokens=16, stop=[stop, "zzz"]))
    assert out[0]["ids"] == ids0[: k + 1]  # stopped right after the stop string appeared
    assert out[0]["new_tokens"] == k + 1
    assert out[0]["text"].rstrip() == tok.decode(ids0[:k])  # the stop string is cut from the text
    assert stop not in out[0]["text"]
    for i in (1, 2):  # other rows go on until they meet the stop string themselves
        j = full[i]["ids"].index(ids0[k]) + 1 if ids0[k] in full[i]["ids"] else 16
        assert out[i]["ids"] == full[i]["ids"][:j]


def test_stop_string_spanning_tokens(tmp_path):
    _, ours, tok = _tiny("gemma", tmp_path)
    ids = generate_from_ids(ours, tok, PROMPTS[:1], Sampling(max_new_tokens=16))[0]["ids"]
    stop = tok.decode(ids[4:6])[2:-1]  # the end of one word, the space, most of the next
    out = generate_from_ids(ours, tok, PROMPTS[:1], Sampling(max_new_tokens=16, stop=[stop]))[0]
    first = tok.decode(ids).index(stop)
    assert out["text"] == tok.decode(ids)[:first]
    assert len(out["ids"]) <= 6


def test_eos_stops_one_row_while_others_continue(tmp_path):
    _, ours, tok = _tiny("mistral", tmp_path)
    s = Sampling(max_new_tokens=16)
    free = generate_ids(ours, PROMPTS, s, eos_ids=set(), pad_id=0)
    others = set(free[1]) | set(free[2])
    k, eos = next((i, t) for i, t in enumerate(free[0]) if i >= 2 and t not in others)
    assert eos not in free[0][:k]
    out = generate_ids(ours, PROMPTS, s, eos_ids={eos}, pad_id=0)
    assert out[0] == free[0][: k + 1]  # ends with the EOS it made
    assert out[1:] == free[1:]  # the others made all 16 tokens, unchanged
    res = generate_from_ids(ours, _EosTokenizer(tok, eos), PROMPTS, s)
    assert [r["ids"] for r in res] == out
    assert [r["stopped"] for r in res] == [True, False, False]
    assert [r["new_tokens"] for r in res] == [k + 1, 16, 16]


class _EosTokenizer:
    """The word tokenizer with a chosen EOS (and no pad, so the pad falls back to EOS)."""

    def __init__(self, tok, eos):
        self.tok, self.eos_id, self.pad_id = tok, eos, None

    def decode(self, ids, skip_special_tokens=True):
        return self.tok.decode(ids)


def test_stopped_rows_report_no_padding(tmp_path):
    """A row stopped by a stop string while others go on must not count padding as tokens."""
    _, ours, tok = _tiny("qwen2", tmp_path)
    full = generate_from_ids(ours, tok, PROMPTS, Sampling(max_new_tokens=12))
    stop = tok.decode(full[1]["ids"][1:2])
    out = generate_from_ids(ours, tok, PROMPTS, Sampling(max_new_tokens=12, stop=[stop]))
    first = full[1]["ids"].index(full[1]["ids"][1])
    assert out[1]["ids"] == full[1]["ids"][: first + 1]
    assert out[1]["new_tokens"] == first + 1
    assert max(len(r["ids"]) for r in out) > first + 1  # another row went on: there was padding


def test_empty_prompt_is_an_error(tmp_path):
    _, ours, _ = _tiny("llama", tmp_path)
    with pytest.raises(ConfigError):
        generate_ids(ours, [[1, 2], []], Sampling(max_new_tokens=2), eos_ids=set(), pad_id=0)


# ---- the real SmolLM2, against transformers on the directory gguf_to_hf_dir made ----
