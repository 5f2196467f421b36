"""Scorers: (extracted, gold) -> (correct, extra metrics), in a registry used by name from YAML."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from fractions import Fraction

from kvbench.tasks.drop import drop_metrics
from kvbench.tasks.hott import SCORERS as HOTT_SCORERS
from kvbench.tasks.mathverify import math_equal, strict_string


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


def numeric(extracted: str, gold: str) -> tuple[bool, dict]:
    """Exact rational equality (``18.00`` equals ``18``; ``1,000`` equals ``1000``; ``025`` equals ``25``)."""
    value = to_number(extracted)
    return value is not None and value == to_number(gold), {}


def exact_label(extracted: str, gold: str) -> tuple[bool, dict]:
    """Labels already normalised by the extractor (a letter, yes/no, True/False/Uncertain)."""
    return extracted.strip().lower() == gold.strip().lower(), {}


def math(extracted: str, gold: str) -> tuple[bool, dict]:
    """math-verify equivalence (primary), and a strict normalised-string match recorded beside it."""
    return math_equal(gold, extracted), {"strict_match": strict_string(extracted) == strict_string(gold)}


def drop(extracted: str, gold: str) -> tuple[bool, dict]:
    """DROP: correct = exact match (official EM); the official F1 is recorded beside it."""
    em, f1 = drop_metrics(extracted, json.loads(gold))
    return em == 1.0, {"f1": f1}


SCORERS: dict[str, Callable[[str, str], tuple[bool, dict]]] = {
    "numeric": numeric, "exact_label": exact_label, "math": math, "drop": drop, **HOTT_SCORERS,
}
