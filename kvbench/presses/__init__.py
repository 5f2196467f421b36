"""Eviction policies ("presses") and their registry."""

from __future__ import annotations

import dataclasses
import typing

from kvbench.errors import KvbenchError
from kvbench.presses.base import Press
from kvbench.presses.full import FullPress
from kvbench.presses.h2o import H2OPress
from kvbench.presses.knorm import KNormPress
from kvbench.presses.random import RandomPress
from kvbench.presses.rkv import RKVPress
from kvbench.presses.rpc import RPCPress
from kvbench.presses.scope import SCOPEPress
from kvbench.presses.snapkv_d import SnapKVDecodingPress
from kvbench.presses.streaming_llm import StreamingLLMPress
from kvbench.presses.tova import TOVAPress

PRESSES: dict[str, type[Press]] = {
    cls.name: cls
    for cls in (
        FullPress, StreamingLLMPress, H2OPress, SnapKVDecodingPress, KNormPress, RKVPress, RandomPress, TOVAPress,
        RPCPress, SCOPEPress,
    )
}

__all__ = ["PRESSES", "Press", "PressError", "make_press", "parse_bool", "parse_press_args", "press_parameters"]


class PressError(KvbenchError, ValueError):
    """Unknown press or bad press parameter."""


def press_parameters(name: str) -> list[tuple[str, type, object, str]]:
    """(name, type, default, help) of each parameter of press ``name``; help comes from the ``#:`` comments."""
    cls = _press_class(name)
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    return [(f.name, hints[f.name], f.default, docs.get(f.name, "")) for f in dataclasses.fields(cls)]


def make_press(name: str, args: dict[str, str] | None = None) -> Press:
    """Instantiate press ``name`` with string arguments converted to each field's type."""
    cls = _press_class(name)
    known = {p[0]: p[1] for p in press_parameters(name)}
    kwargs = {}
    for key, raw in (args or {}).items():
        if key not in known:
            raise PressError(f"press {name!r} has no parameter {key!r} (parameters: {', '.join(known)})")
        kwargs[key] = _convert(name, key, raw, known[key])
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise PressError(str(err)) from err


def parse_press_args(items: list[str], presses: list[str]) -> dict[str, dict[str, str]]:
    """Split ``key=value`` / ``press.key=value`` items into per-press argument dicts.

    A bare key applies to every selected press that has that parameter; it is an error if none has it.
    """
    out: dict[str, dict[str, str]] = {p: {} for p in presses}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PressError(f"--press-arg {item!r} is not key=value")
        key, value = key.strip(), value.strip()
        scope, dot, param = key.rpartition(".")
        if dot:
            if scope not in out:
                raise PressError(f"--press-arg {item!r} names press {scope!r}, which is not selected")
            targets = [scope]
        else:
            param = key
            targets = [p for p in presses if param in {q[0] for q in press_parameters(p)}]
            if not targets:
                raise PressError(f"--press-arg {item!r}: no selected press has a parameter {param!r}")
        for press in targets:
            out[press][param] = value
    return out


def _press_class(name: str) -> type[Press]:
    try:
        return PRESSES[name]
    except KeyError:
        raise PressError(f"unknown press {name!r} (known: {', '.join(PRESSES)})") from None


def parse_bool(text: str) -> bool:
    """true/false, yes/no or 1/0 (any case); ValueError otherwise."""
    lowered = text.strip().lower()
    if lowered not in {"true", "false", "1", "0", "yes", "no"}:
        raise ValueError(f"{text!r} is not a boolean")
    return lowered in {"true", "1", "yes"}


def _convert(press: str, key: str, raw: str, kind: type):
    try:
        return parse_bool(raw) if kind is bool else kind(raw)
    except ValueError:
        raise PressError(f"press {press!r}: {key}={raw!r} is not a valid {kind.__name__}") from None


def _field_docs(cls: type) -> dict[str, str]:
    """Collect ``#:`` comments written above dataclass fields, walking the class hierarchy."""
    import inspect

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        pending: list[str] = []
        for line in lines:
            stripped = line.strip()
            if stripped.startswith("#:"):
                pending.append(stripped[2:].strip())
            elif pending and ":" in stripped and not stripped.startswith(("def", "@", "#")):
                docs[stripped.split(":")[0].strip()] = " ".join(pending)
                pending = []
            else:
                pending = []
    return docs
