"""change_case:*: all capitals, all lowercase, how many words in capitals."""

from __future__ import annotations

from tunelab.instructions.relation import Relation, compare
from tunelab.instructions.text import language, word_tokens


def english_capital(response: str) -> bool:
    """All capitals and English (a text with no detectable language passes, as in the
    reference)."""
    return response.isupper() and language(response) in ("en", None)


def english_lowercase(response: str) -> bool:
    return response.islower() and language(response) in ("en", None)


def capital_word_frequency(
    response: str, *, capital_frequency: int, capital_relation: Relation
) -> bool:
    """Words in all capitals (NLTK word tokens) fewer than / at least `capital_frequency`."""
    count = sum(1 for w in word_tokens(response) if w.isupper())
    return compare(count, capital_relation, capital_frequency)
