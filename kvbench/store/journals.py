"""Compaction journals (``STORE/compactions/<id>.json``): which parts a merged part replaces. Readers consult them
to skip replaced parts that a killed compaction left (``kvbench.store.compaction`` writes them)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from kvbench.errors import MOVE_ASIDE, StoreError

JOURNALS = "compactions"


def superseded(store_dir: Path, present: set[str]) -> set[str]:
    """Names of parts that a finished compaction has merged (its merged part is among ``present``)."""
    folder = store_dir / JOURNALS
    if not folder.is_dir():
        return set()
    out: set[str] = set()
    for journal in sorted(folder.glob("*.json")):
        record = read_journal(journal)
        if record["merged"] in present:
            out |= set(record["replaces"])
    return out


def read_journal(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not (isinstance(record, dict) and isinstance(record.get("merged"), str)
                and isinstance(record.get("replaces"), list)):
            raise ValueError("no merged part and replaced parts")
    except (OSError, ValueError) as err:
        raise StoreError(f"{path}: not a kvbench compaction journal ({err}); {MOVE_ASIDE}") from None
    return record


def write_journal(store_dir: Path, merged: str, replaces: list[str]) -> Path:
    """The journal of a compaction merging ``replaces`` into ``merged``, written whole (temp file, rename)."""
    folder = store_dir / JOURNALS
    folder.mkdir(exist_ok=True)
    path = folder / f"{merged.removesuffix('.parquet')}.json"
    tmp = folder / f".{path.name}.tmp"
    tmp.write_text(json.dumps({"merged": merged, "replaces": replaces}), encoding="utf-8")
    os.replace(tmp, path)
    return path
