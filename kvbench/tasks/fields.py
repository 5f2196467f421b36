"""Field mapping: dotted paths into a raw record, plus value transforms by registry name (no code in YAML).

A field spec in a dataset config is either a path (``question.stem``) or a mapping
``{from: path | [paths], transform: name}``; a list of paths passes the list of values to the transform.
"""

from __future__ import annotations

import json
from collections.abc import Callable

LETTERS = "ABCDEFGHIJ"


def get_path(record: dict, path: str):
    value = record
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(path)
    return value


def label_text_choices(value: list[dict]) -> list[str]:
    """``[{label, text}, ...]`` (the original CSQA/OBQA layout) in label order -> texts."""
    return [c["text"] for c in sorted(value, key=lambda c: c["label"])]


def columns_choices(value: dict) -> list[str]:
    """``{label: [...], text: [...]}`` (the hub's flattened layout) in label order -> texts."""
    return [t for _, t in sorted(zip(value["label"], value["text"]))]


def index_to_letter(value) -> str:
    return LETTERS[int(value)]


def upper_letter(value: str) -> str:
    return str(value).strip().upper()


def bool_yes_no(value) -> str:
    if isinstance(value, str):
        value = value.strip().lower() in {"true", "yes", "1"}
    return "yes" if value else "no"


def after_hashes(value: str) -> str:
    """GSM8K: the final answer follows ``####`` at the end of the rationale."""
    return value.rsplit("####", 1)[-1].strip().replace(",", "")


def join_lines(value) -> str:
    """A list of lines (FOLIO v0.0's premises) joined, or one text of lines (v2's) as it is."""
    return "\n".join(value) if isinstance(value, list) else str(value)


def integer_string(value) -> str:
    return str(int(str(value).strip()))


def drop_pipe_alternatives(value: str) -> str:
    """simple-evals DROP: alternatives joined by ``|``, each a single span -> JSON [[span], ...]."""
    return json.dumps([[alt.strip()] for alt in value.split("|")])


def drop_spans(value: dict) -> str:
    """Hub DROP ``answers_spans``: the spans of one multi-span answer -> JSON [[span, ...]]."""
    return json.dumps([list(value["spans"])])


def drop_annotations(value: list) -> str:
    """EleutherAI/drop ``[answer, validated_answers]`` -> JSON [[span, ...], ...]: one alternative per annotation.

    Each annotation is a number, a list of spans (one multi-span answer) or a date ("day month year", as the
    official evaluator writes it); empty and repeated annotations are dropped, the first annotator's first.
    """
    answer, validated = value
    alternatives: list[list[str]] = []
    for annotation in [answer, *_annotations(validated)]:
        spans = _annotation_spans(annotation)
        if spans and spans not in alternatives:
            alternatives.append(spans)
    return json.dumps(alternatives)


def _annotations(validated) -> list[dict]:
    """``validated_answers`` as a list of annotations, whether stored as a list or as a dict of lists."""
    if isinstance(validated, list):
        return validated
    count = len(validated.get("number") or [])
    return [{key: column[i] for key, column in validated.items()} for i in range(count)]


def _annotation_spans(annotation: dict) -> list[str]:
    if str(annotation.get("number") or "").strip():
        return [str(annotation["number"]).strip()]
    spans = [s.strip() for s in annotation.get("spans") or [] if s.strip()]
    if spans:
        return spans
    date = annotation.get("date") or {}
    text = " ".join(str(date.get(k) or "").strip() for k in ("day", "month", "year"))
    return [" ".join(text.split())] if text.strip() else []


def drop_passage(value: str) -> str:
    """simple-evals DROP ``context`` = ``Passage: ...\\nQuestion: ...\\nAnswer:`` -> the passage."""
    return value.split("\nQuestion:", 1)[0].removeprefix("Passage:").strip()


def drop_question(value: str) -> str:
    return value.split("\nQuestion:", 1)[-1].rsplit("\nAnswer:", 1)[0].strip()


def identity(value):
    return value if isinstance(value, list) else str(value).strip()


# --- the paper's harness's golds (the ``hott`` protocol): the text its ``reason/`` formatters build -----------------

def as_text(value) -> str:
    """``str(value)``, unstripped (a bool becomes ``True``/``False``, as the fork's ``str(example["answer"])``)."""
    return str(value)


def after_hashes_raw(value: str) -> str:
    """GSM8K as the fork splits it: the text after the last ``####``, stripped, commas kept."""
    return value.split("####")[-1].strip()


def index_plus_one(value) -> str:
    """A 0-based option index as the fork's 1-based option number."""
    return str(int(value) + 1)


def letter_to_number(value: str) -> str:
    """An option letter (``a``/``B``) as its 1-based number (the local LogiQA copy stores letters)."""
    return str(LETTERS.index(str(value).strip().upper()) + 1)


def spans_list_text(value: dict) -> str:
    """Hub DROP ``answers_spans`` as the fork's gold: the text of the Python list of its spans."""
    return str(list(value["spans"]))


def pipe_spans_list_text(value: str) -> str:
    """simple-evals DROP ``ref_text`` (``|``-joined golds) as the text of a Python list of spans."""
    return str([alt.strip() for alt in value.split("|")])


TRANSFORMS: dict[str, Callable] = {f.__name__: f for f in (
    label_text_choices, columns_choices, index_to_letter, upper_letter, bool_yes_no, after_hashes, join_lines,
    integer_string, drop_pipe_alternatives, drop_spans, drop_annotations, drop_passage, drop_question, identity,
    as_text, after_hashes_raw, index_plus_one, letter_to_number, spans_list_text, pipe_spans_list_text,
)}


def resolve_field(record: dict, spec) -> object:
    """Apply one field spec to a raw record (KeyError names the missing path)."""
    if isinstance(spec, str):
        return identity(get_path(record, spec))
    source = spec["from"]
    value = [get_path(record, p) for p in source] if isinstance(source, list) else get_path(record, source)
    return TRANSFORMS[spec.get("transform", "identity")](value)


def spec_transform_names(spec) -> list[str]:
    return [] if isinstance(spec, str) else [spec.get("transform", "identity")]
