"""`tunelab evaluate instructions` on a tiny random model: batched generation, scoring,
responses.jsonl, --responses, one-line errors; the same check in training runs and studies."""

import json
import os
import random
import shutil

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
    args = [
        "evaluate",
        "instructions",
        "--model",
        str(setup / "decoder"),
        "--data",
        str(setup / "prompts.jsonl"),
        "--max-new-tokens",
        "8",
        "--batch-size",
        "2",
        "--out",
        str(out),
        "--json",
    ]
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
    again = [
        "evaluate",
        "instructions",
        "--data",
        str(setup / "prompts.jsonl"),
        "--responses",
        str(out / "responses.jsonl"),
        "--json",
    ]
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


def _corpus(root):
    from tiny import review

    rng = random.Random(1)
    path = root / "corpus.txt"
    if not path.exists():
        path.write_text("\n\n".join(review(rng, i % 2) for i in range(40)))
    return path


def test_training_records_instructions_before_and_after(setup, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "pretrain",
        "--model",
        str(setup / "decoder"),
        "--data",
        str(_corpus(setup)),
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--out",
        str(out),
        "--eval-instructions",
        str(setup / "prompts.jsonl"),
        "--eval.instructions_limit",
        "2",
        "--eval.instructions_max_new_tokens",
        "4",
        "--json",
    ]
    assert main(args) == 0
    ins = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["instructions"]
    for m in ("prompt_strict", "instruction_strict", "prompt_loose", "instruction_loose", "n"):
        assert set(ins[m]) == {"before", "after"}
    assert ins["n"] == {"before": 2, "after": 2}
    assert len(ins["per_prompt"]["before"]) == len(ins["per_prompt"]["after"]) == 2


def test_bad_instruction_file_stops_a_run_before_training(setup, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**PROMPTS[0], "instruction_id_list": ["nope:nothing"]}) + "\n")
    args = [
        "pretrain",
        "--model",
        str(setup / "decoder"),
        "--data",
        str(_corpus(setup)),
        "--max-steps",
        "1",
        "--out",
        str(tmp_path / "run"),
        "--eval-instructions",
        str(bad),
    ]
    assert main(args) == 2
    assert f"{bad}:1: field 'instruction_id_list[0]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_compare_reports_the_paired_difference(setup, tmp_path, capsys):
    twin = setup / "decoder2"
    if not twin.exists():
        shutil.copytree(setup / "decoder", twin)
    args = [
        "compare",
        "--models",
        f"{setup / 'decoder'},{twin}",
        "--eval",
        "instructions",
        "--instructions",
        str(setup / "prompts.jsonl"),
        "--max-new-tokens",
        "4",
        "--out",
        str(tmp_path / "cmp"),
        "--json",
    ]
    assert main(args) == 0
    results = json.loads(capsys.readouterr().out)
    assert all(r["status"] == "done" for r in results["rows"])
    (pair,) = results["paired"]
    assert pair["against"].endswith("decoder-greedy-s0")
    assert pair["prompt_strict"]["difference"] == 0  # the same weights, greedy
    assert pair["prompt_strict"]["interval"] == [0.0, 0.0]
    assert (
        tmp_path / "cmp" / "runs" / "instructions" / "decoder2-greedy-s0" / "responses.jsonl"
    ).exists()
    assert main(args[:-1]) == 0  # text output; the finished runs are skipped
    text = capsys.readouterr().out
    assert "difference +0.000 [+0.000, +0.000]" in text


def test_study_instructions_cells_and_report_section(setup, tmp_path):
    from tunelab.study.report import write_report
    from tunelab.study.study import Study

    recipe = {
        "study": "ifeval",
        "seeds": [0],
        "experiments": [
            {
                "name": "decoding",
                "task": "instructions",
                "models": [str(setup / "decoder")],
                "methods": {"greedy": {}, "t1": {"temperature": 1.0, "top_p": 0.9}},
                "config": {
                    "instructions": {"data": str(setup / "prompts.jsonl"), "max_new_tokens": 4}
                },
            },
            {
                "name": "tune",
                "task": "pretrain",
                "models": [str(setup / "decoder")],
                "config": {
                    "data": {"path": str(_corpus(setup))},
                    "train": {"max_steps": 1, "batch_size": 2, "seq_len": 32},
                    "eval": {
                        "instructions": str(setup / "prompts.jsonl"),
                        "instructions_limit": 3,
                        "instructions_max_new_tokens": 4,
                    },
                },
            },
        ],
    }
    results = Study(recipe, tmp_path / "s").run(isolate=False)
    assert [r["status"] for r in results["rows"]] == ["done"] * 3, results["rows"]
    greedy = results["rows"][0]
    assert greedy["metric"] == "prompt_strict" and 0 <= greedy["value"] <= 1
    assert "prompt_strict_before" in results["rows"][2]
    _, md = write_report(tmp_path / "s")
    text = md.read_text()
    assert "## Instruction following" in text and "Δ prompt strict" in text
    assert "before training" in text and "decoding/decoder-greedy-s0" in text
    assert "instructions, prompt strict" in text  # the before/after table


def test_shipped_instructions_recipe_expands():
    from tunelab.study.study import Study, load_recipe

    for quick in (False, True):
        study = Study(load_recipe("recipes/instructions.yaml", quick=quick), "/nonexistent")
        assert {c["task"] for c in study.cells} == {"instructions"}
        assert "decoding/smollm2-135m-instruct-greedy-s0" in {c["run"] for c in study.cells}


def test_alignment_records_instructions_before_and_after(setup, tmp_path, capsys):
    from tiny import review

    rng = random.Random(2)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(
        "".join(
            json.dumps({"prompt": review(rng, 1), "chosen": "great", "rejected": "awful"}) + "\n"
            for _ in range(8)
        )
    )
    args = [
        "align",
        "--model",
        str(setup / "decoder"),
        "--data",
        str(prefs),
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--out",
        str(tmp_path / "dpo"),
        "--eval-instructions",
        str(setup / "prompts.jsonl"),
        "--eval.instructions_max_new_tokens",
        "4",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "instructions prompt_strict:" in text and "->" in text
    summary = json.loads((tmp_path / "dpo" / "summary.json").read_text())
    assert set(summary["instructions"]["instruction_loose"]) == {"before", "after"}
