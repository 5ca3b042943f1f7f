"""The quickstart's IFEval-style prompts (demo/instructions.py): valid IFEval input, kwargs every
checker accepts, prompts that say what is checked, no contradictory pairs, seeded."""

import json
import random

import pytest

from tunelab.demo.instructions import (
    CLASHES,
    INSTRUCTIONS,
    REPEAT,
    REQUESTS,
    compose,
    instruction_prompts,
)
from tunelab.instructions.registry import CHECKERS, check_kwargs
from tunelab.instructions.score import read_prompts, score

# said in words ('fewer than', 'French'), or the request itself (tested below)
SAID_OTHERWISE = {"relation", "let_relation", "capital_relation", "language", "prompt_to_repeat"}


@pytest.fixture(scope="module")
def records():
    return instruction_prompts(200, seed=3)


def test_demo_file_passes_prompt_validation(tmp_path):
    from tunelab.demo.generate import write_demo_data

    path = write_demo_data(tmp_path)["instructions.jsonl"]
    written = [json.loads(line) for line in path.read_text().splitlines()]
    checked = read_prompts(path)
    assert len(checked) == len(written) >= 40  # the full quickstart's slice
    assert [r["kwargs"] for r in checked] == [r["kwargs"] for r in written]  # nothing dropped
    assert len({r["key"] for r in written}) == len(written)
    assert len({r["prompt"] for r in written}) == len(written)
    kinds = {i for r in written for i in r["instruction_id_list"]}
    assert kinds == set(INSTRUCTIONS) and len(kinds) >= 10
    assert len({r["instruction_id_list"][0] for r in written[:8]}) == 8  # the quick slice


def test_every_builder_gives_kwargs_its_checker_takes():
    assert set(INSTRUCTIONS) <= set(CHECKERS)
    rng = random.Random(0)
    for iid, (_, build) in INSTRUCTIONS.items():
        for request in REQUESTS:
            kwargs = {"prompt_to_repeat": request[0]} if build is None else build(rng, request)[0]
            assert check_kwargs(iid, kwargs) == kwargs, iid
            CHECKERS[iid]("A short answer.", **kwargs)  # runs on any text


def test_the_prompt_states_what_is_checked(records):
    for r in records:
        (request,) = [q for q, _, _ in REQUESTS if r["prompt"].startswith(q)]
        asked = r["prompt"][len(request) :]  # the instructions, without the request's own words
        for iid, kwargs in zip(r["instruction_id_list"], r["kwargs"]):
            for name, value in kwargs.items():
                if name in SAID_OTHERWISE:
                    continue
                for v in value if isinstance(value, list) else [value]:
                    assert str(v) in asked, (iid, name, v, r["prompt"])


def test_no_prompt_asks_twice_or_contradicts_itself(records):
    for r in records:
        ids = r["instruction_id_list"]
        assert 1 <= len(ids) <= 3
        groups = [INSTRUCTIONS[i][0] for i in ids]
        assert len(set(groups)) == len(groups), ids
        assert not any(frozenset((a, b)) in CLASHES for a in ids for b in ids), ids


def test_a_rare_letter_is_never_one_the_asked_for_words_need():
    rng, build = random.Random(0), INSTRUCTIONS["keywords:letter_frequency"][1]
    for request in REQUESTS:
        for _ in range(20):
            kwargs, _ = build(rng, request)
            if kwargs["let_relation"] == "less than":
                assert not any(kwargs["letter"] in w for w in request[1] + request[2]), request


def test_repeating_the_request_passes_and_the_meta_sentence_is_not_part_of_it(records):
    repeats = [r for r in records if "combination:repeat_prompt" in r["instruction_id_list"]]
    assert repeats
    for r in repeats:
        i = r["instruction_id_list"].index("combination:repeat_prompt")
        body = r["kwargs"][i]["prompt_to_repeat"]
        assert r["prompt"] == f"{body}\n{REPEAT}"
        single = {**r, "instruction_id_list": [r["instruction_id_list"][i]]}
        single["kwargs"] = [r["kwargs"][i]]
        assert score(single, f"{body}\nHere is my answer.")["strict"] == [True]
        assert score(single, f"Sure! {body}")["strict"] == [False]


def test_seeded():
    assert instruction_prompts(30, seed=1) == instruction_prompts(30, seed=1)
    assert instruction_prompts(30, seed=1) != instruction_prompts(30, seed=2)
    one = compose(random.Random(5), REQUESTS[0], "punctuation:no_comma", key=7)
    assert one["key"] == 7 and one["instruction_id_list"][0] == "punctuation:no_comma"
    assert one["prompt"].startswith(REQUESTS[0][0])
