"""Append-only Parquet result store: one row per (run, example, sample).

Every append writes a new ``part-*.parquet`` through a temporary file and an atomic rename, so a killed
run loses at most the rows in flight and never leaves a half-written part. Re-running skips stored rows.
Small parts are merged (``kvbench.store.compaction``): a merged part supersedes the parts its journal under
``compactions/`` names, so a reader never counts a row twice, whenever a compaction was killed.

Parts written by other tools are read as kvbench's: any Arrow string type is a string column, and integers,
floats and timestamps widen to the schema's types (``conformable``). Readers project the columns they need and
scan every part at once (``pyarrow.dataset``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kvbench.errors import MOVE_ASIDE, StoreError
from kvbench.store.journals import superseded

SCHEMA = pa.schema([
    ("run_key", pa.string()),
    ("kind", pa.string()),  # "generate" (null in older parts) or "fidelity" (teacher-forced replay)
    ("created_at", pa.timestamp("ms", tz="UTC")),
    # what was run
    ("model", pa.string()),
    ("model_source", pa.string()),
    ("model_revision", pa.string()),
    ("press", pa.string()),
    ("press_args", pa.string()),  # JSON of every press parameter, defaults included
    ("budget", pa.int64()),  # null = full cache
    ("buffer", pa.int64()),
    ("dataset", pa.string()),
    ("dataset_version", pa.int64()),
    ("split", pa.string()),
    # where the examples were read: hub:<repo>@<commit>, mirror:<repo>@sha256:.., local:sha256:.., builtin:<name>
    ("dataset_revision", pa.string()),
    ("prompt_hash", pa.string()),
    ("example_id", pa.string()),
    ("sample", pa.int64()),
    ("seed", pa.int64()),
    ("max_new_tokens", pa.int64()),
    ("temperature", pa.float64()),
    ("top_p", pa.float64()),
    ("top_k", pa.int64()),  # 0 = no top-k filter (null in older parts)
    ("repetition_penalty", pa.float64()),  # 1 = none (null in older parts)
    ("protocol", pa.string()),  # kvbench.tasks.protocols (null in older parts = "kvbench")
    ("stop_on_loop", pa.bool_()),  # --stop-on-loop (null in older parts = false)
    ("compile", pa.string()),  # --compile: the torch.compile backend of the decoding step (null: eager)
    # what came out
    ("prompt", pa.string()),
    ("response", pa.string()),
    ("gold", pa.string()),
    ("extracted", pa.string()),  # null = no answer found (invalid)
    ("correct", pa.bool_()),
    ("metrics", pa.string()),  # JSON of the scorer's extra metrics (DROP f1, MATH strict_match)
    ("finish_reason", pa.string()),  # eos / stop / length / loop
    # telemetry
    ("prompt_tokens", pa.int64()),
    ("output_tokens", pa.int64()),
    ("prefill_s", pa.float64()),
    ("decode_s", pa.float64()),
    ("tokens_per_s", pa.float64()),
    ("compile_s", pa.float64()),  # --compile: the forwards that compiled a graph, left out of decode_s (null: eager)
    ("peak_kv_bytes", pa.int64()),  # on the device
    ("host_kv_bytes", pa.int64()),  # offloaded to host memory (ShadowKV's values; 0 otherwise)
    ("evicted_tokens", pa.float64()),
    ("mean_cache_len", pa.float64()),
    ("looped", pa.bool_()),  # degenerate repetition detected (always measured)
    ("loop_start", pa.int64()),  # output token at which it was detected
    ("kv_byte_steps", pa.float64()),  # KV bytes held, summed over decoding steps (footprint over time)
    ("batch_size", pa.int64()),  # sequences decoding at once (null in older parts)
    ("batching", pa.string()),  # "continuous" or "static": what the timings were measured under (null: static)
    ("attention_loss_mean", pa.float64()),  # with --measure attention-loss: mass on evicted entries
    ("attention_loss_max", pa.float64()),
    ("attention_loss_profile", pa.string()),  # JSON: per-layer means and a layer x step-bin heatmap
    ("retention_mean", pa.float64()),  # with --measure retention: share of critical prompt tokens held
    ("retention_end", pa.float64()),  # ... after the last step
    ("retention_profile", pa.string()),  # JSON: per-layer means
    ("fidelity_kl_mean", pa.float64()),  # kind=fidelity: KL(full || compressed) of next-token distributions
    ("fidelity_kl_max", pa.float64()),
    ("fidelity_top1", pa.float64()),  # share of steps whose top-1 token equals the full cache's
    ("fidelity_rank_mean", pa.float64()),  # mean rank of the full cache's token under the press (0 = top)
    # provenance
    ("kvbench_version", pa.string()),
    ("git_commit", pa.string()),
    ("torch_version", pa.string()),
    ("transformers_version", pa.string()),
    ("device", pa.string()),
    ("dtype", pa.string()),
])


#: store directory -> part name -> run_key -> {(example_id, sample)}: the keys each part holds (a part's keys never
#: change once written), filled by ``ResultStore.done``; a part merged away drops out.
_KEY_INDEX: dict[Path, dict[str, dict[str, set[tuple[str, int]]]]] = {}




def unreadable(part: Path, err: Exception) -> StoreError:
    """The one-line error of a part that is not readable Parquet (corrupt, truncated, or not Parquet at all)."""
    return StoreError(f"{part}: unreadable Parquet part ({(str(err).splitlines() or [''])[0]}); {MOVE_ASIDE}")


def part_schema(part: Path) -> pa.Schema:
    """A part's schema, from its footer alone (no rows read)."""
    try:
        return pq.read_schema(part)
    except (pa.ArrowInvalid, OSError) as err:
        raise unreadable(part, err) from None


