"""Scorers: pure functions (extracted, gold) -> correct, in a registry used by name from YAML."""

from __future__ import annotations

import re
from collections.abc import Callable
from fractions import Fraction


def to_number(text: str | None) -> Fraction | None:
    """Exact rational value of a numeric answer: commas, ``$``, units and trailing dots are ignored."""
    if text is None:
        return None
    match = re.search(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+", text.replace("$", "").replace(" ", ""))
    if match is None:
        return None
    try:
        return Fraction(match.group(0).replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def numeric(extracted: str | None, gold: str) -> bool:
    """Exact rational equality (``18.00`` equals ``18``; ``1,000`` equals ``1000``)."""
    value = to_number(extracted)
    return value is not None and value == to_number(gold)


SCORERS: dict[str, Callable[[str | None, str], bool]] = {"numeric": numeric}
