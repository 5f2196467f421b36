"""Merging a store's small parts into one, atomically: a killed compaction loses and duplicates no row.

A run stores one part per example (so a killed run loses only the rows in flight), which leaves a large grid with
hundreds of thousands of small files, each one a file every reader opens. A compaction streams the parts it
chose into one merged part, then removes them, in an order that makes every interruption safe:

1. the merged rows are written to a temporary file;
2. a journal ``compactions/<id>.json`` names the merged part and the parts it replaces (written, then renamed);
3. the temporary file is renamed to the merged part: from here on readers take it and skip the parts it replaces
   (``superseded``), whether or not they still exist;
4. the replaced parts are deleted, then the journal.

Killed before step 3, the journal names a merged part that does not exist and is ignored; killed after it, the
journal keeps the replaced parts out of every read. The next compaction finishes either case first. One
compaction at a time per store (``locks/compact.lock``); writers are never blocked: a part written meanwhile is not
among those chosen. ``kvbench score`` takes the same lock, so it never rewrites a part being merged.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from kvbench.errors import MOVE_ASIDE, StoreError
from kvbench.store import SCHEMA, ResultStore
from kvbench.store.journals import JOURNALS, read_journal, write_journal

#: Parts at least this large are left as they are: merging them again would rewrite big files for little gain.
SMALL_BYTES = 32 * 2**20
#: ``kvbench report`` merges a writable store's small parts first once it holds this many.
AUTO_PARTS = 1000


@dataclass(frozen=True)
class Compacted:
    """What one compaction did: parts found, parts merged into one, rows they held, and how long it took."""

    parts: int
    merged: int
    rows: int
    seconds: float


def compact(store: ResultStore, run_keys: set[str] | None = None, wait: bool = True) -> Compacted:
    """Merge the store's small parts (``run_keys``' only, when given) into one. ``wait=False`` gives up at once
    when another process is compacting the store (it will merge these parts too)."""
    from filelock import Timeout

    start = time.perf_counter()
    try:
        with compaction_lock(store, wait):
            finish_interrupted(store)
            parts = store.parts() if run_keys is None else store.parts_of(run_keys)
            small = [p for p in parts if p.stat().st_size < SMALL_BYTES]
            rows = merge(store, small) if len(small) > 1 else 0
    except Timeout:
        return Compacted(0, 0, 0, time.perf_counter() - start)
    return Compacted(len(parts), len(small) if rows else 0, rows, time.perf_counter() - start)


def compaction_lock(store: ResultStore, wait: bool = True):
    """The store's one-compaction-at-a-time lock (also held by ``kvbench score`` while it rewrites parts)."""
    from filelock import FileLock

    folder = store.path / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / "compact.lock"), timeout=-1 if wait else 0)


def finish_interrupted(store: ResultStore) -> None:
    """Complete or undo what a killed compaction left: delete the parts a merged part replaces, or the journal of
    a merged part that was never renamed into place."""
    folder = store.path / JOURNALS
    for journal in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        record = read_journal(journal)
        if (store.path / record["merged"]).exists():
            for name in record["replaces"]:
                (store.path / name).unlink(missing_ok=True)
        (store.path / f".{record['merged']}.tmp").unlink(missing_ok=True)
        journal.unlink()


def merge(store: ResultStore, parts: list[Path]) -> int:
    """Steps 1-4 of the module's docstring for ``parts``; returns the rows merged."""
    name = f"part-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}.parquet"
    tmp = store.path / f".{name}.tmp"
    try:
        rows = _stream(parts, tmp)
        journal = write_journal(store.path, name, [p.name for p in parts])
        os.replace(tmp, store.path / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for part in parts:
        part.unlink(missing_ok=True)
    journal.unlink()
    return rows


def _stream(parts: list[Path], out: Path) -> int:
    """Every row of ``parts`` into one Parquet file in kvbench's schema, in row groups of ``ROW_GROUP_BYTES`` at
    most: one-row parts arrive as one-row batches, and a row group each would hold their metadata in memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = 0
    try:
        with pq.ParquetWriter(out, SCHEMA) as writer:
            for group in _row_groups(_batches(parts)):
                writer.write_table(group, row_group_size=group.num_rows)
                rows += group.num_rows
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:
        for part in parts:  # name the part at fault with its own one-line error
            if ResultStore.read_part(part).column("run_key").null_count:
                raise StoreError(f"{part}: rows without a run_key; {MOVE_ASIDE}") from None
        raise StoreError(f"cannot merge the parts of {parts[0].parent} ({str(err).splitlines()[0]})") from None
    return rows


#: Parts scanned as one dataset: pyarrow keeps every scanned fragment's metadata until the dataset is dropped
#: (about 170 KB each: 20,000 one-row parts took 3.4 GB in one dataset, 260 MB in slices of 500).
SCAN_PARTS = 500


def _batches(parts: list[Path]):
    """The rows of ``parts`` in kvbench's schema, ``SCAN_PARTS`` parts at a time."""
    import pyarrow.dataset as ds

    for start in range(0, len(parts), SCAN_PARTS):
        chosen = [str(p) for p in parts[start:start + SCAN_PARTS]]
        yield from ds.dataset(chosen, schema=SCHEMA, format="parquet").scanner(batch_size=65536).to_batches()


#: A merged part's row groups hold about this much (uncompressed): few enough groups, bounded memory.
ROW_GROUP_BYTES = 64 * 2**20


def _row_groups(batches):
    """``batches`` gathered into tables of about ``ROW_GROUP_BYTES`` each, every row checked for its key. Small
    batches are combined as they come (each keeps its own buffers: thousands of one-row batches cost far more
    memory than their rows)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    pending, size = [], 0
    for batch in batches:
        if any(pc.any(pc.is_null(batch.column(c))).as_py() for c in ("run_key", "example_id", "sample")):
            raise pa.ArrowInvalid("a row without run_key, example_id or sample")
        pending.append(batch)
        size += batch.nbytes
        if size >= ROW_GROUP_BYTES:
            yield pa.Table.from_batches(pending, SCHEMA)
            pending, size = [], 0
        elif len(pending) >= 256:
            pending = pa.Table.from_batches(pending, SCHEMA).combine_chunks().to_batches()
    if pending:
        yield pa.Table.from_batches(pending, SCHEMA)
