"""``kvbench bench``'s results: stored under ``STORE/bench/``, read back, and rendered as tables."""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvbench.bench.config import BenchConfig


@dataclass
class BenchRow:
    press: str
    budget: int | None
    batch: int
    tokens_per_s: float
    ms_per_step: float
    ratio: float  # tokens/s over the full cache's, same batch, same run
    kv_mib: float  # KV held at peak, whole batch
    entries_per_head: int  # KV entries held at peak per layer, KV head and sequence
    peak_memory_mib: float | None  # CUDA allocator peak of the cell run alone (None elsewhere)
    host_kv_mib: float = 0.0  # KV offloaded to host memory at peak, whole batch (ShadowKV's values)
    setting: str = "side by side"  # or "equal memory" (the largest batch within --memory-gib)
    extra: dict = field(default_factory=dict)


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def store_rows(config: BenchConfig, session, rows: list[BenchRow], started: dt.datetime) -> Path:
    """Append the rows, with what was run and where, to ``STORE/bench/`` (one atomic Parquet part per call, in
    ``BENCH_SCHEMA``; ``extra`` as JSON).

    ``created_at`` is the run's start, the same for all of a run's parts: reports show the latest run whole.
    """
    import json

    import pyarrow as pa

    from kvbench.runs.session import device_name
    from kvbench.store import write_part

    loaded = session.loaded
    common = {"created_at": started.isoformat(timespec="seconds"), **session.provenance,
              **_run_columns(config, dtype_name(loaded.dtype), device_name(loaded.device))}
    records = [{**common, **asdict(row)} for row in rows]
    for record in records:
        record["extra"] = json.dumps(record["extra"], sort_keys=True, default=str)
    table = pa.Table.from_pylist(records, schema=bench_schema())
    return write_part(Path(config.store) / "bench", table, dt.datetime.now(dt.timezone.utc))


def bench_schema():
    """The columns of a bench part: the run's (``RUN_COLUMNS``, when, and the session's provenance, as every result
    row has) and a ``BenchRow``'s."""
    import pyarrow as pa

    return pa.schema([
        ("created_at", pa.string()), ("kvbench_version", pa.string()), ("git_commit", pa.string()),
        ("torch_version", pa.string()), ("transformers_version", pa.string()), ("model", pa.string()),
        ("random_weights", pa.bool_()), ("device", pa.string()), ("dtype", pa.string()), ("prompt_len", pa.int64()),
        ("gen_len", pa.int64()), ("static_shapes", pa.bool_()), ("compile", pa.bool_()), ("press_args", pa.string()),
        ("press", pa.string()), ("budget", pa.int64()), ("batch", pa.int64()), ("tokens_per_s", pa.float64()),
        ("ms_per_step", pa.float64()), ("ratio", pa.float64()), ("kv_mib", pa.float64()),
        ("entries_per_head", pa.int64()), ("peak_memory_mib", pa.float64()), ("host_kv_mib", pa.float64()),
        ("setting", pa.string()), ("extra", pa.string()),  # JSON
    ])


def load_rows(store: str | Path):
    """Every stored bench row (a DataFrame), oldest first."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kvbench.checks import bench_parts
    from kvbench.store import unreadable

    frames = []
    for part in bench_parts(store, required=True):
        try:
            frames.append(pq.read_table(part).to_pandas())
        except (pa.ArrowInvalid, OSError) as err:  # a sound footer over a damaged body
            raise unreadable(part, err) from None
    return pd.concat(frames, ignore_index=True).sort_values("created_at")


FORMATS = ("terminal", "markdown", "csv")
RUN_COLUMNS = ["model", "random_weights", "device", "dtype", "prompt_len", "gen_len", "static_shapes", "compile",
               "press_args"]


def frame(config: BenchConfig, loaded_dtype: str, device: str, rows: list[BenchRow]):
    """The rows of one run as the DataFrame ``render`` takes."""
    import pandas as pd

    common = _run_columns(config, loaded_dtype, device)
    return pd.DataFrame([{**common, **asdict(r)} for r in rows])


def _run_columns(config: BenchConfig, dtype: str, device: str) -> dict:
    """What a run's rows share: the columns ``RUN_COLUMNS`` groups the tables by."""
    return {"model": config.model, "random_weights": config.random_weights, "device": device, "dtype": dtype,
            "prompt_len": config.prompt_len, "gen_len": config.gen_len, "static_shapes": config.static_shapes,
            "compile": config.compile, "press_args": " ".join(config.press_args)}


