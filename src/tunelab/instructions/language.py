"""language:response_language: the whole response in one language."""

from __future__ import annotations

from tunelab.instructions import text


def response_language(response: str, *, language: str) -> bool:
    """langdetect finds `language` (an ISO 639-1 code); no detectable language passes, as in
    the reference."""
    found = text.language(response)
    return found is None or found == language
