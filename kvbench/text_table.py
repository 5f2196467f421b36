"""Plain-text tables (boxed for the terminal, or markdown pipes) shared by the reports: they render text, only
``cli/`` prints."""

from __future__ import annotations

from collections.abc import Sequence


def text_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """A boxed table under its centred title; the first ``left`` columns are left-aligned, the rest right."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def rule(start: str, middle: str, end: str, fill: str) -> str:
        return start + middle.join(fill * (w + 2) for w in widths) + end

    def cells(values: Sequence[str], edge: str) -> str:
        text = [v.ljust(w) if i < left else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths))]
        return edge + edge.join(f" {t} " for t in text) + edge

    width = sum(widths) + 3 * len(widths) + 1
    lines = [title.center(width).rstrip() if len(title) <= width else title,
             rule("┏", "┳", "┓", "━"), cells(headers, "┃"), rule("┡", "╇", "┩", "━"),
             *(cells(r, "│") for r in rows), rule("└", "┴", "┘", "─")]
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """A pipe table with aligned columns: the first ``left`` left-aligned, the rest right-aligned."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def cells(values: Sequence[str]) -> str:
        text = [v.ljust(w) if i < left else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths))]
        return "| " + " | ".join(text) + " |"

    rule = "|" + "|".join(":" + "-" * (w + 1) if i < left else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([cells(headers), rule, *(cells(r) for r in rows)])
