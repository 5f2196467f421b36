"""The paper's harness's answer extraction and scoring, rule for rule, defects included (the ``hott`` protocol).

The kvpress fork's ``reason/`` code (43d9e37) extracts from the whole response (no ``<think>`` handling) and
scores by string comparison. Reproduced here as its code behaves, so that a ``hott`` number means what the
paper's numbers meant:

- ``hott_default`` (``utils.default_extractor``): a response that is a number or only letters is the answer;
  else the content of the last ``\\boxed{...}``; else the text after the last "final answer is" / "answer is" /
  "answer:" (and then "option" / "answer"), lower-cased, up to the first newline and the first period. Its
  ``\\text{...}`` unwrapping raises a ``NameError`` (``re`` is not imported) that the fork catches, so
  ``\\boxed{\\text{A}}`` yields ``\\text{A}``.
- ``hott_strategyqa`` / ``hott_folio`` (``strategyqa_extractor`` / ``folio_extractor``): the same chain where
  ``\\text{...}`` is unwrapped, without the "option" fallbacks; a bare response that is a label is the answer:
  true/false for StrategyQA (lower-cased, so a bare "Uncertain" extracts nothing), true/false/uncertain for FOLIO
  (as written).
- Scorers: ``hott_exact`` (``prediction == answer``: GSM8K, MATH-500), ``hott_exact_ci`` (case-insensitive:
  multiple choice, StrategyQA, FOLIO), ``hott_drop_chars`` (DROP: the gold is the text of a Python list and the
  prediction must equal one of its *characters*, so only one-character predictions can score).

The fork returns "" when nothing matches; here that is ``None`` (reported as invalid), scored wrong as there.
"""

from __future__ import annotations

import re

from kvbench.tasks.drop import is_number

_FLAGS = ("final answer is", "correct answer is", "answer should be", "answer is", "answer:")
_FALLBACK_FLAGS = ("option", "answer", "option:", "answer:", "option.", "answer.", "option is", "correct option is")
_TEXT = re.compile(r"\\text{(.*?)}")


def boxed_contents(text: str) -> list[str]:
    r"""Every ``\boxed{...}`` content, left to right, braces balanced; an unclosed box yields nothing."""
    found, i = [], 0
    while i < len(text):
        if text.startswith("\\boxed{", i):
            start, depth = i + 7, 0
            for j in range(start, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    if depth == 0:
                        found.append(text[start:j])
                        i = j
                        break
                    depth -= 1
            else:
                return found
        i += 1
    return found


def _after_flag(response: str, flags: tuple[str, ...]) -> str | None:
    lowered = response.lower()
    for flag in flags:
        if flag in lowered:
            return lowered.split(flag)[-1].strip().split("\n")[0].split(".")[0]
    return None


def hott_default(text: str) -> str | None:
    """The fork's ``default_extractor``: ``\\text{}`` inside a box is kept (its unwrapping crashes and is caught)."""
    response = text.strip()
    if is_number(response) or response.isalpha():
        return response or None
    if "boxed{" in response:
        boxes = boxed_contents(response)
        if boxes:
            return boxes[-1].strip() or None
    answer = _after_flag(response, _FLAGS)
    if answer is None:
        answer = _after_flag(response, _FALLBACK_FLAGS)
    return answer or None


def hott_strategyqa(text: str) -> str | None:
    """The fork's ``strategyqa_extractor``: a bare true/false (lower-cased), else ``hott_label``'s chain."""
    response = text.strip()
    if response.lower() in ("true", "false"):
        return response.lower()
    return hott_label(response)


def hott_folio(text: str) -> str | None:
    """The fork's ``folio_extractor``: a bare true/false/uncertain as written, else ``hott_label``'s chain."""
    response = text.strip()
    if response.lower() in ("true", "false", "uncertain"):
        return response
    return hott_label(response)


def hott_label(text: str) -> str | None:
    """What the fork's ``strategyqa_extractor`` and ``folio_extractor`` share after their bare-label test: the last
    ``\\boxed{}`` with ``\\text{}`` unwrapped, else the text after the last answer flag (no "option" fallback)."""
    response = text.strip()
    if "boxed{" in response:
        boxes = boxed_contents(response)
        if boxes:
            inner = _TEXT.findall(boxes[-1])
            return (inner[-1] if inner else boxes[-1]).strip() or None
    return _after_flag(response, _FLAGS) or None


def hott_exact(extracted: str, gold: str) -> tuple[bool, dict]:
    """``prediction == answer`` (GSM8K, MATH-500): no numeric or LaTeX normalisation."""
    return extracted == gold, {}


def hott_exact_ci(extracted: str, gold: str) -> tuple[bool, dict]:
    """``prediction.lower() == answer.lower()`` (multiple choice, StrategyQA, FOLIO)."""
    return extracted.lower() == gold.lower(), {}


def hott_drop_chars(extracted: str, gold: str) -> tuple[bool, dict]:
    """The fork's DROP scorer: the gold is ``str(list_of_spans)`` and is iterated character by character."""
    return extracted.lower() in [ch.lower() for ch in gold], {}


EXTRACTORS = {"hott_default": hott_default, "hott_strategyqa": hott_strategyqa, "hott_folio": hott_folio}
SCORERS = {"hott_exact": hott_exact, "hott_exact_ci": hott_exact_ci, "hott_drop_chars": hott_drop_chars}
