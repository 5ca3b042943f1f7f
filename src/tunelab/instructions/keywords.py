"""keywords:* and punctuation:*: words and characters the response must or must not use."""

from __future__ import annotations

import re
from collections import Counter

from tunelab.instructions.relation import Relation, compare


def existence(response: str, *, keywords: list[str]) -> bool:
    """Every keyword appears (case-insensitive; the reference searches it as a pattern)."""
    return all(re.search(k, response, flags=re.IGNORECASE) for k in keywords)


def frequency(response: str, *, keyword: str, frequency: int, relation: Relation) -> bool:
    """The keyword appears fewer than / at least `frequency` times."""
    found = len(re.findall(keyword.strip(), response, flags=re.IGNORECASE))
    return compare(found, relation, frequency)


def forbidden_words(response: str, *, forbidden_words: list[str]) -> bool:
    """None of the words appears as a whole word."""
    return not any(
        re.search(r"\b" + w + r"\b", response, flags=re.IGNORECASE) for w in set(forbidden_words)
    )


def letter_frequency(
    response: str, *, letter: str, let_frequency: int, let_relation: Relation
) -> bool:
    """The letter (either case) appears fewer than / at least `let_frequency` times."""
    found = Counter(response.lower())[letter.strip().lower()]
    return compare(found, let_relation, let_frequency)


def no_comma(response: str) -> bool:
    return "," not in response


def check_letter(letter: str) -> str | None:
    """Why a `letter` argument does not fit, or None. Any one character: two IFEval prompts
    count '#' and '!', for which the reference draws a random letter instead; we count the
    character asked for, so those two scores repeat."""
    return None if len(letter.strip()) == 1 else f"expected one character, got {letter!r}"