def conformable(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Whether a column of type ``actual`` reads as ``expected`` without losing what it says: any Arrow string type
    (or dictionary of strings, as pandas' categoricals) for a string, a narrower integer or float for a wider one,
    a float for an integer (pandas stores an integer column with missing values as floats: read, each value must
    be whole), any timestamp for a timestamp, null for anything."""
    if actual == expected or pa.types.is_null(actual):
        return True
    if pa.types.is_dictionary(actual):
        return conformable(actual.value_type, expected)
    kinds = ((pa.types.is_string, lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)
              or pa.types.is_string_view(t)),
             (pa.types.is_integer, lambda t: pa.types.is_floating(t) or pa.types.is_integer(t) and t.bit_width <= 64
              and not (pa.types.is_unsigned_integer(t) and t.bit_width == 64)),
             (pa.types.is_floating, lambda t: pa.types.is_floating(t) and t.bit_width <= expected.bit_width),
             (pa.types.is_timestamp, pa.types.is_timestamp))
    return any(is_expected(expected) and accepts(actual) for is_expected, accepts in kinds)


class ResultStore:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def parts(self) -> list[Path]:
        """The live parts: every ``part-*.parquet`` but those a finished compaction has merged (``compaction``)."""
        if not self.path.is_dir():
            return []
        found = sorted(self.path.glob("part-*.parquet"))
        gone = superseded(self.path, {p.name for p in found})
        return [p for p in found if p.name not in gone] if gone else found

    def read(self, columns: list[str] | None = None, where=None) -> pa.Table:
        """Every live part's rows in kvbench's schema, only ``columns`` (default all), only the rows ``where`` (a
        ``pyarrow.dataset`` expression) keeps: one scan over all parts."""
        import pyarrow.dataset as ds

        def scan() -> pa.Table:
            parts = self.parts()
            if not parts:
                empty = SCHEMA.empty_table()
                return empty if columns is None else empty.select(columns)
            try:
                dataset = ds.dataset([str(p) for p in parts], schema=SCHEMA, format="parquet")
                return dataset.to_table(columns=columns, filter=where)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OSError) as err:
                if isinstance(err, FileNotFoundError):  # merged away meanwhile: list again
                    raise
                for part in parts:  # name the part at fault, with the one-line error its own read gives
                    self.read_part(part)
                raise StoreError(f"{self.path}: cannot read the store ({str(err).splitlines()[0]})") from None

        return _relisting(scan)

    @staticmethod
    def read_part(part: Path, columns: list[str] | None = None) -> pa.Table:
        """One part, conformed to the current schema (columns added since it was written read as null)."""
        ResultStore.check_part(part)
        try:
            table = pq.read_table(part)
        except (pa.ArrowInvalid, OSError) as err:
            raise unreadable(part, err) from None
        columns_out = []
        for f in SCHEMA:
            if f.name not in table.column_names:
                columns_out.append(pa.nulls(table.num_rows, f.type))
                continue
            column = table[f.name]
            if pa.types.is_dictionary(column.type):
                column = column.cast(column.type.value_type)
            try:
                columns_out.append(column.cast(f.type, safe=not pa.types.is_timestamp(f.type)))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                raise StoreError(f"{part}: column {f.name} does not read as {f.type} ({str(err).splitlines()[0]}); "
                                 f"{MOVE_ASIDE}") from None
        table = pa.Table.from_arrays(columns_out, schema=SCHEMA)
        return table if columns is None else table.select(columns)

    def _sweep_stale_temp_files(self, older_than_s: float = 3600.0) -> None:
        """Remove temp files a killed writer left (a live write takes seconds, so an hour-old one is dead)."""
        import time

        cutoff = time.time() - older_than_s
        for tmp in [*self.path.glob(".*.tmp"), *self.path.glob("failures/.*.tmp")]:
            with contextlib.suppress(OSError):
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()

    def check_writable(self, parts: bool = True, write: bool = True) -> None:
        """Fail before any work when rows could not be stored: a file in the way, no permission (``write``), or
        (``parts``) a part that is not kvbench's. ``write=False`` checks a store that will only be read."""
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"store {self.path} is a file, not a directory: give --store a directory")
        for folder in ("locks", "failures", "compactions"):  # kvbench's own folders inside a store
            if (self.path / folder).exists() and not (self.path / folder).is_dir():
                raise StoreError(f"{self.path / folder} is a file where kvbench keeps its {folder} folder; "
                                 f"{MOVE_ASIDE}")
        existing = self.path if self.path.exists() else next(p for p in self.path.parents if p.exists())
        if write and (not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK)):
            raise StoreError(f"store {self.path}: cannot write in {existing}")
        for part in self.parts() if parts else []:  # a foreign file fails here, not after the work
            self.check_part(part)
        for record in sorted((self.path / "failures").glob("*.json")) if parts else []:
            _failure_record(record)

    @staticmethod
    def check_part(part: Path) -> None:
        """A part's schema (not its rows) matches kvbench's: its key columns, and every column of a type that reads
        as kvbench's (``conformable``)."""
        schema = part_schema(part)
        if not {"run_key", "example_id", "sample"} <= set(schema.names):
            raise StoreError(f"{part}: not a kvbench result part (no run_key, example_id, sample); {MOVE_ASIDE}")
        for field in SCHEMA:
            if field.name in schema.names and not conformable(schema.field(field.name).type, field.type):
                raise StoreError(f"{part}: column {field.name} is {schema.field(field.name).type}, not "
                                 f"{field.type}; {MOVE_ASIDE}")

    def replace_part(self, part: Path, rows: list[dict]) -> None:
        """Atomically rewrite one part (``kvbench score``); the old file stays whole until the rename."""
        tmp = part.with_name(f".{part.name}.{uuid.uuid4().hex[:8]}.tmp")  # concurrent scorers never share one
        try:
            pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
            os.replace(tmp, part)
        except OSError as err:
            raise StoreError(f"cannot rewrite {part}: {err.strerror or err}") from None

    # --- failures: kept beside the results, so a retried success never duplicates a row --------------------
    def _failure_path(self, run_key: str, example_id: str, sample: int) -> Path:
        digest = hashlib.sha256(f"{run_key}/{example_id}/{sample}".encode()).hexdigest()[:16]
        return self.path / "failures" / f"{run_key}-{digest}.json"

    def record_failure(self, run_key: str, example_id: str, sample: int, error: str, context: dict) -> None:
        path = self._failure_path(run_key, example_id, sample)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        payload = {"run_key": run_key, "example_id": example_id, "sample": sample, "error": error, **context}
        try:
            tmp.write_text(json.dumps(payload, default=str))
            os.replace(tmp, path)
        except OSError as err:  # e.g. the disk is full: the failure is not recorded, the run goes on
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot record a failure in {path.parent}: {err.strerror or err}") from None

    def clear_failure(self, run_key: str, example_id: str, sample: int) -> None:
        self._failure_path(run_key, example_id, sample).unlink(missing_ok=True)

    def failures(self, run_key: str | None = None) -> list[dict]:
        """Recorded failures of examples not stored since (a kill between the two writes leaves such a record)."""
        return [record for _, record, stored in self._failure_records(run_key) if not stored]

    def clear_stale_failures(self, run_key: str) -> None:
        """Delete the failure records of ``run_key``'s examples that are stored."""
        for path, _, stored in self._failure_records(run_key):
            if stored:
                path.unlink(missing_ok=True)

    def _failure_records(self, run_key: str | None) -> list[tuple[Path, dict, bool]]:
        """(file, record, whether the example has been stored since) of each failure record."""
        folder = self.path / "failures"
        pattern = f"{run_key}-*.json" if run_key else "*.json"
        files = sorted(folder.glob(pattern)) if folder.is_dir() else []
        records = [(path, _failure_record(path)) for path in files]
        done = {key: self.done(key) for key in {record["run_key"] for _, record in records}}
        return [(path, r, (r["example_id"], r["sample"]) in done[r["run_key"]]) for path, r in records]

    def lock(self, run_key: str):
        """An inter-process lock for one run: whoever holds it is the only writer of that run's rows."""
        from filelock import FileLock

        folder = self.path / "locks"
        folder.mkdir(parents=True, exist_ok=True)
        return FileLock(str(folder / f"{run_key}.lock"))

    def done(self, run_key: str) -> set[tuple[str, int]]:
        """(example_id, sample) pairs already stored for ``run_key``.

        A part's keys never change once written (``kvbench score`` rewrites scores only), so each part is read
        once per process: a sweep asking this for every run stays linear in the number of parts.
        """
        out: set[tuple[str, int]] = set()
        for keys in self._index().values():
            out |= keys.get(run_key, set())
        return out

    def parts_of(self, run_keys: set[str]) -> list[Path]:
        """The live parts holding rows of ``run_keys``."""
        index = self._index()
        return [self.path / name for name in sorted(index) if not index[name].keys().isdisjoint(run_keys)]

    def rows_of(self, run_keys: set[str]) -> list[dict]:
        """The stored rows of ``run_keys``, reading only the parts that hold them (the ``done`` index)."""
        import pyarrow.dataset as ds

        def read() -> list[dict]:
            parts = self.parts_of(run_keys)
            where = ds.field("run_key").isin(sorted(run_keys))
            return ds.dataset([str(p) for p in parts], schema=SCHEMA, format="parquet").to_table(
                filter=where).to_pylist() if parts else []

        return _relisting(read)

    def _index(self) -> dict[str, dict[str, set[tuple[str, int]]]]:
        """The key index of the live parts, the parts not yet indexed read in one scan (and added only once all
        are read: a part merged away meanwhile makes the scan start again)."""
        return _relisting(self._index_once)

    def _index_once(self) -> dict[str, dict[str, set[tuple[str, int]]]]:
        import pyarrow.dataset as ds

        index = _KEY_INDEX.setdefault(self.path.resolve(), {})
        live = {p.name: p for p in self.parts()}
        for name in set(index) - set(live):  # merged away by a compaction
            del index[name]
        new = [live[name] for name in sorted(set(live) - set(index))]
        if new:  # (their schemas were checked before the work: ``check_writable``)
            columns = ["run_key", "example_id", "sample"]
            scanner = ds.dataset([str(p) for p in new], schema=SCHEMA, format="parquet").scanner(columns=columns)
            found: dict[str, dict[str, set[tuple[str, int]]]] = {part.name: {} for part in new}
            for tagged in scanner.scan_batches():
                keys = found[Path(tagged.fragment.path).name]
                batch = tagged.record_batch
                for k, e, n in zip(*(batch.column(c).to_pylist() for c in columns)):
                    keys.setdefault(k, set()).add((e, n))
            index.update(found)
        return index

    def append(self, rows: list[dict]) -> Path | None:
        if not rows:
            return None
        self._sweep_stale_temp_files()
        return write_part(self.path, pa.Table.from_pylist(rows, schema=SCHEMA), rows[0]["created_at"])


def _relisting(read, attempts: int = 5):
    """``read()``, again from a fresh listing of the parts when a compaction removed one it was reading."""
    for attempt in range(attempts):
        try:
            return read()
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _failure_record(path: Path) -> dict:
    """A failure record, or one line naming the file that is not one."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not (isinstance(record, dict) and {"run_key", "example_id", "sample"} <= set(record)):
            raise ValueError("no run_key, example_id and sample")
    except (OSError, ValueError) as err:
        raise StoreError(f"{path}: not a kvbench failure record ({err}); {MOVE_ASIDE}") from None
    return record


def write_part(folder: Path, table: pa.Table, stamp) -> Path:
    """``table`` as a new ``part-<stamp>-<random>.parquet`` in ``folder``, written to a temp file and renamed, so a
    reader never sees half a part (the result store's rows, and ``kvbench bench``'s under ``STORE/bench/``)."""
    name = f"part-{stamp.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}.parquet"
    tmp = folder / f".{name}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp)
        os.replace(tmp, folder / name)
    except OSError as err:
        tmp.unlink(missing_ok=True)  # a full disk leaves no empty temp file behind
        raise StoreError(f"cannot write to store {folder}: {err.strerror or err}") from None
    return folder / name
