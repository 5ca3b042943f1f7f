"""Studies end to end on tiny models: the grid, run references, skip/resume/failure handling,
the results table, --quick, compare, and the demo data generator."""

import json
import os
import random

import pytest
import yaml
from tiny import make_models, review, write_reviews

from tunelab.cli import main
from tunelab.errors import ConfigError
from tunelab.study.study import Study, cells, load_recipe


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    saved = os.environ.get("TUNELAB_CACHE")
    os.environ["TUNELAB_CACHE"] = str(root / "cache")
    make_models(root)
    rng = random.Random(3)
    (root / "corpus.txt").write_text("\n\n".join(review(rng, i % 2) for i in range(60)))
    (root / "general.txt").write_text("\n\n".join(review(rng, i % 2) for i in range(20)))
    write_reviews(root / "train.jsonl", 40, 1)
    write_reviews(root / "test.jsonl", 12, 2)
    yield root
    if saved is None:
        os.environ.pop("TUNELAB_CACHE")
    else:
        os.environ["TUNELAB_CACHE"] = saved


def recipe(root) -> dict:
    data = {
        "path": str(root / "train.jsonl"),
        "val_path": str(root / "test.jsonl"),
        "text_field": "review",
    }
    return {
        "study": "tiny",
        "seeds": [0, 1],
        "defaults": {
            "train": {"batch_size": 4, "seq_len": 32, "max_steps": 2, "warmup_steps": 0, "lr": 1e-3}
        },
        "experiments": [
            {
                "name": "domain",
                "task": "pretrain",
                "seeds": [0],
                "models": [str(root / "decoder")],
                "methods": {"lora": {"name": "lora", "r": 2}, "full": {}},
                "config": {
                    "data": {"path": str(root / "corpus.txt")},
                    "eval": {
                        "domain": str(root / "corpus.txt"),
                        "general": str(root / "general.txt"),
                        "window": 16,
                        "stride": 8,
                    },
                },
            },
            {
                "name": "sentiment",
                "task": "classify",
                "config": {"data": data, "classify": {"label_field": "sentiment"}},
                "runs": [
                    {"name": "adapted", "model": "${run:domain/decoder-lora}", "method": "full"},
                    {"name": "broken", "model": str(root / "nothing-here"), "method": "full"},
                ],
            },
            {
                "name": "prompting",
                "task": "icl",
                "seeds": [0],
                "config": {
                    "data": data,
                    "classify": {"label_field": "sentiment"},
                    "icl": {"limit": 4},
                },
                "runs": [
                    {"name": "zero", "model": str(root / "decoder"), "method": {"shots": 0}},
                    {"name": "two", "model": str(root / "decoder"), "method": {"shots": 2}},
                ],
            },
        ],
        "quick": {"seeds": [0], "experiments": {"prompting": {"skip": True}}},
    }


def test_study_runs_the_grid_records_failures_and_skips_finished_runs(setup, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe(setup)))
    out = tmp_path / "study"
    results = Study(load_recipe(path), out).run(isolate=False)
    runs = {r["run"]: r for r in results["rows"]}
    assert sorted(runs) == [
        "domain/decoder-full-s0",
        "domain/decoder-lora-s0",
        "prompting/two-s0",
        "prompting/zero-s0",
        "sentiment/adapted-s0",
        "sentiment/adapted-s1",
        "sentiment/broken-s0",
        "sentiment/broken-s1",
    ]
    assert runs["sentiment/broken-s0"]["status"] == "failed"
    assert "nothing-here" in runs["sentiment/broken-s0"]["error"]
    lora = runs["domain/decoder-lora-s0"]
    assert lora["status"] == "done" and lora["metric"] == "ppl_in_domain"
    assert lora["ppl_in_domain_after"] > 0 and "forgetting" in lora
    assert lora["trainable_params"] < runs["domain/decoder-full-s0"]["trainable_params"]
    assert (
        runs["prompting/two-s0"]["metric"] == "accuracy" and runs["prompting/two-s0"]["value"] >= 0
    )
    adapted = [
        g
        for g in results["groups"]
        if g["method"] == "full"
        and g["experiment"] == "sentiment"
        and g["model"] == "domain/decoder-lora"
    ]
    assert adapted[0]["seeds"] == 2 and set(adapted[0]["value"]) == {"mean", "std", "min", "max"}
    assert (out / "results.csv").read_text().count("\n") == 9
    # A second run skips what finished, retries what failed, and resumes what was cut short.
    summary = out / "runs/sentiment/adapted-s1/summary.json"
    mtime = (out / "runs/domain/decoder-full-s0/summary.json").stat().st_mtime
    summary.unlink()
    again = Study(load_recipe(path), out).run(isolate=False)
    assert (out / "runs/domain/decoder-full-s0/summary.json").stat().st_mtime == mtime
    assert summary.exists()
    assert {r["run"]: r["status"] for r in again["rows"]}["sentiment/broken-s1"] == "failed"


