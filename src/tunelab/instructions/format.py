"""detectable_format:*: bullets, highlights, sections, JSON, a title, a fixed answer."""

from __future__ import annotations

import json
import re

CONSTRAINED = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def number_bullet_lists(response: str, *, num_bullets: int) -> bool:
    """Exactly `num_bullets` markdown bullets (* or -)."""
    stars = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def constrained_response(response: str) -> bool:
    """One of 'My answer is yes./no./maybe.' somewhere in the response."""
    value = response.strip()
    return any(option in value for option in CONSTRAINED)


def number_highlighted_sections(response: str, *, num_highlights: int) -> bool:
    """At least `num_highlights` *highlighted* spans (a **bold** one counts as the reference
    counts it: once as itself and once for the *...* inside)."""
    single = re.findall(r"\*[^\n\*]*\*", response)
    double = re.findall(r"\*\*[^\n\*]*\*\*", response)
    count = sum(1 for h in single if h.strip("*").strip())
    count += sum(1 for h in double if h.removeprefix("**").removesuffix("**").strip())
    return count >= num_highlights


def multiple_sections(response: str, *, num_sections: int, section_spliter: str) -> bool:
    """At least `num_sections` sections, each starting with e.g. 'Section 1'."""
    pattern = r"\s?" + section_spliter.strip() + r"\s?\d+\s?"
    return len(re.split(pattern, response)) - 1 >= num_sections


def json_format(response: str) -> bool:
    """The whole response parses as JSON (markdown ``` fences allowed)."""
    value = (
        response.strip()
        .removeprefix("```json")
        .removeprefix("```Json")
        .removeprefix("```JSON")
        .removeprefix("```")
        .removesuffix("```")
        .strip()
    )
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def title(response: str) -> bool:
    """A non-empty title in double angular brackets, like <<poem of joy>>."""
    titles = re.findall(r"<<[^\n]+>>", response)
    return any(t.lstrip("<").rstrip(">").strip() for t in titles)
