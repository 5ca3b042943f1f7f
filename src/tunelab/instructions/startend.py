"""startend:* and combination:*: how the response starts, ends and is put together."""

from __future__ import annotations


def end_checker(response: str, *, end_phrase: str) -> bool:
    """Ends with the phrase (any case; surrounding quotes and space ignored)."""
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def quotation(response: str) -> bool:
    """Wrapped in double quotation marks."""
    value = response.strip()
    return len(value) > 1 and value[0] == '"' and value[-1] == '"'


def repeat_prompt(response: str, *, prompt_to_repeat: str) -> bool:
    """Starts with the request repeated word for word (any case)."""
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


def two_responses(response: str) -> bool:
    """Exactly two different responses separated by ******."""
    parts = response.split("******")
    valid = []
    for i, part in enumerate(parts):
        if part.strip():
            valid.append(part)
        elif i not in (0, len(parts) - 1):
            return False
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()
