"""Classification end to end: a tiny decoder and encoder learn a separable task, metrics,
prompt modifiers, one-line data errors, prompting (verbalizer scoring) by hand."""

import json
import os

import pytest
import torch
from tiny import make_models, write_reviews

from tunelab.cli import main
from tunelab.evaluate.classification import metrics
from tunelab.evaluate.icl import demonstrations, label_log_probs, verbalizers
from tunelab.model.checkpoint import load_model_dir
from tunelab.tokenizer.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    saved = os.environ.get("TUNELAB_CACHE")
    os.environ["TUNELAB_CACHE"] = str(root / "cache")
    make_models(root)
    write_reviews(root / "train.jsonl", 160, 1)
    write_reviews(root / "test.jsonl", 40, 2)
    yield root
    if saved is None:
        os.environ.pop("TUNELAB_CACHE")
    else:
        os.environ["TUNELAB_CACHE"] = saved


def classify(setup, model, out, *extra):
    return [
        "classify",
        "--model",
        str(setup / model),
        "--data",
        str(setup / "train.jsonl"),
        "--val-data",
        str(setup / "test.jsonl"),
        "--text-field",
        "review",
        "--label-field",
        "sentiment",
        "--out",
        str(out),
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--seq-len",
        "32",
        "--train.warmup_steps",
        "0",
        "--json",
        *extra,
    ]


@pytest.mark.parametrize("model", ["decoder", "encoder"])
def test_tiny_models_learn_a_separable_task(setup, capsys, model):
    out = setup / f"run-{model}"
    assert main(classify(setup, model, out, "--epochs", "6")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["accuracy"] == 1.0 and summary["macro_f1"] == 1.0
    assert summary["labels"] == ["negative", "positive"]
    assert summary["confusion"] == [[20, 0], [0, 20]]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_accuracy"] == 1.0 and "accuracy" in rows[0]
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 40 and set(preds[0]) == {
        "id",
        "text",
        "gold",
        "predicted",
        "probabilities",
    }
    clf, _ = load_model_dir(out / "final")  # the saved classifier keeps its label names
    assert clf.cfg.labels == ["negative", "positive"]
    assert (
        main(
            [
                "evaluate",
                "classification",
                "--model",
                str(out / "final"),
                "--data",
                str(setup / "test.jsonl"),
                "--text-field",
                "review",
                "--label-field",
                "sentiment",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["accuracy"] == 1.0


def test_lora_classifier_trains_its_head_and_saves_a_peft_adapter(setup, capsys):
    out = setup / "run-lora"
    args = classify(
        setup,
        "decoder",
        out,
        "--max-steps",
        "40",
        "--method",
        "lora",
        "--method.targets",
        "all-linear",
        "--method.r",
        "4",
        "--lr",
        "1e-2",
    )
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["accuracy"] > 0.9
    assert summary["trainable_params"] < summary["total_params"] / 5
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from tunelab.model.checkpoint import export_hf

    base, tok = load_model_dir(setup / "decoder")
    export_hf(base, tok, setup / "decoder-hf")
    hf = transformers.LlamaForSequenceClassification.from_pretrained(
        setup / "decoder-hf", num_labels=2
    )
    hf = peft.PeftModel.from_pretrained(hf, out / "adapter").eval()
    ours, _ = load_model_dir(out / "final")
    ids = torch.tensor([tok.encode("the film was superb and moving")])
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - ours(ids)).abs().max() < 1e-4


def test_template_wraps_the_text_and_survives_truncation(setup):
    from tunelab.data.templates import encode_classification

    tok = Tokenizer.from_dir(setup / "tok")
    records = [{"text": "great " * 50, "label": "positive", "_source": "x", "_line": 1}]
    (ex,) = encode_classification(
        records, tok, ["negative", "positive"], template="Review: {text} Sentiment:", seq_len=20
    )
    assert len(ex["input_ids"]) <= 20 and ex["label"] == 1
    assert tok.decode(ex["input_ids"]).endswith("Sentiment:")
    assert tok.decode(ex["input_ids"]).startswith("Review:")


def test_label_and_column_errors_are_one_line(setup, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"review": "fine", "sentiment": "positive"}\n{"review": "x", "sentiment": "postive"}\n'
    )
    args = classify(setup, "decoder", tmp_path / "r", "--labels", "negative,positive")
    args[args.index("--val-data") + 1] = str(bad)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.jsonl:2" in err and "'postive'" in err
    assert "did you mean 'positive'" in err
    args = classify(setup, "decoder", tmp_path / "r2", "--label-field", "stars")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "train.jsonl:1" in err and "'stars'" in err and len(err.splitlines()) == 1


def test_metrics_by_hand():
    m = metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["a"]["recall"] == pytest.approx(1 / 2)
    f1 = [0.5, 2 * (2 / 3) / (2 / 3 + 1), 0.0]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)


def test_verbalizer_scores_equal_a_hand_computation(setup):
    model, tok = load_model_dir(setup / "decoder")
    labels = ["great movie", "awful"]  # one multi-token label
    verbs = verbalizers(tok, labels)
    assert len(verbs[0]) > 1
    prompt = tok.encode("the film plot\nLabel:")
    scores = label_log_probs(model, prompt, verbs)
    for verb, score in zip(verbs, scores):
        ids = torch.tensor([prompt + verb])
        with torch.no_grad():
            logp = model(ids)[0].log_softmax(-1)
        hand = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(verb))
        assert score == pytest.approx(hand, abs=1e-4)


