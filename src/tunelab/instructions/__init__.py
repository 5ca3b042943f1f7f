"""Verifiable instructions (IFEval): 25 checkers of a response's form, scored strictly and
loosely, at prompt and instruction level, with bootstrap intervals over prompts.

The checkers follow the reference implementation (google-research instruction_following_eval,
as copied into lm-eval's ifeval task) check for check; tests/test_instructions.py holds a corpus
of passing and failing responses for every type, with the reference's verdicts.
"""

from tunelab.instructions.registry import CHECKERS, KwargsError, check_kwargs

__all__ = ["CHECKERS", "KwargsError", "check_kwargs"]