def test_study_and_report_commands(setup, tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe(setup)))
    out = tmp_path / "quick"
    assert main(["study", str(path), "--out", str(out), "--quick", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert {r["experiment"] for r in results["rows"]} == {
        "domain",
        "sentiment",
    }  # quick: no prompting
    assert all(r["seed"] == 0 for r in results["rows"])
    assert (out / "report.html").exists() and (out / "report.md").exists()
    assert main(["report", str(out)]) == 0
    assert "report.html" in capsys.readouterr().out


def test_compare_puts_models_through_the_same_evaluations(setup, tmp_path, capsys):
    args = [
        "compare",
        "--models",
        f"{setup / 'decoder'},{setup / 'decoder'}",
        "--out",
        str(tmp_path / "cmp"),
        "--domain",
        str(setup / "corpus.txt"),
        "--general",
        str(setup / "general.txt"),
        "--data",
        str(setup / "train.jsonl"),
        "--text-field",
        "review",
        "--label-field",
        "sentiment",
        "--shots",
        "0",
        "--limit",
        "4",
        "--json",
    ]
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert {r["experiment"] for r in rows} == {"perplexity", "prompting"}
    assert all(r["status"] == "done" for r in rows)


def test_recipe_errors_name_the_key(setup, tmp_path):
    bad = recipe(setup)
    bad["experiments"][0]["modles"] = []
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="modles.*did you mean 'models'"):
        load_recipe(path)
    path.write_text("study: x\nexperiments: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML \("):
        load_recipe(path)
    ref = recipe(setup)
    ref["experiments"][1]["runs"][0]["model"] = "${run:domain/decoder-lroa}"
    with pytest.raises(ConfigError, match="names no earlier cell.*decoder-lora"):
        Study(ref, tmp_path / "x")


def test_shipped_recipes_expand_in_both_modes():
    for quick in (False, True):
        grid = cells(load_recipe("recipes/quickstart.yaml", quick=quick))
        Study(load_recipe("recipes/imdb.yaml", quick=quick), "/nonexistent")
        names = {c["run"] for c in grid}
        assert "sentiment/smollm2-domain-lora-s0" in names and "preference/lora-s0" in names
        runs = [c["run"] for c in grid]  # instruction following, before and after DPO
        base, dpo = runs.index("instructions/base-s0"), runs.index("instructions/after-dpo-s0")
        assert runs.index("preference/lora-s0") < base < dpo
        assert grid[dpo]["model"] == "${run:preference/lora}"
        assert grid[dpo]["config"]["instructions"]["limit"] == (8 if quick else 40)
        Study(load_recipe("recipes/quickstart.yaml", quick=quick), "/nonexistent")  # refs resolve
        sweep = cells(load_recipe("recipes/prompts.yaml", quick=quick))
        assert len(sweep) == (12 if quick else 42)  # 6 prompts; 0-shot once, k-shot per seed


def test_demo_data_is_deterministic_and_labelled(tmp_path):
    from tunelab.demo.generate import write_demo_data

    a, b = write_demo_data(tmp_path / "a"), write_demo_data(tmp_path / "b")
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes(), name
    rows = [json.loads(x) for x in a["reviews_train.jsonl"].read_text().splitlines()]
    share = sum(r["sentiment"] == "positive" for r in rows) / len(rows)
    assert len(rows) >= 200 and 0.35 < share < 0.65
    pairs = [json.loads(x) for x in a["preferences.jsonl"].read_text().splitlines()]
    assert all(p["chosen"] != p["rejected"] for p in pairs)


def test_model_names_in_tables_keep_run_references_and_shorten_paths():
    from tunelab.study.results import short_model

    assert short_model("domain/lora") == "domain/lora"  # a ${run:domain/lora} cell
    assert short_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert short_model("/data/studies/q/runs/domain/lora-s0/final") == "lora-s0"
    assert short_model("smollm2-135m-instruct") == "smollm2-135m-instruct"
