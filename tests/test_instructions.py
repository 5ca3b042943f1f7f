"""The instruction checkers against the reference implementation, and their scoring.

CORPUS: hand-written responses for each of the 25 IFEval instruction types, each with the
verdicts (strict, loose) that the reference gives: lm-eval 0.4.13's ifeval task
(lm_eval/tasks/ifeval, the google-research checkers), run offline with NLTK 3.10 and the punkt_tab
English model, langdetect seeded 0. bench/ifeval_reference.py recomputes them, and compares
whole response files, where the reference is installed.
"""

import json
from pathlib import Path

import pytest

from tunelab.errors import DataError
from tunelab.instructions import CHECKERS, check_kwargs
from tunelab.instructions.score import (
    paired_difference,
    read_prompts,
    read_responses,
    score,
    summarize,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "instruction_following"
IFEVAL = SHARED / "ifeval_input_data.jsonl"

# (instruction id, kwargs, response, strict verdict, loose verdict) from the reference
# fmt: off
CORPUS = [
    ('change_case:capital_word_frequency', {"capital_frequency": 3, "capital_relation": "at least"}, 'I LOVE the NASA program and the U.S. space effort.', True, True),
    ('change_case:capital_word_frequency', {"capital_frequency": 3, "capital_relation": "at least"}, 'I love the Nasa program.', False, False),
    ('change_case:capital_word_frequency', {"capital_frequency": 2, "capital_relation": "less than"}, "I DON'T know.", False, False),
    ('change_case:capital_word_frequency', {"capital_frequency": 2, "capital_relation": "less than"}, 'It is WELL-KNOWN that it works.', True, True),
    ('change_case:english_capital', {}, 'THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG. IT WAS A SUNNY DAY AND EVERYONE WAS HAPPY TO BE OUTSIDE IN THE PARK.', True, True),
    ('change_case:english_capital', {}, 'The quick brown fox jumps over the lazy dog. It was a sunny day and everyone was happy to be outside in the park.', False, False),
    ('change_case:english_capital', {}, 'HERE IS MY ANSWER\nTHE QUICK BROWN FOX JUMPS OVER THE LAZY *DOG*. IT WAS A SUNNY DAY AND EVERYONE WAS HAPPY TO BE OUTSIDE IN THE PARK.', True, True),
    ('change_case:english_capital', {}, "C'EST UNE BELLE JOURNÉE ET TOUT LE MONDE EST HEUREUX D'ÊTRE DEHORS DANS LE PARC AVEC LES ENFANTS.", True, True),
    ('change_case:english_lowercase', {}, 'the quick brown fox jumps over the lazy dog. it was a sunny day and everyone was happy to be outside in the park.', True, True),
    ('change_case:english_lowercase', {}, 'The quick brown fox jumps over the lazy dog. It was a sunny day and everyone was happy to be outside in the park.', False, False),
    ('change_case:english_lowercase', {}, 'Sure:\nthe quick brown fox jumps over the lazy dog. it was a sunny day and everyone was happy to be outside in the park.', False, True),
    ('change_case:english_lowercase', {}, '12345 67890', False, False),
    ('combination:repeat_prompt', {"prompt_to_repeat": "Write a poem about cats."}, 'write a poem about cats. Cats are soft and warm.', True, True),
    ('combination:repeat_prompt', {"prompt_to_repeat": "Write a poem about cats."}, 'Here is a poem about cats: cats are soft.', False, False),
    ('combination:repeat_prompt', {"prompt_to_repeat": "Write a poem about cats."}, 'Sure!\nWrite a poem about cats.\nCats are soft.', False, True),
    ('combination:two_responses', {}, 'First answer here.\n******\nSecond answer here.', True, True),
    ('combination:two_responses', {}, 'Same answer.\n******\nSame answer.', False, False),
    ('combination:two_responses', {}, 'One.\n******\n\n******\nTwo.', False, False),
    ('combination:two_responses', {}, 'Only one response.', False, False),
    ('detectable_content:number_placeholders', {"num_placeholders": 2}, 'Dear [name], your order ships to [address].', True, True),
    ('detectable_content:number_placeholders', {"num_placeholders": 2}, 'Dear [name], thanks.', False, False),
    ('detectable_content:postscript', {"postscript_marker": "P.S."}, 'Hello there.\n\nP.S. See you soon.', True, True),
    ('detectable_content:postscript', {"postscript_marker": "P.S."}, 'Hello there. See you soon.', False, False),
    ('detectable_content:postscript', {"postscript_marker": "P.P.S"}, 'Hello.\nP.P.S. One more thing.', True, True),
    ('detectable_content:postscript', {"postscript_marker": "P.P.S"}, 'Hello.\nP.S. One more thing.', False, False),
    ('detectable_content:postscript', {"postscript_marker": "Note:"}, 'Hello.\nnote: bring water.', True, True),
    ('detectable_format:constrained_response', {}, 'My answer is yes.', True, True),
    ('detectable_format:constrained_response', {}, 'Yes, definitely.', False, False),
    ('detectable_format:json_format', {}, '```json\n{"a": 1, "b": [2, 3]}\n```', True, True),
    ('detectable_format:json_format', {}, '{"a": 1', False, False),
    ('detectable_format:json_format', {}, 'Here is the JSON:\n{"a": 1}', False, True),
    ('detectable_format:multiple_sections', {"num_sections": 2, "section_spliter": "Section"}, 'Section 1\nIntro text.\nSection 2\nMore text.', True, True),
    ('detectable_format:multiple_sections', {"num_sections": 3, "section_spliter": "SECTION"}, 'SECTION 1\nIntro.\nSECTION 2\nEnd.', False, False),
    ('detectable_format:number_bullet_lists', {"num_bullets": 3}, '* one\n* two\n- three', True, True),
    ('detectable_format:number_bullet_lists', {"num_bullets": 3}, '* one\n* two', False, False),
    ('detectable_format:number_bullet_lists', {"num_bullets": 2}, 'Here are two:\n* one\n* two\n**Bold** is not a bullet.', True, True),
    ('detectable_format:number_highlighted_sections', {"num_highlights": 2}, 'This is *important* and *also this*.', True, True),
    ('detectable_format:number_highlighted_sections', {"num_highlights": 2}, 'Only **one bold** part.', False, False),
    ('detectable_format:number_highlighted_sections', {"num_highlights": 2}, 'Only *one* part and an empty ** pair.', False, False),
    ('detectable_format:title', {}, '<<My Title>>\nBody text.', True, True),
    ('detectable_format:title', {}, 'My Title\nBody text.', False, False),
    ('detectable_format:title', {}, '<<   >>\nBody text.', False, False),
    ('keywords:existence', {"keywords": ["apple", "banana"]}, 'An Apple and a BANANA.', True, True),
    ('keywords:existence', {"keywords": ["apple", "banana"]}, 'An apple only.', False, False),
    ('keywords:forbidden_words', {"forbidden_words": ["bad", "evil"]}, 'A good and badger-free day.', True, True),
    ('keywords:forbidden_words', {"forbidden_words": ["bad", "evil"]}, 'A Bad day.', False, False),
    ('keywords:frequency', {"keyword": "cat", "frequency": 2, "relation": "at least"}, 'Cat, cat, and caterpillar.', True, True),
    ('keywords:frequency', {"keyword": "cat", "frequency": 2, "relation": "less than"}, 'A cat and a cat.', False, False),
    ('keywords:frequency', {"keyword": "dog", "frequency": 2, "relation": "less than"}, 'A dog.', True, True),
    ('keywords:letter_frequency', {"letter": "q", "let_frequency": 2, "let_relation": "at least"}, 'Quick quiet questions.', True, True),
    ('keywords:letter_frequency', {"letter": "q", "let_frequency": 2, "let_relation": "less than"}, 'Quick quiet questions.', False, False),
    ('keywords:letter_frequency', {"letter": "z", "let_frequency": 1, "let_relation": "less than"}, 'No such letter here.', True, True),
    ('language:response_language', {"language": "fr"}, "C'est une belle journée et tout le monde est heureux d'être dehors dans le parc avec les enfants.", True, True),
    ('language:response_language', {"language": "fr"}, 'The quick brown fox jumps over the lazy dog. It was a sunny day and everyone was happy to be outside in the park.', False, False),
    ('language:response_language', {"language": "de"}, 'Das ist ein schöner Tag und alle sind froh, draußen im Park mit den Kindern zu sein.', True, True),
    ('language:response_language', {"language": "hi"}, '1234 5678 !!!', True, True),
    ('length_constraints:nth_paragraph_first_word', {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"}, 'First we go.\n\n"Then, we stay.', True, True),
    ('length_constraints:nth_paragraph_first_word', {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"}, 'First we go.\n\nAfter that we stay.', False, False),
    ('length_constraints:nth_paragraph_first_word', {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "then"}, 'First we go.\n\nThen we stay.', False, False),
    ('length_constraints:nth_paragraph_first_word', {"num_paragraphs": 2, "nth_paragraph": 1, "first_word": "first"}, '**First** we go.\n\nThen we stay.', False, True),
    ('length_constraints:number_paragraphs', {"num_paragraphs": 2}, 'Para one.\n***\nPara two.', True, True),
    ('length_constraints:number_paragraphs', {"num_paragraphs": 2}, 'Para one.\n***\n***\nPara two.', False, False),
    ('length_constraints:number_paragraphs', {"num_paragraphs": 3}, 'Para one.\n***\nPara two.', False, False),
    ('length_constraints:number_paragraphs', {"num_paragraphs": 2}, '***\nPara one.\n***\nPara two.\n***', True, True),
    ('length_constraints:number_sentences', {"num_sentences": 3, "relation": "less than"}, 'Dr. Smith went home. He slept.', True, True),
    ('length_constraints:number_sentences', {"num_sentences": 3, "relation": "at least"}, 'Dr. Smith went home. He slept.', False, False),
    ('length_constraints:number_sentences', {"num_sentences": 3, "relation": "at least"}, 'Mr. Brown met Mrs. Green at 5 p.m. on Jan. 3. They talked. It rained! Was it fun? Yes.', True, True),
    ('length_constraints:number_words', {"num_words": 10, "relation": "at least"}, 'The quick brown fox jumps over the lazy dog. It was a sunny day and everyone was happy to be outside in the park.', True, True),
    ('length_constraints:number_words', {"num_words": 10, "relation": "less than"}, 'The quick brown fox jumps over the lazy dog. It was a sunny day and everyone was happy to be outside in the park.', False, False),
    ('length_constraints:number_words', {"num_words": 5, "relation": "less than"}, "It's well-known.", True, True),
    ('punctuation:no_comma', {}, 'No commas here at all.', True, True),
    ('punctuation:no_comma', {}, 'Well, there is one.', False, False),
    ('startend:end_checker', {"end_phrase": "Is there anything else I can help with?"}, 'Here it is. Is there anything else I can help with?', True, True),
    ('startend:end_checker', {"end_phrase": "Is there anything else I can help with?"}, '"Here it is. is there anything else i can help with?"', True, True),
    ('startend:end_checker', {"end_phrase": "Is there anything else I can help with?"}, 'Here it is. Is there anything else I can help with?\nThanks!', False, True),
    ('startend:end_checker', {"end_phrase": "Any other questions?"}, 'Done.', False, False),
    ('startend:quotation', {}, '"All of it is quoted."', True, True),
    ('startend:quotation', {}, 'Not quoted.', False, False),
    ('startend:quotation', {}, 'Sure, here:\n"All of it is quoted."', False, True),
    ('startend:quotation', {}, '"', False, False),
    ('punctuation:no_comma', {}, '   ', False, False),
    ('punctuation:no_comma', {}, 'Sure, here it is:\nNo commas here.', False, True),
    ('keywords:forbidden_words', {"forbidden_words": ["bad"]}, 'Not a bad question!\nA fine answer.', False, True),
    ('length_constraints:number_words', {"num_words": 5, "relation": "less than"}, 'Here is my answer below\nShort one.', False, True),
    ('change_case:capital_word_frequency', {"capital_frequency": 2, "capital_relation": "less than"}, 'OK SURE\nfine text', False, True),
    ('detectable_format:number_bullet_lists', {"num_bullets": 2}, '- intro line\n* one\n* two', False, True),
    ('detectable_format:multiple_sections', {"num_sections": 2, "section_spliter": "Section"}, '*Section* 1\nA\n*Section* 2\nB', False, True),
    ('change_case:english_capital', {}, 'Here you go:\nTHE QUICK BROWN FOX JUMPS OVER THE LAZY DOG. IT WAS A SUNNY DAY AND EVERYONE WAS HAPPY TO BE OUTSIDE IN THE PARK.', False, True),
    ('detectable_format:title', {}, '<<Title>>', True, True),
]
# fmt: on


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c[0].split(":")[1])
def test_checker_agrees_with_the_reference(case):
    iid, kwargs, response, strict, loose = case
    record = {"instruction_id_list": [iid], "kwargs": [check_kwargs(iid, kwargs)]}
    assert score(record, response) == {"strict": [strict], "loose": [loose]}


def test_corpus_covers_every_type_passing_and_failing_strict_and_loose():
    assert len(CHECKERS) == 25
    for iid in CHECKERS:
        verdicts = [(c[3], c[4]) for c in CORPUS if c[0] == iid]
        assert any(s for s, _ in verdicts) and any(not s for s, _ in verdicts), iid
        assert any(lo for _, lo in verdicts) and any(not lo for _, lo in verdicts), iid


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {
    "key": 1,
    "prompt": "Say hi without commas.",
    "instruction_id_list": ["punctuation:no_comma"],
    "kwargs": [{}],
}


@pytest.mark.parametrize(
    "row, where",
    [
        ({"key": 2, "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}, "field 'prompt'"),
        ({**GOOD, "instruction_id_list": ["punctuation:no_comas"]}, "field 'instruction_id_list[0]'"),
        ({**GOOD, "instruction_id_list": ["keywords:frequency"], "kwargs": [{"keyword": "a", "frequency": 2, "relation": "at most"}]},
         "field 'kwargs[0].relation'"),
        ({**GOOD, "kwargs": [{"num_words": 3}]}, "field 'kwargs[0].num_words'"),
        ({**GOOD, "instruction_id_list": ["length_constraints:number_words"], "kwargs": [{"num_words": 3}]},
         "field 'kwargs[0].relation'"),
        ({**GOOD, "kwargs": [{}, {}]}, "field 'kwargs'"),
        ("{not json", "invalid JSON"),
    ],
)  # fmt: skip
def test_bad_input_names_file_line_and_field(tmp_path, row, where):
    path = _write(tmp_path / "p.jsonl", [GOOD, row])
    with pytest.raises(DataError) as e:
        read_prompts(path)
    assert f"{path}:2: " in str(e.value) and where in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_id_suggests_the_closest():
    with pytest.raises(Exception, match="did you mean 'punctuation:no_comma'"):
        check_kwargs("punctuation:no_comas", {})


def test_null_kwargs_are_dropped_as_the_reference_drops_them():
    kw = {"num_words": 5, "relation": "at least", "keyword": None, "language": None}
    assert check_kwargs("length_constraints:number_words", kw) == {
        "num_words": 5,
        "relation": "at least",
    }


def test_summary_counts_prompts_and_instructions_with_intervals():
    records = [
        {"instruction_id_list": ["punctuation:no_comma", "startend:quotation"], "kwargs": [{}, {}]},
        {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    ]
    scores = [score(records[0], '"no commas"'), score(records[1], "a, b")]
    s = summarize(records, scores)
    assert (s["prompt_strict"], s["instruction_strict"], s["n"]) == (0.5, round(2 / 3, 4), 2)
    for m in ("prompt_strict", "instruction_strict", "prompt_loose", "instruction_loose"):
        lo, hi = s["intervals"][m]
        assert 0 <= lo <= s[m] <= hi <= 1
    assert s["by_instruction"]["punctuation:no_comma"] == {
        "n": 2,
        "strict": 0.5,
        "loose": 0.5,
        "strict_interval": [0.0, 1.0],
        "loose_interval": [0.0, 1.0],
    }
    assert s["per_prompt"] == [[2, 2, 2], [0, 0, 1]]


def test_paired_difference_resamples_prompts_jointly():
    a = [[1, 1, 1]] * 30 + [[0, 0, 1]] * 30
    b = [[1, 1, 1]] * 30 + [[0, 0, 1]] * 20 + [[1, 1, 1]] * 10  # 10 prompts gained
    d = paired_difference(a, b)["prompt_strict"]
    assert (d["a"], d["b"], d["difference"]) == (0.5, round(40 / 60, 4), round(10 / 60, 4))
    assert 0 < d["interval"][0] < d["difference"] < d["interval"][1]
    same = paired_difference(a, a)["instruction_loose"]
    assert same["difference"] == 0 and same["interval"] == [0.0, 0.0]
    with pytest.raises(DataError):
        paired_difference(a, b[:-1])


def test_responses_are_matched_by_prompt(tmp_path):
    records = read_prompts(_write(tmp_path / "p.jsonl", [GOOD]))
    path = _write(tmp_path / "r.jsonl", [{"prompt": GOOD["prompt"], "response": "hi there"}])
    assert read_responses(path, records) == ["hi there"]
    _write(path, [{"prompt": "another", "response": "x"}])
    with pytest.raises(DataError, match="no response to 1 of 1 prompts"):
        read_responses(path, records)


@pytest.mark.skipif(not IFEVAL.exists(), reason="needs ../shared/data/instruction_following")
def test_the_ifeval_prompts_load_with_every_kwarg_fitting():
    records = read_prompts(IFEVAL)
    assert len(records) == 541
    assert sum(len(r["instruction_id_list"]) for r in records) == 834
    assert {i for r in records for i in r["instruction_id_list"]} == set(CHECKERS)
