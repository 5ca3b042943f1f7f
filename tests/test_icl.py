"""Prompting (issue 21): chat and plain prompts as built, calibration by hand, the predicted-label
distribution and intervals, the CLI's report of the prompt, and a prompt sweep as a study."""

import json
import math
import shutil

import pytest
import torch
import yaml
from tiny import icl_args

from tunelab.cli import main
from tunelab.errors import ConfigError
from tunelab.evaluate.classification import bootstrap_interval, metrics
from tunelab.evaluate.icl import (
    calibrate,
    label_log_probs,
    label_prior,
    score_texts,
    surface_forms,
    verbalizers,
)
from tunelab.evaluate.prompts import PromptSpec, resolve_prompt
from tunelab.study.study import Study, cells, load_recipe
from tunelab.tokenizer.tokenizer import Tokenizer

LABELS = ["negative", "positive"]


def test_chat_prompt_puts_demonstrations_in_prior_turns(icl_setup):
    tok = Tokenizer.from_dir(icl_setup / "tok")  # no template of its own: ChatML
    p = resolve_prompt(
        PromptSpec(format="chat", layout="turns"), tok, LABELS, "review", "sentiment"
    )
    ask = "Classify the sentiment of the review as negative or positive. Answer with one word."
    assert p.format == "chat" and p.instruction == ask and p.template == "Review: {text}"
    demos = [("dull plot", 0), ("great cast", 1)]
    turn = "<|im_start|>{}\n{}<|im_end|>\n"
    want = (
        turn.format("system", ask)
        + turn.format("user", "Review: dull plot")
        + turn.format("assistant", "negative")
        + turn.format("user", "Review: great cast")
        + turn.format("assistant", "positive")
        + turn.format("user", "Review: a film")
        + "<|im_start|>assistant\n"
    )
    assert p.render(demos, "a film") == want
    assert p.space() == ""  # the label word opens the assistant turn
    # generic field names: the instruction names the task by its polarity labels, or not at all
    assert resolve_prompt(PromptSpec(format="chat"), tok, LABELS).instruction.startswith(
        "Classify the sentiment of the text as negative or positive."
    )
    assert resolve_prompt(PromptSpec(format="chat"), tok, ["a", "b", "c"]).instruction == (
        "Classify the text as a, b or c. Answer with one word."
    )
    placed = resolve_prompt(
        PromptSpec(format="chat", template="{text}\n{instruction}", instruction="Good or bad?"),
        tok,
        LABELS,
    )
    assert "<|im_start|>user\nthe film\nGood or bad?<|im_end|>" in placed.render([], "the film")


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_default_prompt_for_a_chat_model_is_plain_text_in_every_command(
    icl_setup, tmp_path, capsys
):
    # the default measured on IMDB (docs/BENCHMARKS.md, Prompting): plain text with the
    # demonstrations listed before the example, calibrated at 0 shots only; the chat layouts
    # fell to 50-56% at 4 shots. evaluate icl, compare --eval icl and study icl cells share it.
    model = tmp_path / "chat-decoder"
    shutil.copytree(icl_setup / "decoder", model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    tok = Tokenizer.from_dir(model)
    assert tok.chat_template == CHATML
    p = resolve_prompt(None, tok, LABELS, "review", "sentiment")
    assert (p.format, p.instruction) == ("plain", "")
    assert p.render([("dull plot", 0), ("great cast", 1)], "a film") == (
        "Review: dull plot\nSentiment: negative\n\nReview: great cast\nSentiment: positive\n\n"
        "Review: a film\nSentiment:"
    )
    fields = ["--text-field", "review", "--label-field", "sentiment", "--shots", "0,2", "--json"]
    assert (
        main(
            [
                "evaluate",
                "icl",
                "--model",
                str(model),
                "--data",
                str(icl_setup / "test.jsonl"),
                "--demos",
                str(icl_setup / "train.jsonl"),
                *fields,
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    # 8 scored reviews: batch calibration at every shot count
    example = "Review: {text}\nSentiment:"
    got = {
        (k, result["prompt"]["example"], m["calibrated"], m["calibration"])
        for k, m in result["shots"].items()
    }
    assert got == {("0", example, True, "batch"), ("2", example, True, "batch")}
    # 4 (--limit 4, below MIN_BATCH): content-free inputs stand in, at 0 shots only
    want = {("0", example, True), ("2", example, False)}
    assert (
        main(
            [
                "compare",
                "--models",
                str(model),
                "--eval",
                "icl",
                "--out",
                str(tmp_path / "cmp"),
                "--data",
                str(icl_setup / "train.jsonl"),
                "--limit",
                "4",
                *fields,
            ]
        )
        == 0
    )
    capsys.readouterr()
    cells = [json.loads(f.read_text()) for f in (tmp_path / "cmp").rglob("summary.json")]
    assert {(str(c["shots"]), c["prompt"]["example"], c["calibrated"]) for c in cells} == want


def test_chat_templates_without_a_system_turn_get_the_instruction_in_each_user_turn(icl_setup):
    tok = Tokenizer.from_dir(icl_setup / "tok")
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    p = resolve_prompt(PromptSpec(format="chat"), tok, LABELS, "review", "sentiment")
    assert p.format == "chat" and not p.system
    assert p.render([("dull", 0)], "ok") == (
        f"[user] {p.instruction}\n\nReview: dull\n"
        f"[assistant] negative\n[user] {p.instruction}\n\nReview: ok\n[assistant] "
    )


def test_plain_prompt_is_derived_from_the_field_names(icl_setup):
    tok = Tokenizer.from_dir(icl_setup / "tok")
    p = resolve_prompt(None, tok, LABELS, "review", "sentiment")
    assert (p.format, p.instruction, p.template) == ("plain", "", "Review: {text}\nSentiment:")
    assert (
        p.render([("dull", 0)], "ok")
        == "Review: dull\nSentiment: negative\n\nReview: ok\nSentiment:"
    )
    # generic field names: polarity labels are a sentiment, other labels a label
    assert resolve_prompt(None, tok, LABELS).template == "Text: {text}\nSentiment:"
    assert resolve_prompt(None, tok, ["ham", "spam"]).template == "Text: {text}\nLabel:"
    spec = PromptSpec.from_dict(
        {"pre": "Film review: ", "post": "\nVerdict:", "label_words": "bad,good"}
    )
    p = resolve_prompt(spec, tok, LABELS)
    assert p.template == "Film review: {text}\nVerdict:" and p.words == ["bad", "good"]
    assert p.describe()["example"] == "Film review: {text}\nVerdict:"


@pytest.mark.parametrize(
    "spec",
    [
        PromptSpec(format="chat", layout="turns"),
        PromptSpec(format="chat", layout="inline"),
        PromptSpec(format="plain", template="Review: {text}\n\nIt was"),
    ],
)
def test_scores_with_shared_demonstrations_equal_a_whole_forward(icl_setup, spec):
    # the shared tokens are computed once; each input must score as if run whole, including
    # where text joined at the demonstrations' end would tokenize differently than as a whole
    from tunelab.model.checkpoint import load_model_dir

    model, tok = load_model_dir(icl_setup / "decoder")
    p = resolve_prompt(spec, tok, LABELS, "review", "sentiment")
    forms = [verbalizers(tok, f, p.space()) for f in surface_forms(p.words)]
    demos, texts = [("dull plot", 0), ("great cast", 1)], ["a film", "the worst", "fine"]
    cached = score_texts(model.eval(), tok, p, demos, texts, forms)
    for text, got in zip(texts, cached):
        ids = tok.encode(p.render(demos, text), add_special_tokens=p.format == "plain")
        whole = iter(label_log_probs(model, ids, [v for f in forms for v in f]))
        want = [float(torch.tensor([next(whole) for _ in f]).logsumexp(0)) for f in forms]
        assert got == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize(
    "spec, message",
    [
        (PromptSpec(label_words=["bad"]), "expected one per label"),
        (PromptSpec(label_words=["good", "Good"]), "different"),
        (PromptSpec(template="Review:"), "exactly once"),
        (PromptSpec(format="html"), "expected one of auto, chat, plain"),
    ],
)
def test_bad_prompts_are_one_line_errors(icl_setup, spec, message):
    with pytest.raises(ConfigError, match=message):
        resolve_prompt(spec, Tokenizer.from_dir(icl_setup / "tok"), LABELS)
    with pytest.raises(ConfigError, match="did you mean 'template'"):
        PromptSpec.from_dict({"templat": "{text}"})


def test_calibration_against_a_hand_computation():
    # content-free inputs give p = (0.8, 0.2) and (0.7, 0.3): the prior is their mean (0.75, 0.25)
    prior = label_prior([[math.log(0.8), math.log(0.2)], [math.log(0.7), math.log(0.3)]])
    assert prior == pytest.approx([0.75, 0.25])
    # p = (0.6, 0.4) divided by the prior: (0.8, 1.6), renormalised (1/3, 2/3): the label flips
    (q,) = calibrate([[math.log(0.6) + 5, math.log(0.4) + 5]], prior)  # scores need not sum to 1
    assert [math.exp(x) for x in q] == pytest.approx([1 / 3, 2 / 3])
    assert surface_forms(["positive", "Bad"]) == [["positive", "Positive"], ["Bad", "bad"]]


def test_metrics_report_the_predicted_distribution_and_an_interval():
    m = metrics([0, 0, 1, 1], [0, 0, 0, 0], LABELS)  # a one-label collapse
    assert m["accuracy"] == 0.5 and m["predicted"] == {"negative": 4, "positive": 0}
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)
    low, high = m["accuracy_interval"]
    assert 0 <= low < 0.5 < high <= 1
    assert bootstrap_interval([1] * 20) == [1.0, 1.0]
    wide, narrow = bootstrap_interval([1, 0] * 10), bootstrap_interval([1, 0] * 500)
    assert wide[1] - wide[0] > 2 * (narrow[1] - narrow[0])  # 20 examples say much less


def test_icl_cli_reports_the_prompt_and_both_calibrations(icl_setup, capsys):
    assert main([*icl_args(icl_setup), "--json"]) == 0
    batch = json.loads(capsys.readouterr().out)
    assert batch["calibration"] == "batch"  # the default: calibrated at every shot count
    assert all(m["calibrated"] and m["calibration"] == "batch" for m in batch["shots"].values())
    args = [*icl_args(icl_setup), "--format", "chat", "--calibration", "content-free", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompt"]["format"] == "chat" and "<|im_start|>" in result["prompt"]["example"]
    assert result["calibrate"] == "auto"  # content-free: at 0 shots, not after demonstrations
    assert result["shots"]["0"]["calibrated"] is True
    m = result["shots"]["2"]
    assert m["calibrated"] is False and sum(m["predicted"].values()) == m["examples"] == 8
    assert set(m["label_prior"]) == set(LABELS) and sum(m["label_prior"].values()) == pytest.approx(
        1
    )
    assert m["accuracy"] == m["without_calibration"]["accuracy"]
    assert main(args[:-1] + ["--no-calibrate", "--format", "plain"]) == 0
    text = capsys.readouterr().out
    assert "prompt (plain)" in text and "0-shot" in text and "95% CI" in text
    assert "calibrated," not in text.replace("uncalibrated,", "")  # off at every shot count


def test_prompt_sweep_runs_as_a_study(icl_setup, tmp_path, capsys):
    data = {
        "path": str(icl_setup / "train.jsonl"),
        "val_path": str(icl_setup / "test.jsonl"),
        "text_field": "review",
    }
    recipe = {
        "study": "sweep",
        "seeds": [0, 1],
        "experiments": [
            {
                "name": "prompts",
                "task": "icl",
                "models": [str(icl_setup / "decoder")],
                "shots": [0, 2],
                "prompts": {
                    "default": {},
                    "words": {
                        "format": "plain",
                        "pre": "Film: ",
                        "post": "\nIt was",
                        "label_words": ["bad", "good"],
                    },
                },
                "config": {
                    "data": data,
                    "classify": {"label_field": "sentiment"},
                    "icl": {"limit": 6},
                },
            }
        ],
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(recipe))
    grid = [(c["method_label"], c["seed"]) for c in cells(load_recipe(path))]
    assert grid == [
        ("default-0shot", 0),
        ("default-2shot", 0),
        ("default-2shot", 1),
        ("words-0shot", 0),
        ("words-2shot", 0),
        ("words-2shot", 1),
    ]  # 0-shot: one seed
    results = Study(load_recipe(path), tmp_path / "out").run(isolate=False)
    assert all(r["status"] == "done" for r in results["rows"]), results["rows"]
    group = next(g for g in results["groups"] if g["method"] == "words-2shot")
    assert group["seeds"] == 2 and group["prompt"] == "words" and group["prompt_format"] == "plain"
    assert group["value"]["min"] <= group["value"]["mean"] <= group["value"]["max"]
    assert 0 <= group["accuracy_low"]["mean"] <= group["accuracy_high"]["mean"] <= 1
    assert main(["report", str(tmp_path / "out")]) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Prompts" in report and "| words | plain | 2 | 2 |" in report and "95% CI" in report


def test_sweep_recipe_errors_name_the_problem(tmp_path):
    path = tmp_path / "bad.yaml"
    for experiment, message in [
        ({"name": "x", "task": "classify", "prompts": {"a": {}}}, "for task icl"),
        ({"name": "x", "task": "icl", "shots": [-1]}, "expected a list of counts"),
        ({"name": "x", "task": "icl", "prompts": {"../a": {}}}, "prompt name"),
    ]:
        path.write_text(yaml.safe_dump({"experiments": [experiment]}))
        with pytest.raises(ConfigError, match=message):
            cells(load_recipe(path))
