"""Eviction policies ("presses") and their registry."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing

from kvbench.errors import KvbenchError
from kvbench.presses.adakv import AdaKVPress
from kvbench.presses.base import Press
from kvbench.presses.expected_attention import ExpectedAttentionPress
from kvbench.presses.full import FullPress
from kvbench.presses.gkv import GKVPress
from kvbench.presses.h2o import H2OPress
from kvbench.presses.hott_fixed import HottH2OFixedPress, HottRKVFixedPress, HottSnapKVDFixedPress
from kvbench.presses.hott_h2o import HottH2OPress
from kvbench.presses.hott_knorm import HottKNormPress
from kvbench.presses.hott_rkv import HottRKVPress
from kvbench.presses.hott_snapkv_d import HottSnapKVDPress
from kvbench.presses.hott_streaming_llm import HottStreamingLLMPress
from kvbench.presses.keydiff import KeyDiffPress
from kvbench.presses.knorm import KNormPress
from kvbench.presses.morphkv import MorphKVPress
from kvbench.presses.plugins import PluginError, installed, is_import_spec, load_class, load_entry_point
from kvbench.presses.probe import probe
from kvbench.presses.pyramidkv import PyramidKVPress
from kvbench.presses.quest import QuestPress
from kvbench.presses.random import RandomPress
from kvbench.presses.rkv import RKVPress
from kvbench.presses.rlkv import RLKVPress
from kvbench.presses.rpc import RPCPress
from kvbench.presses.scope import SCOPEPress
from kvbench.presses.sepllm import SepLLMPress
from kvbench.presses.shadowkv import ShadowKVPress
from kvbench.presses.snapkv_d import SnapKVDecodingPress
from kvbench.presses.streaming_llm import StreamingLLMPress
from kvbench.presses.tova import TOVAPress
from kvbench.presses.triattention import TriAttentionPress
from kvbench.presses.wrapper import WrapperPress

PRESSES: dict[str, type[Press]] = {
    cls.name: cls
    for cls in (
        FullPress, StreamingLLMPress, H2OPress, SnapKVDecodingPress, KNormPress, RKVPress, RandomPress, TOVAPress,
        RPCPress, SCOPEPress, ShadowKVPress,
        # the methods a 2026 paper compares against
        KeyDiffPress, ExpectedAttentionPress, MorphKVPress, GKVPress, QuestPress, TriAttentionPress,
        SepLLMPress, RLKVPress,
        # the paper's harness: its rules with its defects fixed, and bug-compatible with its code
        HottH2OFixedPress, HottSnapKVDFixedPress, HottRKVFixedPress,
        HottH2OPress, HottSnapKVDPress, HottRKVPress, HottStreamingLLMPress, HottKNormPress,
    )
}
#: Allocation wrappers, composed with a scoring press as ``wrapper:press`` (``pyramidkv:adakv:snapkv-d``).
WRAPPERS: dict[str, type[WrapperPress]] = {cls.name: cls for cls in (PyramidKVPress, AdaKVPress)}

__all__ = ["PRESSES", "WRAPPERS", "Press", "PressError", "for_tokenizer", "is_press", "make_checked_press",
           "make_press", "parse_bool", "parse_press_args", "press_parameters", "class_parameters", "plugin_presses"]


class PressError(KvbenchError, ValueError):
    """Unknown press or bad press parameter."""


def press_parameters(name: str) -> list[tuple[str, type, object, str]]:
    """(name, type, default, help) of each parameter of press ``name``; help comes from the ``#:`` comments.

    A composition ``wrapper:press`` has the wrapper's own parameters and the press's.
    """
    wrapper, inner = _split_wrapper(name)
    if wrapper:
        return class_parameters(wrapper) + press_parameters(inner)
    return class_parameters(_resolve(name)[0])


def is_press(name: str) -> bool:
    """True if ``name`` is a press or a composition of wrappers with a press."""
    try:
        press_parameters(name)
    except PressError:
        return False
    return True


def make_press(name: str, args: dict[str, str] | None = None) -> Press:
    """Instantiate press ``name`` (or ``wrapper:press``) with string arguments converted to each field's type."""
    known = {p[0]: p[1] for p in press_parameters(name)}
    kwargs = {}
    for key, raw in (args or {}).items():
        if key not in known:
            raise PressError(f"press {name!r} has no parameter {key!r} (parameters: {', '.join(known)})")
        kwargs[key] = _convert(name, key, raw, known[key])
    press = _build(name, kwargs)
    _check_shared_fields(press)
    return press


def for_tokenizer(press: Press, tokenizer) -> Press:
    """``press.for_tokenizer(tokenizer)`` (what it reads of the model's tokenizer resolved), its refusal one line."""
    try:
        return press.for_tokenizer(tokenizer)
    except ValueError as err:
        raise PressError(str(err)) from None


def make_checked_press(name: str, args: dict[str, str] | None = None) -> Press:
    """``make_press``, and for a plug-in (or a wrapper around one) a first call on a made-up cache: a press that
    raises or returns no proper scores is refused in one line before any model loads (``probe``)."""
    press = make_press(name, args)
    level = press
    while level is not None:
        if level.origin is not None:
            probe(press, name)
            break
        level = level.__dict__.get("inner")
    return press


