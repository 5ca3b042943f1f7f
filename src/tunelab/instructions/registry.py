"""The 25 IFEval instruction ids, each mapped to its checker, and the check of their kwargs."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable

from tunelab.errors import closest
from tunelab.instructions import case, content, format, keywords, language, length, startend

CHECKERS: dict[str, Callable[..., bool]] = {
    "change_case:capital_word_frequency": case.capital_word_frequency,
    "change_case:english_capital": case.english_capital,
    "change_case:english_lowercase": case.english_lowercase,
    "combination:repeat_prompt": startend.repeat_prompt,
    "combination:two_responses": startend.two_responses,
    "detectable_content:number_placeholders": content.number_placeholders,
    "detectable_content:postscript": content.postscript,
    "detectable_format:constrained_response": format.constrained_response,
    "detectable_format:json_format": format.json_format,
    "detectable_format:multiple_sections": format.multiple_sections,
    "detectable_format:number_bullet_lists": format.number_bullet_lists,
    "detectable_format:number_highlighted_sections": format.number_highlighted_sections,
    "detectable_format:title": format.title,
    "keywords:existence": keywords.existence,
    "keywords:forbidden_words": keywords.forbidden_words,
    "keywords:frequency": keywords.frequency,
    "keywords:letter_frequency": keywords.letter_frequency,
    "language:response_language": language.response_language,
    "length_constraints:nth_paragraph_first_word": length.nth_paragraph_first_word,
    "length_constraints:number_paragraphs": length.number_paragraphs,
    "length_constraints:number_sentences": length.number_sentences,
    "length_constraints:number_words": length.number_words,
    "punctuation:no_comma": keywords.no_comma,
    "startend:end_checker": startend.end_checker,
    "startend:quotation": startend.quotation,
}


class KwargsError(ValueError):
    """kwargs that do not fit a checker; `field` names the offending key."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def _fits(value, hint) -> str | None:
    """Why value does not fit the annotation, or None."""
    if typing.get_origin(hint) is typing.Literal:
        options = typing.get_args(hint)
        return None if value in options else f"expected one of {', '.join(map(repr, options))}"
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        return None if ok else "expected a whole number >= 0"
    if hint is str:
        return None if isinstance(value, str) and value.strip() else "expected a non-empty string"
    if typing.get_origin(hint) is list:
        ok = isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)
        return None if ok else "expected a non-empty list of strings"
    return None


def check_kwargs(instruction_id: str, kwargs) -> dict:
    """The kwargs a checker takes (null values dropped, as the reference drops them); raises
    KwargsError naming the first key that is unknown, missing or of the wrong type."""
    if instruction_id not in CHECKERS:
        hint = closest(instruction_id, CHECKERS)
        raise KwargsError(f"unknown instruction id {instruction_id!r}{hint}")
    if not isinstance(kwargs, dict):
        raise KwargsError(f"{instruction_id}: kwargs must be an object, got {kwargs!r}")
    fn = CHECKERS[instruction_id]
    hints = typing.get_type_hints(fn)
    wanted = [p for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
    names = [p.name for p in wanted]
    given = {k: v for k, v in kwargs.items() if v is not None}
    for key in given:
        if key not in names:
            takes = f"takes {', '.join(names)}" if names else "takes no arguments"
            raise KwargsError(f"{instruction_id} {takes}; got {key!r}{closest(key, names)}", key)
    for name in names:
        if name not in given:
            raise KwargsError(f"{instruction_id} needs {name!r}", name)
        why = _fits(given[name], hints[name])
        if why is None and name == "letter":
            why = keywords.check_letter(given[name])
        if why:
            raise KwargsError(f"{instruction_id}: {name} {given[name]!r}: {why}", name)
    return given
