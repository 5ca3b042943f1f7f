"""length_constraints:*: words, sentences and paragraphs."""

from __future__ import annotations

import re

from tunelab.instructions.relation import Relation, compare
from tunelab.instructions.text import count_sentences, count_words


def number_words(response: str, *, num_words: int, relation: Relation) -> bool:
    return compare(count_words(response), relation, num_words)


def number_sentences(response: str, *, num_sentences: int, relation: Relation) -> bool:
    return compare(count_sentences(response), relation, num_sentences)


def number_paragraphs(response: str, *, num_paragraphs: int) -> bool:
    """Exactly `num_paragraphs` paragraphs separated by the markdown divider ***."""
    parts = re.split(r"\s?\*\*\*\s?", response)
    count = len(parts)
    for i, part in enumerate(parts):
        if not part.strip():
            if i in (0, len(parts) - 1):
                count -= 1
            else:  # an empty paragraph between two dividers
                return False
    return count == num_paragraphs


def nth_paragraph_first_word(
    response: str, *, num_paragraphs: int, nth_paragraph: int, first_word: str
) -> bool:
    """`num_paragraphs` paragraphs separated by blank lines; paragraph n starts with the word."""
    parts = re.split(r"\n\n", response)
    count = sum(1 for p in parts if p.strip())
    if nth_paragraph > count:
        return False
    paragraph = parts[nth_paragraph - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    first = ""
    for ch in word:
        if ch in ".,?!'\"":
            break
        first += ch.lower()
    return count == num_paragraphs and first == first_word.lower()