def render(df, fmt: str = "markdown") -> str:
    """One table per run configuration and setting (the latest run of each), as markdown, csv or plain text."""
    import json

    from kvbench.checks import choice
    from kvbench.text_table import markdown_table, text_table

    choice("--format", fmt, FORMATS)
    out = []
    if "created_at" in df:
        latest = df.groupby(RUN_COLUMNS, dropna=False)["created_at"].transform("max")
        df = df[df["created_at"] == latest]
    for key, group in df.groupby([*RUN_COLUMNS, "setting"], dropna=False, sort=False):
        info = dict(zip([*RUN_COLUMNS, "setting"], key))
        weights = ", random weights" if info["random_weights"] else ""
        title = (f"{info['model']}{weights}, {info['dtype']} on {info['device']}: prompt {info['prompt_len']} + "
                 f"{info['gen_len']} generated tokens, {info['setting']}"
                 + (f", press args: {info['press_args']}" if info["press_args"] else "")
                 + (", static shapes" if info["static_shapes"] else ""))
        host = group["host_kv_mib"].fillna(0.0) if "host_kv_mib" in group else 0.0  # stored before it existed
        table = group.assign(
            budget=group["budget"].map(lambda b: "full" if b is None or b != b else str(int(b))),
            peak_memory_mib=group["peak_memory_mib"].map(lambda m: "n/a" if m is None or m != m else f"{m:.0f}"),
            host_kv_mib=host,
        )[["press", "budget", "batch", "tokens_per_s", "ms_per_step", "ratio", "kv_mib", "entries_per_head",
           "host_kv_mib", "peak_memory_mib"]]
        headers = ["press", "budget", "batch", "tok/s", "ms/step", "× full", "KV MiB", "KV entries/head",
                   "host KV MiB", "peak device MiB"]
        extras = [e if isinstance(e, dict) else json.loads(e or "{}") for e in group.get("extra", [{}] * len(group))]
        reference = ""
        if extras and all("examples_per_hour" in e for e in extras):  # whole runs (bench --workload run)
            headers, cells = workload_table(group, extras)
            title = title.replace(f"prompt {info['prompt_len']} +", f"prompts of at most {info['prompt_len']} +")
            out.append(_table(title, headers, cells, fmt))
            continue
        if extras and all("ops_per_step" in e for e in extras):  # counted (bench --ops)
            table = table.assign(ops=[f"{e['ops_per_step']:.0f}" for e in extras],
                                 dispatches=[f"{e.get('dispatches_per_step', math.nan):.0f}" for e in extras],
                                 syncs=[f"{e['syncs_per_step']:.1f}" for e in extras],
                                 growth=[f"{e['ops_growth']:+.0f}" for e in extras])
            headers += ["ops/step", "dispatches/step", "syncs/step", "ops growth"]
            hf = sorted({(g["batch"], e["hf_ops_per_step"], e.get("hf_dispatches_per_step", math.nan),
                          e["hf_syncs_per_step"]) for (_, g), e in zip(group.iterrows(), extras)})
            reference = ("HF generate (DynamicCache), ops/step (kernel-launching), dispatches/step (every aten "
                         "operator, views included) and syncs/step: " + ", ".join(
                             f"batch {b}: {o:.0f}, {d:.0f}, {y:.1f}" for b, o, d, y in hf))
        if extras and all("decoding" in e for e in extras):  # bench --compile
            table = table.assign(decoding=[e["decoding"] for e in extras],
                                 x_eager=[f"{e['x_eager']:.2f}" for e in extras],
                                 warmup=[f"{e['warmup_s']:.1f}" for e in extras])
            headers += ["decoding", "× eager", "warm-up s (compiles)"]
        if fmt == "csv":
            out.append(f"# {title}\n" + table.to_csv(index=False, header=headers, float_format="%.4g"))
            continue
        cells = [[str(v) if not isinstance(v, float) else f"{v:.3f}" if c == "ratio" else f"{v:.2f}"
                  for c, v in row.items()] for _, row in table.iterrows()]
        text = (text_table(title, headers, cells) if fmt == "terminal"
                else f"**{title}**\n\n" + markdown_table(headers, cells))
        out.append(text + (f"\n{reference}\n" if reference else "\n"))
    return "\n".join(out)


def _table(title: str, headers: list[str], cells: list[list[str]], fmt: str) -> str:
    """One titled table of already formatted cells, as csv, markdown or plain text."""
    import csv
    import io

    from kvbench.text_table import markdown_table, text_table

    if fmt == "csv":
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows([headers, *cells])
        return f"# {title}\n" + buffer.getvalue()
    if fmt == "terminal":
        return text_table(title, headers, cells) + "\n"
    return f"**{title}**\n\n" + markdown_table(headers, cells) + "\n"


def workload_table(group, extras: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of a whole-run table (``bench_results.render``)."""
    headers = ["press", "budget", "batching", "batch", "examples", "decoding forwards", "seconds", "examples/h",
               "tok/s", "× batch 1", "× static", "same rows"]
    table_cells = []
    for (_, row), extra in zip(group.iterrows(), extras):
        budget = "full" if row["budget"] is None or row["budget"] != row["budget"] else str(int(row["budget"]))
        table_cells.append([row["press"], budget, extra["batching"], str(row["batch"]), str(extra["examples"]),
                       str(extra["decoding_forwards"]), f"{extra['seconds']:.1f}", f"{extra['examples_per_hour']:.0f}",
                       f"{row['tokens_per_s']:.1f}", f"{row['ratio']:.2f}", f"{extra['x_static']:.2f}",
                       "yes" if extra["same_rows"] else "NO"])
    return headers, table_cells
