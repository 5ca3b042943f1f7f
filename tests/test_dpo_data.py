"""Preference data: pairs encoded and split, malformed files, HH-RLHF dialogues, the pairs
skipped (or refused by a strict run), and the shared preference sets."""

import json
import random
from pathlib import Path

import pytest
from tiny_prefs import BAD, GOOD, align_cfg, words  # noqa: I001 - tests/ is on sys.path

from tunelab.cli import main
from tunelab.data import load_records
from tunelab.errors import DataError
from tunelab.tokenizer.tokenizer import Tokenizer
from tunelab.train.align import AlignTask
from tunelab.train.config import load_config
from tunelab.train.pairs import encode_pairs, split_prompt
from tunelab.train.run import run_training

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "preferences"


# ---- data: pairs, splitting, errors -----------------------------------------------------------


def test_encoding_plain_chat_and_split(prefs):
    tok = Tokenizer.from_dir(prefs / "tok")
    cfg = load_config(None, {"train.seq_len": 64})
    recs = [
        {
            "prompt": "the film",
            "chosen": " hero.",
            "rejected": " storm.",
            "_source": "x",
            "_line": 1,
        },
        {
            "prompt": [{"role": "user", "content": "the film"}],
            "chosen": "hero.",
            "rejected": [{"role": "assistant", "content": "storm."}],
            "_source": "x",
            "_line": 2,
        },
        {"instruction": "the film", "input": "", "chosen": "a", "rejected": "a", "_line": 3},
        {"chosen": "the film: hero king", "rejected": "the film: storm", "_line": 4},
    ]
    plain, chat, split = encode_pairs(recs, tok, cfg)  # the identical pair (line 3) is dropped
    assert plain["prompt"] == tok.encode("the film", False)
    assert plain["chosen"][-1] == tok.eos_id and plain["rejected"][-1] == tok.eos_id
    assert tok.decode(plain["chosen"][:-1]) == " hero."
    assert tok.decode(chat["prompt"], False).endswith("<|im_start|>assistant\n")
    assert tok.decode(split["chosen"][:-1]) == " hero king"
    assert split_prompt("Q: a? A: yes I do", "Q: a? A: yes I don't") == (
        "Q: a? A: yes I",
        " do",
        " don't",
    )
    assert split_prompt([1, 2, 3], [1, 2, 4]) == ([1, 2], [3], [4])


@pytest.mark.parametrize(
    "line,what",
    [
        ('{"prompt": "a", "chosen": "b"}', "rejected"),
        ('{"prompt": "a", "chosen": 3, "rejected": "c"}', "chosen"),
        ('{"prompt": "a", "chosen": ["x"], "rejected": "c"}', "chosen"),
    ],
)
def test_malformed_pair_is_a_one_line_error(prefs, capsys, line, what):
    bad = prefs / "bad.jsonl"
    bad.write_text('{"prompt": "the", "chosen": " a", "rejected": " b"}\n' + line + "\n")
    args = [
        "align",
        "--model",
        str(prefs / "base"),
        "--data",
        str(bad),
        "--out",
        str(prefs / "bad-run"),
        "--max-steps",
        "1",
        "--train.device",
        "cpu",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.jsonl:2" in err and what in err and len(err.splitlines()) == 1
    with pytest.raises(DataError, match="bad.jsonl:2"):
        encode_pairs(load_records(bad), Tokenizer.from_dir(prefs / "tok"), load_config())


# ---- HH-RLHF dialogues and skipped pairs ------------------------------------------------------


def _hh(*turns: str) -> str:
    """An HH-RLHF transcript from alternating human/assistant turns."""
    return "".join(
        f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns)
    )


HH_ODD = [  # (record, why it is skipped or None)
    ({"chosen": _hh("the film?", "a hero.", "and then?", "the king ship."),
      "rejected": _hh("the film?", "a hero.", "and then?", "storm war night.")}, None),
    ({"chosen": _hh("thanks.", "You're welcome.  I'd be happy to help again."),
      "rejected": _hh("thanks.", "You're welcome.")}, None),  # rejected a strict prefix of chosen
    ({"chosen": _hh("the city?", "a river."), "rejected": _hh("the city?", "a river.")},
     "identical"),
    ({"chosen": _hh("the war?", "no.", "why?", "the storm."),
      "rejected": _hh("the war?", "yes.", "why?", "the night.")}, "prompt_mismatch"),
    ({"chosen": _hh("the love?", ""), "rejected": _hh("the love?", "a king.")}, "empty_response"),
    ({"prompt": "the", "chosen": " ", "rejected": " a"}, "empty_response"),
]  # fmt: skip


def _records(rows, source="hh.jsonl"):
    return [{**r, "_source": source, "_line": i} for i, r in enumerate(rows, 1)]


