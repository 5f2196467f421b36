"""Append-only Parquet result store: one row per (run, example, sample).

Every append writes a new ``part-*.parquet`` through a temporary file and an atomic rename, so a killed
run loses at most the rows in flight and never leaves a half-written part. Re-running skips stored rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kvbench.errors import KvbenchError

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
    ("peak_kv_bytes", pa.int64()),  # on the device
    ("host_kv_bytes", pa.int64()),  # offloaded to host memory (ShadowKV's values; 0 otherwise)
    ("evicted_tokens", pa.float64()),
    ("mean_cache_len", pa.float64()),
    ("looped", pa.bool_()),  # degenerate repetition detected (always measured)
    ("loop_start", pa.int64()),  # output token at which it was detected
    ("kv_byte_steps", pa.float64()),  # KV bytes held, summed over decoding steps (footprint over time)
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


#: store directory -> (part names indexed, run_key -> {(example_id, sample)}), filled by ``ResultStore.done``
_KEY_INDEX: dict[Path, tuple[set[str], dict[str, set[tuple[str, int]]]]] = {}


class StoreError(KvbenchError):
    """The store cannot be read or written."""


class ResultStore:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def parts(self) -> list[Path]:
        return sorted(self.path.glob("part-*.parquet")) if self.path.is_dir() else []

    def read(self, columns: list[str] | None = None) -> pa.Table:
        tables = [self.read_part(part, columns) for part in self.parts()]
        if not tables:
            return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)
        return pa.concat_tables(tables)

    @staticmethod
    def read_part(part: Path, columns: list[str] | None = None) -> pa.Table:
        """One part, conformed to the current schema (columns added since it was written read as null)."""
        try:
            table = pq.read_table(part)
        except (pa.ArrowInvalid, OSError) as err:
            raise StoreError(f"{part}: unreadable Parquet part ({err})") from None
        for f in SCHEMA:
            if f.name not in table.column_names:
                table = table.append_column(f, pa.nulls(table.num_rows, f.type))
        table = table.select(SCHEMA.names).cast(SCHEMA)
        return table if columns is None else table.select(columns)

    def replace_part(self, part: Path, rows: list[dict]) -> None:
        """Atomically rewrite one part (``kvbench score``); the old file stays whole until the rename."""
        tmp = part.with_name(f".{part.name}.tmp")
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
        tmp = path.with_name(f".{path.name}.tmp")
        payload = {"run_key": run_key, "example_id": example_id, "sample": sample, "error": error, **context}
        tmp.write_text(json.dumps(payload, default=str))
        os.replace(tmp, path)

    def clear_failure(self, run_key: str, example_id: str, sample: int) -> None:
        self._failure_path(run_key, example_id, sample).unlink(missing_ok=True)

    def failures(self, run_key: str | None = None) -> list[dict]:
        folder = self.path / "failures"
        if not folder.is_dir():
            return []
        pattern = f"{run_key}-*.json" if run_key else "*.json"
        return [json.loads(p.read_text()) for p in sorted(folder.glob(pattern))]

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
        seen, by_key = _KEY_INDEX.setdefault(self.path.resolve(), (set(), {}))
        for part in self.parts():
            if part.name not in seen:
                table = self.read_part(part, ["run_key", "example_id", "sample"])
                for k, e, n in zip(*(table[c].to_pylist() for c in ("run_key", "example_id", "sample"))):
                    by_key.setdefault(k, set()).add((e, n))
                seen.add(part.name)
        return set(by_key.get(run_key, ()))

    def append(self, rows: list[dict]) -> Path | None:
        if not rows:
            return None
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            name = f"part-{rows[0]['created_at'].strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}.parquet"
            final = self.path / name
            tmp = self.path / f".{name}.tmp"
            pq.write_table(table, tmp)
            os.replace(tmp, final)
        except OSError as err:
            raise StoreError(f"cannot write to store {self.path}: {err.strerror or err}") from None
        return final
