"""The checks every command makes before its work, in one place: whichever command meets a bad value, store or
output path, it says so in the same one line, and no model loads and nothing is written before.

Press fields are checked by the presses themselves (``kvbench.presses``), generation settings by ``run.build_cells``
and dataset configs as they load (``kvbench.tasks.validate``); the commands reach them through ``run.plan``,
``sweep.read_grid``, ``bench.validate``, ``rescore`` and ``report.render``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from kvbench.errors import MOVE_ASIDE, ConfigError, StoreError
from kvbench.store import ResultStore, part_schema

#: what every part under ``STORE/bench/`` has, old parts included (``bench_results.bench_schema`` has more since)
BENCH_COLUMNS = ("created_at", "model", "press", "budget", "batch", "tokens_per_s")


def choice(flag: str, value: str, known: Iterable[str]) -> str:
    known = list(known)
    if value not in known:
        raise ConfigError(f"unknown {flag} {value!r} (known: {', '.join(known)})")
    return value


def output_file(flag: str, path: Path | None) -> None:
    """A file kvbench will write: not a directory, under a directory it may create or write in."""
    if path is not None and path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory: give a file name")
    if path is not None:
        _writable_under(flag, path, path.parent)


def output_dir(flag: str, path: Path | None, files: tuple[str, ...] = ()) -> None:
    """A directory kvbench will write ``files`` in: not a file, creatable or writable, none of ``files`` a
    directory."""
    if path is not None and path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file: give a directory")
    if path is None:
        return
    _writable_under(flag, path, path)
    for name in files:
        if (path / name).is_dir():
            raise ConfigError(f"{flag} {path}: {path / name} is a directory, where kvbench writes its {name}")


def _writable_under(flag: str, path: Path, folder: Path) -> None:
    """``folder`` (or the nearest folder above it that exists, under which it will be made) is a directory this
    process may write in."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{flag} {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: cannot write in {existing}")


def store_to_write(path: str | Path) -> ResultStore:
    """A store rows can be added to: a directory (or creatable) that kvbench may write, holding only its parts."""
    store = ResultStore(path)
    store.check_writable()
    return store


def store_to_read(path: str | Path) -> ResultStore:
    """A store that holds results, every part of them kvbench's (checked by schema, before any row is read)."""
    store = ResultStore(path)
    store.check_writable(write=False)
    if not store.parts():
        raise StoreError(f"no results in {path}")
    return store


def bench_parts(store: str | Path, required: bool) -> list[Path]:
    """``STORE/bench/``'s parts, each a readable Parquet file with the bench columns."""
    folder = Path(store) / "bench"
    parts = sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []
    if required and not parts:
        raise StoreError(f"no benchmark results in {store} (run `kvbench bench --store {store}`)")
    for part in parts:
        names = part_schema(part).names
        missing = [c for c in BENCH_COLUMNS if c not in names]
        if missing:
            raise StoreError(f"{part}: not a kvbench bench part (no {', '.join(missing)}); {MOVE_ASIDE}")
    return parts
