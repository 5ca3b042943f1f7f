"""Errors the CLI prints in one line; each message says what to do about it."""

import difflib


class TunelabError(Exception):
    """Base class for every error tunelab raises on purpose."""


class ConfigError(TunelabError):
    """A bad key or value in a config, a recipe or on the command line."""


class ModelError(TunelabError):
    """A model that cannot be found, read or converted."""


class DataError(TunelabError):
    """Input data that cannot be used; the message names file and line."""


def closest(name: str, options) -> str:
    """' (did you mean X?)' for the closest option, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.4)
    return f" (did you mean {match[0]!r}?)" if match else ""


class MemoryLimitError(TunelabError):
    """A run that the memory estimate says will not fit; the message names what would."""
