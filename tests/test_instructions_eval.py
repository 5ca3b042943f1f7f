"""`tunelab evaluate instructions` on a tiny random model: batched generation, scoring,
responses.jsonl, --responses, one-line errors; the same check in training runs and studies."""

import json
import os

import pytest
from tiny import make_models

from tunelab.cli import main

PROMPTS = [
    {"key": 1, "prompt": "Write about the film without commas.",
     "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {"key": 2, "prompt": "Describe a scene in at least 3 words, in lowercase.",
     "instruction_id_list": ["length_constraints:number_words", "change_case:english_lowercase"],
     "kwargs": [{"num_words": 3, "relation": "at least"}, {}]},
    {"key": 3, "prompt": "Tell a story.", "instruction_id_list": ["startend:quotation"],
     "kwargs": [{}]},
]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("instructions")
    saved = os.environ.get("TUNELAB_CACHE")
    os.environ["TUNELAB_CACHE"] = str(root / "cache")
    make_models(root)
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    yield root
    if saved is None:
        os.environ.pop("TUNELAB_CACHE")
    else:
        os.environ["TUNELAB_CACHE"] = saved


def test_generates_scores_and_writes_responses(setup, tmp_path, capsys):
    out = tmp_path / "ev"
    args = ["evaluate", "instructions", "--model", str(setup / "decoder"), "--data",
            str(setup / "prompts.jsonl"), "--max-new-tokens", "8", "--batch-size", "2",
            "--out", str(out), "--json"]  # fmt: skip
    assert main(args) == 0
    r = json.loads(capsys.readouterr().out)
    for m in ("prompt_strict", "instruction_strict", "prompt_loose", "instruction_loose"):
        assert 0 <= r["intervals"][m][0] <= r[m] <= r["intervals"][m][1] <= 1
    assert r["n"] == 3 and r["instructions"] == 4 and "per_prompt" not in r
    assert set(r["by_instruction"]) == {i for p in PROMPTS for i in p["instruction_id_list"]}
    assert r["generation"]["new_tokens"] > 0 and r["generation"]["tokens_per_s"] > 0
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in rows] == [p["prompt"] for p in PROMPTS]  # prompt order
    assert [len(row["instructions"]) for row in rows] == [1, 2, 1]
    assert {"id", "kwargs", "strict", "loose"} <= set(rows[1]["instructions"][0])
    # greedy in batches of 2 (left-padded) answers as one prompt at a time does
    args[args.index("--batch-size") + 1] = "1"
    assert main(args[:-3] + ["--json"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert alone["prompt_strict"] == r["prompt_strict"]
    # the written responses score the same without the model
    again = ["evaluate", "instructions", "--data", str(setup / "prompts.jsonl"), "--responses",
             str(out / "responses.jsonl"), "--json"]  # fmt: skip
    assert main(again) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["by_instruction"] == r["by_instruction"]


def test_bad_prompt_file_is_one_line_error(setup, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PROMPTS[0]) + "\n" + json.dumps({"key": 9, "text": "x"}) + "\n")
    args = ["evaluate", "instructions", "--model", str(setup / "decoder"), "--data", str(bad)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {bad}:2: field 'prompt': missing or not a non-empty string"