@pytest.mark.parametrize("template", [False, True])
def test_hh_dialogues_split_at_the_last_assistant_turn(prefs, template):
    from tunelab.tokenizer.chat import CHATML

    tok = Tokenizer.from_dir(prefs / "tok")
    tok.chat_template = CHATML if template else None
    skipped = {}
    recs = _records([r for r, _ in HH_ODD])
    multi, prefix = encode_pairs(recs, tok, load_config(None, {"train.seq_len": 256}), skipped)
    assert skipped == {
        "identical": ["hh.jsonl:3"],
        "prompt_mismatch": ["hh.jsonl:4"],
        "empty_response": ["hh.jsonl:5", "hh.jsonl:6"],
    }
    text = lambda ids: tok.decode(ids, False)  # noqa: E731
    if template:  # the turns as messages: user/assistant, the last assistant turn the response
        assert text(multi["prompt"]).count("<|im_start|>user\n") == 2
        assert text(multi["prompt"]).endswith(
            "a hero.<|im_end|>\n<|im_start|>user\nand then?<|im_end|>\n<|im_start|>assistant\n"
        )
        assert text(prefix["chosen"]).startswith("You're welcome.  I'd be happy")
        assert text(prefix["rejected"]).startswith("You're welcome.<|im_end|>")
    else:  # plain text as published: the prompt ends with the last "\n\nAssistant:"
        assert text(multi["prompt"]) == _hh("the film?", "a hero.", "and then?") + "\n\nAssistant:"
        assert text(multi["chosen"][:-1]) == " the king ship."
        assert text(prefix["chosen"][:-1]) == " You're welcome.  I'd be happy to help again."
        assert text(prefix["rejected"][:-1]) == " You're welcome."
        assert prefix["rejected"][-1] == tok.eos_id


def test_transcript_messages_join_turns_of_one_role():
    from tunelab.data.dialogue import is_transcript, split_transcript, transcript_messages

    text = "\n\nHuman: hi\n\nAssistant: hello\n\nAssistant: again\n\nHuman: ok\n\nAssistant: x"
    assert is_transcript(text) and not is_transcript("Human: hi") and not is_transcript("a")
    prompt, response = split_transcript(text)
    assert prompt.endswith("\n\nAssistant:") and response == " x"
    assert transcript_messages(prompt) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello\n\nagain"},
        {"role": "user", "content": "ok"},
    ]


def test_unusable_pairs_are_skipped_and_counted_or_stop_a_strict_run(prefs, caplog, capsys):
    rng = random.Random(1)
    rows = [r for r, _ in HH_ODD]
    for _ in range(20):
        q, a = words(rng, 3), words(rng, 2)
        rows.append({"chosen": _hh(q, a, "and?", GOOD), "rejected": _hh(q, a, "and?", BAD)})
    path = prefs / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    over = {"data.path": str(path), "train.max_steps": 1, "data.val_fraction": 0.25}
    with caplog.at_level("WARNING", logger="tunelab"):
        summary = run_training(align_cfg(prefs, prefs / "hh-run", **over), task=AlignTask())
    data = json.loads((prefs / "hh-run" / "summary.json").read_text())["data"]
    assert data == summary["data"]
    assert data["skipped_pairs"] == 4 and data["train_examples"] + data["val_examples"] == 22
    assert data["skipped_reasons"] == {"identical": 1, "prompt_mismatch": 1, "empty_response": 2}
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 1 and "4 of 26 pairs skipped" in lines[0]
    assert "first at hh.jsonl:3, hh.jsonl:4, hh.jsonl:5, hh.jsonl:6" in lines[0]
    args = [
        "align",
        "--model",
        str(prefs / "base"),
        "--data",
        str(path),
        "--out",
        str(prefs / "hh-strict"),
        "--max-steps",
        "1",
        "--train.device",
        "cpu",
        "--strict",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "hh.jsonl:3" in err and "same" in err and len(err.splitlines()) == 1
    cfg = load_config(None, {"align.strict": True})
    with pytest.raises(DataError, match="hh.jsonl:1: the dialogues differ"):
        encode_pairs(_records(rows[3:]), Tokenizer.from_dir(prefs / "tok"), cfg)
    with pytest.raises(DataError, match="no usable preference pair left: 1 of 1 pairs skipped"):
        encode_pairs(_records(rows[2:3]), Tokenizer.from_dir(prefs / "tok"), load_config())


@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data/preferences")
def test_shared_preference_files_encode(prefs):
    from tunelab.tokenizer.chat import CHATML

    tok = Tokenizer.from_dir(prefs / "tok")
    cfg = load_config(None, {"train.seq_len": 4096})
    rasbt = load_records(SHARED / "instruction-data-with-preference.json")
    assert len(encode_pairs(rasbt, tok, cfg)) == len(rasbt) - 6  # 6 have chosen == rejected
    hh = load_records(SHARED / "hh_rlhf_harmless_test_part_a.jsonl")
    for template in (None, CHATML):  # plain text as published; messages through a template
        tok.chat_template, skipped = template, {}
        pairs = encode_pairs(hh, tok, cfg, skipped)
        # PROVENANCE_hh_rlhf.md: 4 rows end on an empty Assistant turn, 4 differ earlier on
        assert {k: len(v) for k, v in skipped.items()} == {
            "empty_response": 4,
            "prompt_mismatch": 4,
        }
        assert len(pairs) == len(hh) - 8 == 1804
        tail = "<|im_start|>assistant\n" if template else "\n\nAssistant:"
        assert all(tok.decode(p["prompt"], False).endswith(tail) for p in pairs)
