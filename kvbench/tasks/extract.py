"""Answer extractors: pure functions text -> answer string or None, in a registry used by name from YAML."""

from __future__ import annotations

import re
from collections.abc import Callable

_NUMBER = r"-?\$?\s*\d[\d,]*(?:\.\d+)?"
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*[:=]?\s*\**\s*(" + _NUMBER + ")", re.IGNORECASE)
_HASHES = re.compile(r"####\s*(" + _NUMBER + ")")
_LAST_NUMBER = re.compile(_NUMBER)


def strip_thinking(text: str) -> str:
    """Drop a reasoning model's ``<think>...</think>`` block (the stored response keeps it)."""
    return text.rsplit("</think>", 1)[-1] if "</think>" in text else text


def answer_is(text: str) -> str | None:
    """The last "The answer is N" (or "Answer: N", or GSM8K's "#### N")."""
    matches = _ANSWER_IS.findall(text) or _HASHES.findall(text)
    return matches[-1].strip() if matches else None


def boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}``, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j].strip()
    return None


def last_number(text: str) -> str | None:
    matches = _LAST_NUMBER.findall(text)
    return matches[-1].strip() if matches else None


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "answer_is": answer_is,
    "boxed": boxed,
    "last_number": last_number,
}


def extract(text: str, chain: list[str]) -> str | None:
    """First answer found by the extractors of ``chain``, in order, after stripping ``<think>``."""
    body = strip_thinking(text)
    for name in chain:
        found = EXTRACTORS[name](body)
        if found is not None:
            return found
    return None
