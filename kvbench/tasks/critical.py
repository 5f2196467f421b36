"""Critical prompt tokens: the question's quantities, named entities and option labels.

Only text that came from the example's fields counts, never the prompt template's own words.
"""

from __future__ import annotations

import re
import string

#: Capitalised words that start sentences rather than name things.
_COMMON = {
    "A", "An", "The", "He", "She", "It", "They", "We", "I", "You", "His", "Her", "Its", "Their", "Our", "This", "That",
    "These", "Those", "There", "Then", "If", "When", "What", "Which", "Who", "Whom", "Whose", "Where", "Why", "How",
    "In", "On", "At", "For", "From", "To", "Of", "By", "With", "After", "Before", "Each", "Every", "All", "Some",
    "And", "But", "Or", "So", "As", "Is", "Are", "Was", "Were", "Do", "Does", "Did", "Can", "Could", "Will", "Would",
    "Be", "Not", "No", "Yes", "One", "Both", "Either", "Neither", "Also", "However", "Therefore", "Thus", "Since",
}
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_NAME = re.compile(r"\b[A-Z][a-zA-Z'-]*[a-z][a-zA-Z'-]*\b")
_OPTION_LABEL = re.compile(r"^([A-J])\.", re.MULTILINE)


def critical_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of numbers, capitalised names (common sentence starters excluded) and option labels."""
    spans = [m.span() for m in _NUMBER.finditer(text)]
    spans += [m.span() for m in _NAME.finditer(text) if m.group(0) not in _COMMON]
    spans += [m.span(1) for m in _OPTION_LABEL.finditer(text)]
    return sorted(spans)


def render_with_ranges(template: str, values: dict) -> tuple[str, list[tuple[int, int]]]:
    """``template.format(**values)`` and the character range each substituted value occupies in it."""
    out, ranges = [], []
    length = 0
    for literal, name, spec, _conversion in string.Formatter().parse(template):
        out.append(literal)
        length += len(literal)
        if name is None:
            continue
        value = format(values[name], spec or "")
        ranges.append((length, length + len(value)))
        out.append(value)
        length += len(value)
    return "".join(out), ranges
