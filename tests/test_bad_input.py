"""The bad-input corpus: each row is a command that must fail with one line naming the problem,
before any work, writing nothing and removing nothing. A new case is one row."""

import json
import os
import random

import pytest
from tiny import make_models, review, write_reviews

from tunelab.cli import main

TRAIN = "pretrain --model {model} --data {corpus} --out {out} --seq-len 32 --max-steps 2"
CLASSIFY = "classify --model {model} --data {reviews} --out {out} --text-field review --label-field sentiment --max-steps 2"
FINETUNE = "finetune --model {model} --out {out} --seq-len 64 --max-steps 2 --data"
ICL = "evaluate icl --model {model} --data {reviews} --text-field review --label-field sentiment"

# (argv, exit code, a substring of the one-line error)
CASES = [
    (f"{TRAIN} --lr -1", 2, "--lr -1.0: must be greater than 0"),
    (f"{TRAIN} --lr 0", 2, "--lr 0.0: must be greater than 0"),
    (f"{TRAIN} --max-steps 0", 2, "--max-steps 0: must be at least 1"),
    (f"{TRAIN} --max-steps -3", 2, "--max-steps -3"),
    (f"{TRAIN} --seq-len 0", 2, "--seq-len 0"),
    (f"{TRAIN} --seq-len 100000", 2, "--seq-len 100000: beyond the model's context of 128"),
    (f"{TRAIN} --precision fp64", 2, "--precision 'fp64': expected one of fp32, bf16, fp16"),
    (f"{TRAIN} --batch-size 0", 2, "--batch-size 0"),
    (f"{TRAIN} --train.learning_rate 1", 2, "did you mean 'lr'"),
    (f"{TRAIN} --max-stesp 5", 2, "did you mean '--max-steps'"),
    (f"{TRAIN} --data {{missing}}", 2, "missing.txt"),
    (f"{TRAIN} --model {{missing}}", 2, "missing.txt"),
    (TRAIN.replace("{out}", "{file}"), 2, "is a file"),
    (TRAIN.replace("{out}", "{file}/run"), 2, "cannot write"),
    (TRAIN.replace("{out}", "{user}"), 2, "holds files that are not a tunelab run"),
    (f"{CLASSIFY} --folds 1", 2, "--folds 1"),
    (CLASSIFY.replace("{reviews}", "{oneclass}"), 2, "at least two classes"),
    (f"{FINETUNE} {{empty}}", 2, "every 'output' is empty"),
    (f"{ICL} --shots abc", 2, "argument --shots: 'abc' is not an integer"),
    (f"{ICL} --shots -1", 2, "argument --shots: -1: must be at least 0"),
    (f"{ICL} --label-words bad", 2, "label words ['bad']: expected one per label"),
    (f"{ICL} --template Review:", 2, "template 'Review:': must hold {text} exactly once"),
    (f"{ICL} --format html", 2, "argument --format: invalid choice: 'html'"),
    ("evaluate perplexity --model {model} --data {corpus} --window 0", 2, "--window: 0"),
    (
        "evaluate classification --model {model} --data {reviews} --text-field review "
        "--label-field sentiment --predictions {file}/p.jsonl",
        2,
        "--predictions",
    ),
    ("estimate --model {model} --seq-len 0", 2, "--seq-len 0: must be at least 1"),
    ("estimate --model {model} --batch -4", 2, "--batch: -4: must be at least 1"),
    ("export --model {model} --out {user}", 2, "not a model"),
    ("export --model {model} --out {user} --force", 2, "not a model"),
    ("export --model {model} --out {file}", 2, "is a file"),
    ("export --model {model} --out {model}", 2, "--force"),
    ("merge --model {model} --adapter {user} --out {user}", 2, "not a model"),
    ("study {badrecipe} --out {out}", 2, "experiment name '../escape'"),
    (
        "evaluate counting --model {model} --prompts {unicorn} --out {out}",
        2,
        "object 'unicorn': the ssd-mobilenet counter does not know it",
    ),
    (
        "evaluate counting --model {model} --prompts {nonumber} --out {out}",
        2,
        "variant 'plain' ('a photo of {object}') holds no {number}",
    ),
    ("evaluate counting --model {missing} --out {out}", 2, "missing.txt: no such model folder"),
    ("evaluate counting --images {user} --counter components --out {out}", 2, "no manifest.jsonl"),
    ("evaluate counting --model {model} --counter yolo --out {out}", 2, "--counter 'yolo'"),
    ("image generate --model {missing} --prompt x --out {out}", 2, "no such model folder"),
    ("image generate --model {user} --prompt x --out {out}", 2, "not an image model"),
    ("study {recipe} --out {file}", 2, "is a file; give a folder for the study"),
    ("study {recipe} --out {file}/s", 2, "(a file, not a folder)"),
    ("compare --models {model} --eval perplexity --out {file}/s", 2, "(a file, not a folder)"),
    (
        "tokenizer train --data {corpus} --out {file}",
        2,
        "is a file; give a folder for the tokenizer",
    ),
    ("tokenizer train --data {corpus} --out {file}/tok", 2, "cannot write in"),
    (
        "generate --model {model} --max-new-tokens 1 --prompt " + "the-film-" * 60,
        2,
        "prompt is 240 tokens, longer than the model's context of 128",
    ),
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    saved = os.environ.get("TUNELAB_CACHE")
    os.environ["TUNELAB_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    make_models(root)
    rng = random.Random(0)
    (root / "corpus.txt").write_text("\n\n".join(review(rng, i % 2) for i in range(40)))
    write_reviews(root / "reviews.jsonl", 20, 1)
    with open(root / "oneclass.jsonl", "w") as f:
        for _ in range(20):
            f.write(json.dumps({"review": review(rng, 1), "sentiment": "positive"}) + "\n")
    with open(root / "empty.jsonl", "w") as f:
        for i in range(10):
            f.write(json.dumps({"instruction": f"say {i}", "output": " "}) + "\n")
    (root / "unicorn.yaml").write_text(json.dumps({"classes": ["unicorn"], "numbers": [2]}))
    (root / "nonumber.yaml").write_text(json.dumps({"variants": {"plain": "a photo of {object}"}}))
    (root / "user").mkdir()
    (root / "user" / "thesis.txt").write_text("years of work")
    (root / "a-file").write_text("keep me")
    recipe = {"experiments": [{"name": "../escape", "task": "perplexity", "models": ["x"]}]}
    (root / "bad.yaml").write_text(json.dumps(recipe))
    ppl = {"name": "ppl", "task": "perplexity", "models": [str(root / "decoder")]}
    (root / "good.yaml").write_text(json.dumps({"experiments": [ppl]}))
    yield {
        "model": root / "decoder",
        "corpus": root / "corpus.txt",
        "out": root / "new-out",
        "reviews": root / "reviews.jsonl",
        "oneclass": root / "oneclass.jsonl",
        "empty": root / "empty.jsonl",
        "user": root / "user",
        "file": root / "a-file",
        "missing": root / "missing.txt",
        "badrecipe": root / "bad.yaml",
        "recipe": root / "good.yaml",
        "root": root,
        "unicorn": root / "unicorn.yaml",
        "nonumber": root / "nonumber.yaml",
    }
    if saved is None:
        os.environ.pop("TUNELAB_CACHE")
    else:
        os.environ["TUNELAB_CACHE"] = saved


def snapshot(root) -> dict:
    return {
        str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*") if p.is_file()
    }


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse errors exit from inside the parser
        return e.code


@pytest.mark.parametrize("argv, code, message", CASES, ids=[c[2] for c in CASES])
def test_bad_input_fails_first_in_one_line(paths, capsys, argv, code, message):
    before = snapshot(paths["root"])
    assert run(argv.format(**paths).split()) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err, err
    assert "error" in err and "Traceback" not in err
    assert snapshot(paths["root"]) == before  # nothing written, nothing removed
    assert not paths["out"].exists()


def test_a_study_whose_runs_all_failed_exits_non_zero(paths, tmp_path, capsys):
    recipe = {
        "experiments": [{"name": "ppl", "task": "perplexity", "models": [str(paths["missing"])]}]
    }
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    assert run(["study", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "s"), "--json"]) == 2
    assert "every run of the study failed (1)" in capsys.readouterr().err