def _build(name: str, kwargs: dict[str, object]) -> Press:
    wrapper, inner = _split_wrapper(name)
    try:
        if wrapper:
            own = {p[0] for p in class_parameters(wrapper)}
            return wrapper(inner=_build(inner, {k: v for k, v in kwargs.items() if k not in own}),
                           **{k: v for k, v in kwargs.items() if k in own})
        cls, origin = _resolve(name)
        press = cls(**kwargs)
    except ValueError as err:
        raise PressError(str(err)) from err
    except Exception as err:  # a plug-in's own checks may raise anything
        raise PressError(f"press {name!r}: {type(err).__name__}: {err}") from None
    if origin is not None:  # a plug-in is labelled by the name it was given; its class is recorded
        object.__setattr__(press, "name", name)
        object.__setattr__(press, "origin", origin)
    return press


def _split_wrapper(name: str) -> tuple[type[WrapperPress] | None, str]:
    """(wrapper class, wrapped press name) for ``wrapper:press``; (None, name) otherwise. A name whose first part
    is not a wrapper is a plug-in press (``module:Class``) as a whole."""
    wrapper, sep, inner = name.partition(":")
    if sep and wrapper in WRAPPERS:
        if not inner:
            raise PressError(f"press wrapper {wrapper!r} wraps a press: {wrapper}:snapkv-d")
        return WRAPPERS[wrapper], inner
    return None, name


def class_parameters(cls: type[Press]) -> list[tuple[str, type, object, str]]:
    """A press class's own parameters (a wrapper's without the press it wraps)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception as err:  # a plug-in's annotation names something its module does not define
        raise PressError(f"press class {cls.__name__}: its field annotations do not resolve ({type(err).__name__}: "
                         f"{err})") from None
    docs = _field_docs(cls)
    skip = ("inner", "buffer") if issubclass(cls, WrapperPress) else ()
    return [(f.name, hints[f.name], f.default, docs.get(f.name, "")) for f in dataclasses.fields(cls)
            if f.name not in skip]


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


def _resolve(name: str) -> tuple[type[Press], str | None]:
    """A press class and, for a plug-in, the class it came from: kvbench's presses first, then a class named by
    module or file, then the installed ``kvbench.presses`` entry points."""
    if name in PRESSES:
        return PRESSES[name], None
    try:
        if is_import_spec(name):
            return load_class(name)
        if name in installed():
            return load_entry_point(name)
    except PluginError as err:
        hint = f" (wrappers: {', '.join(f'{w}:PRESS' for w in WRAPPERS)})" if err.missing else ""
        raise PressError(f"{err}{hint}") from None
    hint = f"; {name!r} is a wrapper: {name}:snapkv-d" if name in WRAPPERS else ""
    known = [*PRESSES, *(p for p in installed() if p not in PRESSES)]
    raise PressError(f"unknown press {name!r} (known: {', '.join(known)}; or module:Class{hint})")


def plugin_presses() -> dict[str, type[Press] | PressError]:
    """Installed plug-in presses by entry-point name (those a built-in name hides are left out), with the class
    each loads or the error it gives."""
    out: dict[str, type[Press] | PressError] = {}
    for name in installed():
        if name not in PRESSES:
            try:
                out[name] = _resolve(name)[0]
            except PressError as err:
                out[name] = err
    return out


def parse_bool(text: str) -> bool:
    """true/false, yes/no or 1/0 (any case); ValueError otherwise."""
    lowered = text.strip().lower()
    if lowered not in {"true", "false", "1", "0", "yes", "no"}:
        raise ValueError(f"{text!r} is not a boolean")
    return lowered in {"true", "1", "yes"}


def _convert(press: str, key: str, raw: str, kind):
    optional = _optional_of(kind)
    if optional is not None:  # ``X | None``: "none" is None, anything else an X
        return None if raw.strip().lower() in ("none", "null") else _convert(press, key, raw, optional)
    if kind not in (bool, int, float, str):
        raise PressError(f"press {press!r}: {key} has type {kind!r}, which -a/--press-arg cannot set (it sets bool, "
                         "int, float, str and their optional forms)")
    try:
        value = parse_bool(raw) if kind is bool else kind(raw)
    except ValueError:
        raise PressError(f"press {press!r}: {key}={raw!r} is not a valid {kind.__name__}") from None
    if kind is float and not math.isfinite(value):
        raise PressError(f"press {press!r}: {key}={raw!r} must be a finite number")
    return value


def _optional_of(kind) -> type | None:
    """X for ``X | None`` or ``Optional[X]``; None for anything else."""
    members = typing.get_args(kind)
    args = [a for a in members if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1 and len(members) == 2:
        return args[0]
    return None


#: Rules for parameters several presses share, checked whatever press has them (each press checks its own too).
CHOICES = {"gqa": ("mean", "max"), "pooling": ("avg", "max")}
MINIMUMS = {"n_sink": 0, "recent_window": 0, "prefill_budget": 0, "outlier_chunks": 0, "window_size": 1,
            "kernel_size": 1, "chunk_size": 1, "rank": 1, "local_window": 1, "ratio": 1}


def _check_shared_fields(press: Press) -> None:
    level = press
    while level is not None:  # a wrapper, the wrappers it wraps, and the scoring press inside
        for f in dataclasses.fields(level):
            value = getattr(level, f.name)
            if f.name in CHOICES and value not in CHOICES[f.name]:
                raise PressError(f"{level.name}: {f.name} must be one of {', '.join(CHOICES[f.name])}, got {value!r}")
            if f.name in MINIMUMS and value < MINIMUMS[f.name]:
                raise PressError(f"{level.name}: {f.name} must be >= {MINIMUMS[f.name]}, got {value}")
        level = level.__dict__.get("inner")


@functools.cache
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
