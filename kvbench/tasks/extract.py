"""Answer extractors: pure functions text -> answer string or None, in a registry used by name from YAML.

Where several answers are stated, the last one counts (models restate and correct themselves).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from kvbench.tasks.hott import EXTRACTORS as HOTT_EXTRACTORS

_NUMBER = r"-?\$?\s*\d[\d,]*(?:\.\d+)?"
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*[:=]?\s*\**\s*(" + _NUMBER + ")", re.IGNORECASE)
_HASHES = re.compile(r"####\s*(" + _NUMBER + ")")
_LAST_NUMBER = re.compile(_NUMBER)


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def opens_thinking(prompt: str | None) -> bool:
    """True if the rendered prompt ends inside an open think block.

    DeepSeek-R1-Distill chat templates end the prompt with ``<think>\n``: the response then starts inside its
    reasoning and carries no opening tag of its own. Decided from the stored prompt, so re-scoring agrees.
    """
    return bool(prompt) and prompt.rstrip().endswith(THINK_OPEN)


def strip_thinking(text: str, opened: bool = False) -> str:
    """The text after a reasoning model's ``</think>`` (the stored response keeps the reasoning).

    A response still inside its reasoning (a ``<think>`` without ``</think>``, or no ``</think>`` after a prompt
    that ``opened`` the block) leaves nothing to extract: it is invalid, never scored by what it last wrote.
    """
    if THINK_CLOSE in text:
        return text.rsplit(THINK_CLOSE, 1)[-1]
    if opened or THINK_OPEN in text:
        return ""
    return text


def answer_is(text: str) -> str | None:
    """The last "The answer is N" (or "Answer: N", or GSM8K's "#### N")."""
    matches = _ANSWER_IS.findall(text) or _HASHES.findall(text)
    return matches[-1].strip() if matches else None


def boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (or ``\fbox{...}``), braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start)
    depth = 0
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


def _last_match(patterns: list[re.Pattern], text: str) -> str | None:
    """The match (group 1) that ends last in ``text`` across all patterns."""
    best, best_end = None, -1
    for pattern in patterns:
        for m in pattern.finditer(text):
            if m.end() > best_end:
                best, best_end = m.group(1), m.end()
    return best


_WRAP = r"[\s:]*[\*\(\[\{\"']*\s*"  # bold, brackets, quotes before the answer
_END = r"\s*[\*\)\]\}\"']*\s*(?:[.,;:!]|$|\n|\s)"
_CHOICE = [
    re.compile(r"answer(?:\s+is|\s+would\s+be|\s*:)" + _WRAP + r"(?:option\s+|choice\s+)?([A-J1-9])" + _END,
               re.IGNORECASE),
    re.compile(r"\\boxed\{\s*(?:\\text\{)?\s*\(?([A-J1-9])\)?\s*\}?\s*\}"),
    re.compile(r"\*\*\s*\(?([A-J])\)?(?:[.:)]\s*[^*\n]*)?\*\*"),
    re.compile(r"(?:^|\n)\s*\(?([A-J])\)?\s*$"),
    re.compile(r"\b(?:option|choice)\s+\(?([A-J1-9])\)?\b", re.IGNORECASE),
]


def choice(text: str) -> str | None:
    """A multiple-choice answer as an upper-case letter; a 1-based number counts as its letter."""
    found = _last_match(_CHOICE, text)
    if found is None:
        return None
    return "ABCDEFGHI"[int(found) - 1] if found.isdigit() else found.upper()


def _label_extractor(words: dict[str, str]) -> Callable[[str], str | None]:
    alternatives = "|".join(sorted(words, key=len, reverse=True))
    patterns = [
        re.compile(r"answer(?:\s+is|\s+would\s+be|\s*:)" + _WRAP + rf"({alternatives})\b", re.IGNORECASE),
        re.compile(rf"\\boxed\{{\s*(?:\\text\{{)?\s*({alternatives})\b", re.IGNORECASE),
        re.compile(rf"\*\*\s*({alternatives})\s*[.!]?\s*\*\*", re.IGNORECASE),
        re.compile(rf"(?:^|\n)\s*({alternatives})\s*[.!]?\s*$", re.IGNORECASE),
    ]

    def extract_label(text: str) -> str | None:
        found = _last_match(patterns, text)
        return None if found is None else words[found.lower()]

    return extract_label


yes_no = _label_extractor({"yes": "yes", "no": "no", "true": "yes", "false": "no"})
folio_label = _label_extractor({"true": "True", "false": "False", "uncertain": "Uncertain", "unknown": "Uncertain"})

_ANSWER_TEXT = re.compile(r"answer\s*(?:is|:)\s*[:=]?\s*(.+?)\s*(?:\.\s*$|\.\s*\n|\n|$)", re.IGNORECASE)


def answer_text(text: str) -> str | None:
    """Free-text answer (DROP): what follows the last "The answer is", up to the end of its sentence."""
    matches = _ANSWER_TEXT.findall(text)
    if not matches:
        return None
    return matches[-1].strip().strip("*").strip().rstrip(".").strip() or None


def last_line(text: str) -> str | None:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1].rstrip(".") if lines else None


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "answer_is": answer_is, "boxed": boxed, "last_number": last_number, "choice": choice, "yes_no": yes_no,
    "folio_label": folio_label, "answer_text": answer_text, "last_line": last_line, **HOTT_EXTRACTORS,
}


def extract(text: str, chain: list[str], strip: bool = True, opened: bool = False) -> str | None:
    """First answer found by the extractors of ``chain``, in order, after ``strip_thinking`` (unless ``strip`` is
    False, as under the ``hott`` protocol, whose harness searched the whole response)."""
    body = strip_thinking(text or "", opened) if strip else text or ""
    for name in chain:
        found = EXTRACTORS[name](body)
        if found is not None:
            return found
    return None
