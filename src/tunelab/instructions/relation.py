"""The comparison every counting instruction takes: 'less than' or 'at least'."""

from typing import Literal

Relation = Literal["less than", "at least"]
RELATIONS = ("less than", "at least")


def compare(count: int, relation: str, threshold: int) -> bool:
    return count < threshold if relation == "less than" else count >= threshold