def test_cached_demonstrations_score_like_the_whole_prompt(setup):
    from tunelab.evaluate.icl import prefix_cache

    model, tok = load_model_dir(setup / "decoder")
    verbs = verbalizers(tok, ["great movie", "awful"])
    demo, example = tok.encode("the plot\nLabel: awful\n\n"), tok.encode("the actor\nLabel:")
    cache = prefix_cache(model, demo, room=32)
    for _ in range(2):  # the cache is reused: the second example must not see the first
        cached = label_log_probs(model, example, verbs, cache)
        assert cached == pytest.approx(label_log_probs(model, demo + example, verbs), abs=1e-4)


def test_demonstrations_are_balanced_and_seeded():
    gold = [0] * 10 + [1] * 3
    picked = demonstrations(list(range(13)), gold, 4, seed=3)
    assert sorted(gold[i] for i in picked) == [0, 0, 1, 1]
    assert picked == demonstrations(list(range(13)), gold, 4, seed=3)
    assert picked != demonstrations(list(range(13)), gold, 4, seed=4)
    # alternating: the same reviews, labels taking turns from label seed % 2
    for seed in (3, 4):
        turns = demonstrations(list(range(13)), gold, 4, seed, order="alternate")
        assert sorted(turns) == sorted(demonstrations(list(range(13)), gold, 4, seed))
        assert [gold[i] for i in turns] == [[0, 1, 0, 1], [1, 0, 1, 0]][seed % 2]


def test_icl_cli_reports_each_shot_count(setup, capsys):
    assert (
        main(
            [
                "evaluate",
                "icl",
                "--model",
                str(setup / "decoder"),
                "--data",
                str(setup / "test.jsonl"),
                "--text-field",
                "review",
                "--label-field",
                "sentiment",
                "--shots",
                "0,2",
                "--limit",
                "6",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert set(result["shots"]) == {"0", "2"}
    assert result["shots"]["2"]["examples"] == 6 and 0 <= result["shots"]["0"]["accuracy"] <= 1


def test_k_fold_reports_mean_and_std(setup, capsys):
    out = setup / "cv"
    assert main(classify(setup, "decoder", out, "--max-steps", "3", "--folds", "3")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["folds"] == 3 and len(summary["accuracy_values"]) == 3
    assert summary["accuracy_std"] >= 0 and (out / "fold-2" / "summary.json").exists()
