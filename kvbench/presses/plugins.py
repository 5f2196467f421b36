"""Presses from outside kvbench: a class named by its import path (``my_package.module:MyPress``) or by a file
(``path/to/my_press.py:MyPress``), or registered by an installed package under the entry-point group
``kvbench.presses`` (then it is used by the entry point's name, like a built-in press).

A plug-in press is a ``Press`` subclass written as a dataclass, exactly as the built-ins are. Its label in results
is the name it was given by (the import path, the file path, or the entry point's name); ``origin`` records the
class it resolved to, and the run key holds it with the parameters and ``revision``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import os
import sys
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from kvbench.errors import KvbenchError
from kvbench.presses.base import Press

ENTRY_POINT_GROUP = "kvbench.presses"
FORMS = "a plug-in press is module.path:Class or path/to/file.py:Class"


class PluginError(KvbenchError, ValueError):
    """A plug-in press that cannot be imported or is not a press; ``missing``: its module or file was not found."""

    def __init__(self, message: str, missing: bool = False):
        super().__init__(message)
        self.missing = missing


def is_import_spec(name: str) -> bool:
    """True if ``name`` names a class by module or file (``target:Class``) rather than a registered press."""
    target, sep, attr = name.rpartition(":")
    return bool(sep and target and attr)


@functools.cache
def load_class(spec: str) -> tuple[type[Press], str]:
    """The press class ``spec`` names, and its origin (``module:Class`` or ``file.py:Class``)."""
    target, sep, attr = spec.rpartition(":")
    if not (sep and target and attr):
        raise PluginError(f"press {spec!r}: {FORMS}")
    from_file = target.endswith(".py") or "/" in target or os.sep in target
    module = _module_from_file(spec, Path(target)) if from_file else _import_module(spec, target)
    found = module
    for part in attr.split("."):
        found = getattr(found, part, None)
        if found is None:
            raise PluginError(f"press {spec!r}: {target!r} has no {attr!r}")
    origin = f"{os.path.normpath(target)}:{attr}" if from_file else f"{module.__name__}:{attr}"
    return checked_class(spec, found), origin


def checked_class(spec: str, found: object) -> type[Press]:
    """``found`` if it is a press class kvbench can build, else a one-line error."""
    if not (isinstance(found, type) and issubclass(found, Press)):
        what = getattr(found, "__qualname__", repr(found))
        raise PluginError(f"press {spec!r}: {what} is not a subclass of kvbench.presses.base.Press")
    if "__dataclass_fields__" not in vars(found):
        raise PluginError(f"press {spec!r}: {found.__name__} must be a @dataclass (its fields are its parameters)")
    if found.evicts and found.score is Press.score:
        raise PluginError(f"press {spec!r}: {found.__name__} evicts but does not define score(view)")
    return found


def _import_module(spec: str, target: str):
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as err:
        # as `python -m` does, a module beside the working directory imports too
        if err.name != target.split(".")[0] or os.getcwd() in sys.path:
            raise PluginError(f"press {spec!r}: cannot import {target!r} ({err}); {FORMS}", missing=True) from None
        sys.path.append(os.getcwd())
        return _import_module(spec, target)
    except Exception as err:  # the plug-in's own code failed while importing
        raise PluginError(f"press {spec!r}: importing {target!r} failed: {type(err).__name__}: {err}") from None


def _module_from_file(spec: str, path: Path):
    if not path.is_file():
        raise PluginError(f"press {spec!r}: no file {str(path)!r}; {FORMS}", missing=True)
    resolved = path.resolve()
    # one module per file, under a name that cannot clash with an importable one
    name = f"kvbench_plugin_{resolved.stem}_{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, resolved)
    if loader_spec is None:  # not a source file Python can import (a .txt, a directory)
        raise PluginError(f"press {spec!r}: {str(path)!r} is not a Python file (.py); {FORMS}")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # dataclasses and typing look the module up while the class is made
    try:
        loader_spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise PluginError(f"press {spec!r}: loading {str(path)!r} failed: {type(err).__name__}: {err}") from None
    return module


@functools.cache
def installed() -> dict[str, EntryPoint]:
    """Entry points of the ``kvbench.presses`` group, by name (first one wins if two packages share a name)."""
    found: dict[str, EntryPoint] = {}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(point.name, point)
    return found


@functools.cache
def load_entry_point(name: str) -> tuple[type[Press], str]:
    """The class behind the installed press ``name``, and its origin (the entry point's ``module:Class``)."""
    point = installed()[name]
    try:
        found = point.load()
    except Exception as err:
        raise PluginError(f"press {name!r} (entry point {point.value!r}): {type(err).__name__}: {err}") from None
    return checked_class(name, found), point.value
