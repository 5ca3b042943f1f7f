"""Counting prompts: variants (named templates) x numbers x classes, from YAML.

    variants:                      # name -> template; {number} is spelled (three), {digit} 3
      word: "a photo of {number} {object}"
      digit: "a photo of {digit} {object}"
      exact: "a photo of exactly {number} {object}, no more, no fewer"
    numbers: [2, 3, 4]
    classes: [cat, person, car]
    plurals: {person: people}      # optional; otherwise English rules
    images: 4                      # optional: images per prompt (--n wins)

The default is GenEval's counting task (a photo of N objects, N in 2-4) in three phrasings,
over classes the chosen counter knows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from tunelab.errors import ConfigError, closest

GENEVAL = {
    "word": "a photo of {number} {object}",
    "digit": "a photo of {digit} {object}",
    "exact": "a photo of exactly {number} {object}, no more, no fewer",
}
DEFAULT_CLASSES = {
    "ssd-mobilenet": ["cat", "dog", "person", "car", "cup", "apple", "bird", "horse"]
}
IRREGULAR = {
    "person": "people",
    "mouse": "mice",
    "knife": "knives",
    "sheep": "sheep",
    "skis": "skis",
    "scissors": "scissors",
    "bus": "buses",
    "glass": "glasses",
    "wine glass": "wine glasses",
    "couch": "couches",
    "bench": "benches",
    "sandwich": "sandwiches",
    "toothbrush": "toothbrushes",
    "tv": "tvs",
}
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
KEYS = ("variants", "numbers", "classes", "plurals", "images")


@dataclass
class Prompt:
    text: str
    object: str
    expected: int
    variant: str


def plural(noun: str, plurals: dict | None = None) -> str:
    if plurals and noun in plurals:
        return plurals[noun]
    if noun in IRREGULAR:
        return IRREGULAR[noun]
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def fill(template: str, count: int, obj: str, plurals: dict | None = None) -> str:
    noun = obj if count == 1 else plural(obj, plurals)
    word = WORDS[count] if count < len(WORDS) else str(count)
    return template.format(number=word, digit=count, object=noun)


def default_spec(counter) -> dict:
    """GenEval-style prompts over classes the counter knows (the rendered domain's phrasings
    for the components counter)."""
    if counter.name == "components":
        from tunelab.image.shapes import MAX_COUNT, PHRASINGS

        return {
            "variants": dict(PHRASINGS),
            "numbers": list(range(1, MAX_COUNT + 1)),
            "classes": list(counter.classes),
        }
    classes = DEFAULT_CLASSES.get(counter.name, list(counter.classes)[:8])
    return {"variants": dict(GENEVAL), "numbers": [2, 3, 4], "classes": classes}


def read_spec(path: str | Path) -> dict:
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--prompts {path}: no such file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(
            f"--prompts {path}{f':{mark.line + 1}' if mark else ''}: invalid YAML"
        ) from None
    if not isinstance(spec, dict):
        raise ConfigError(f"--prompts {path}: expected a mapping with {', '.join(KEYS[:3])}")
    for key in spec:
        if key not in KEYS:
            raise ConfigError(f"--prompts {path}: unknown key {key!r}{closest(key, KEYS)}")
    return spec


def expand(spec: dict, counter, where: str = "prompts") -> list[Prompt]:
    """Every variant x number x class, checked: templates hold a number and the object, every
    class is one the counter can count, numbers are whole and at least 1."""
    base = default_spec(counter)
    variants = spec.get("variants") or base["variants"]
    if isinstance(variants, list):
        variants = {f"v{i}": t for i, t in enumerate(variants)}
    numbers, classes = (
        spec.get("numbers") or base["numbers"],
        spec.get("classes") or base["classes"],
    )
    for name, template in variants.items():
        if not isinstance(template, str) or not ("{number}" in template or "{digit}" in template):
            raise ConfigError(
                f"{where}: variant {name!r} ({template!r}) holds no {{number}} "
                f"or {{digit}}, so it asks for no count"
            )
        if "{object}" not in template:
            raise ConfigError(f"{where}: variant {name!r} ({template!r}) holds no {{object}}")
    for n in numbers:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"{where}: numbers: {n!r} is not a whole number of at least 1")
    for obj in classes:
        counter.check_class(str(obj))
    plurals = spec.get("plurals") or {}
    return [
        Prompt(fill(t, n, obj, plurals), obj, n, name)
        for name, t in variants.items()
        for n in numbers
        for obj in classes
    ]
