"""Sweeps: CSV grids expanded into runs, planned, sharded and executed (locally or on Ray), resumable.

Each CSV row is one run; a cell may list several values separated by ``|`` and the row expands to their
product. Every expanded run is validated (press, budget, dataset, data present) before anything generates.
Resume comes from the store: rows already stored are skipped; per-run locks keep concurrent writers apart.
"""

from __future__ import annotations

import csv
import io
import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from kvbench.errors import ConfigError, KvbenchError
from kvbench.presses import parse_bool
from kvbench.runs.plan import (
    RUNNERS,
    Cell,
    RunConfig,
    build_cells,
    parse_budget,
    pending,
    prepared_task,
    protocol_examples,
    run_key,
)
from kvbench.store import ResultStore
from kvbench.store.compaction import compact
from kvbench.tasks import Example, Task

#: Grid columns and how each value is parsed (a RunConfig field each, except press/budget/press_args).
COLUMNS: dict[str, Callable[[str], object]] = {
    "model": str, "press": str, "budget": parse_budget, "dataset": str, "num_samples": int,
    "max_new_tokens": int, "seed": int, "batch_size": int, "press_args": str, "temperature": float,
    "top_p": float, "dtype": str, "device": str, "data_dir": str, "stop_on_loop": parse_bool, "measure": str,
    "kind": str, "protocol": str, "system_prompt": str, "top_k": int, "repetition_penalty": float,
    "dataset_revision": str, "batching": str, "compile": str,
}


@dataclass(frozen=True)
class PlannedRun:
    """One run of the plan: a single press and budget, with where it came from in the grid."""

    line: int  # CSV line number (header = 1)
    config: RunConfig

    @property
    def label(self) -> str:
        c = self.config
        budget = "full" if not c.budgets or c.budgets[0] is None else c.budgets[0]
        return f"{c.model} {c.presses[0]}@{budget} {c.dataset}"


def read_grid(path: str | Path, store: str = "results", write: bool = True) -> list[PlannedRun]:
    """Parse, expand and validate a grid; errors name the CSV line and column. ``write=False`` (a dry run) needs
    a readable store only."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid {path} not found")
    with _open_grid(path) as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        unknown = [h for h in header if h not in COLUMNS]
        if not header:
            raise ConfigError(f"{path}: empty grid (no header row)")
        repeated = next((h for i, h in enumerate(header) if h in header[:i]), None)
        if repeated:
            raise ConfigError(f"{path}: column {repeated!r} appears twice in the header")
        if unknown:
            raise ConfigError(f"{path}: unknown column {unknown[0]!r} (known: {', '.join(COLUMNS)})")
        for required in ("press", "dataset"):
            if required not in header:
                raise ConfigError(f"{path}: missing column {required!r}")
        runs: list[PlannedRun] = []
        for line, raw in enumerate(reader, start=2):
            if None in raw:
                raise ConfigError(f"{path} line {line}: more cells than columns")
            row = {k.strip(): (v or "").strip() for k, v in raw.items()}
            if not any(row.values()):
                continue
            runs.extend(_expand(path, line, row, store))
    if not runs:
        raise ConfigError(f"{path}: the grid has a header but no runs")
    ResultStore(store).check_writable(write=write)
    seen: set[RunConfig] = set()
    unique = [r for r in runs if not (r.config in seen or seen.add(r.config))]  # first occurrence wins
    for run in unique:
        _validate(path, run)
    return unique


def _open_grid(path: Path):
    """The grid as text: UTF-8, with or without the byte-order mark spreadsheets write, or UTF-16 with one."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-16") if data[:2] in (b"\xff\xfe", b"\xfe\xff") else data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 or UTF-16 text ({err.reason} at byte {err.start})") from None
    return io.StringIO(text, newline="")


def _expand(path: Path, line: int, row: dict[str, str], store: str) -> list[PlannedRun]:
    for required in ("press", "dataset"):
        if not row.get(required):
            raise ConfigError(f"{path} line {line}: the {required!r} cell is empty (every run names its {required})")
    options: dict[str, list] = {}
    for column, text in row.items():
        if text == "":
            continue
        values = []
        for part in text.split("|"):
            try:
                values.append(COLUMNS[column](part.strip()))
            except (ValueError, KvbenchError) as err:
                reason = str(err) if isinstance(err, KvbenchError) else f"{part.strip()!r} is not a valid {column}"
                raise ConfigError(f"{path} line {line}, column {column!r}: {reason}") from None
        options[column] = values
    runs = []
    for combo in itertools.product(*options.values()):
        values = dict(zip(options, combo))
        press_args = tuple(a for a in values.pop("press_args", "").replace(";", " ").split() if a)
        measure = tuple(m for m in values.pop("measure", "").replace(";", " ").split() if m)
        config = RunConfig(
            presses=(values.pop("press"),), budgets=(values.pop("budget", None),), press_args=press_args,
            measure=measure, store=store, **values,
        )
        runs.append(PlannedRun(line=line, config=config))
    return runs


def _validate(path: Path, run: PlannedRun) -> None:
    """Check one run step by step, so the error names the column at fault."""
    from kvbench.models import resolve
    from kvbench.presses import make_press, parse_press_args, press_parameters

    config = run.config
    press = config.presses[0]
    steps = [
        ("model", lambda: resolve(config.model)),
        ("press", lambda: press_parameters(press)),  # the name; its arguments next (some presses need them)
        ("press_args", lambda: make_press(press, parse_press_args(list(config.press_args), [press])[press])),
        ("budget", lambda: _require_budget(config)),
        (None, lambda: build_cells(config)),  # numeric options: their flag names the column
        ("dataset", lambda: _examples(config)),
    ]
    for column, check in steps:
        try:
            check()
        except KvbenchError as err:
            column = column or next((c for flag, c in _FLAGS.items() if flag in str(err)), None)
            where = f"line {run.line}" + (f", column {column!r}" if column else "")
            raise ConfigError(f"{path} {where}: {err}") from None


_FLAGS = {"kind ": "kind", "--measure": "measure", "--num-samples": "num_samples", "--max-new-tokens": "max_new_tokens",
          "--batch-size": "batch_size", "--batching": "batching", "--temperature": "temperature", "--top-p": "top_p",
          "--top-k": "top_k",
          "--repetition-penalty": "repetition_penalty", "--protocol": "protocol", "--system-prompt": "system_prompt",
          "--compile": "compile"}


def _require_budget(config: RunConfig) -> None:
    from kvbench.presses import make_press, parse_press_args

    name = config.presses[0]
    press = make_press(name, parse_press_args(list(config.press_args), [name])[name])
    if config.budgets == (None,) and press.evicts:
        raise ConfigError(f"press {config.presses[0]!r} evicts: give a budget")


def _examples(config: RunConfig) -> tuple[Task, tuple[Example, ...]]:
    """The run's task and examples; each (dataset, subset, protocol, system prompt) is loaded once per sweep."""
    key = RunConfig(model=config.model, dataset=config.dataset, num_samples=config.num_samples,
                    data_dir=config.data_dir, protocol=config.protocol, system_prompt=config.system_prompt,
                    dataset_revision=config.dataset_revision)
    return _examples_of(key)


@lru_cache(maxsize=256)
def _examples_of(config: RunConfig) -> tuple[Task, tuple[Example, ...]]:
    task = prepared_task(config)
    return task, tuple(protocol_examples(config, task))


def _plan(config: RunConfig) -> tuple[Task, list[Example], Cell]:
    """``run.plan`` for a one-cell config, loading each dataset once per sweep."""
    (cell,) = build_cells(config)
    task, examples = _examples(config)
    return task, list(examples), cell


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r} is not i/n (e.g. 0/4)") from None
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"--shard {text!r}: need 0 <= i < n")
    return index, count


def shard(runs: list[PlannedRun], index: int, count: int) -> list[PlannedRun]:
    """Deterministic round-robin split in plan order: every run lands in exactly one shard."""
    return [r for k, r in enumerate(runs) if k % count == index]


@dataclass
class RunStatus:
    run: PlannedRun
    run_key: str
    examples: int
    stored: int
    failed: int
    pending: int


def status(runs: list[PlannedRun], retry_failed: bool = False) -> list[RunStatus]:
    """What each run has stored, failed and still to do (the model revision comes from the local cache)."""
    from kvbench.models import cached_revision, resolve

    out = []
    for run in runs:
        task, examples, cell = _plan(run.config)
        cell = replace(cell, run_key=run_key(run.config, task, cell, cached_revision(resolve(run.config.model)),
                                             examples))
        store = ResultStore(run.config.store)
        ids = {e.id for e in examples}
        stored = sum(1 for e, s in store.done(cell.run_key) if e in ids and s == 0)
        failed = sum(1 for f in store.failures(cell.run_key) if f["example_id"] in ids)
        todo = len(pending(store, cell, examples, retry_failed))
        out.append(RunStatus(run, cell.run_key, len(examples), stored, failed, todo))
    return out


def model_key(config: RunConfig) -> tuple:
    return (config.model, config.dtype, config.device, config.seed if config.model.startswith("tiny-") else 0)


def execute_local(
    runs: list[PlannedRun], retry_failed: bool = False,
    on_run_start: Callable[[PlannedRun, int], None] | None = None,
    on_example: Callable[[Cell, Example], None] | None = None,
) -> int:
    """Run the plan in this process, loading each model once; return the number of rows written."""
    from kvbench.runs.session import load_session

    written = 0
    groups: dict[tuple, list[PlannedRun]] = {}
    for run in runs:
        groups.setdefault(model_key(run.config), []).append(run)
    for group in groups.values():
        first = group[0].config
        session = load_session(first.model, first.dtype, first.device, first.seed)
        for run in group:
            task, examples, cell = _plan(run.config)
            cell = replace(cell, run_key=run_key(run.config, task, cell, session.revision, examples))
            if on_run_start:
                store = ResultStore(run.config.store)
                on_run_start(run, len(pending(store, cell, examples, retry_failed)))
            written += RUNNERS[run.config.kind](session, run.config, task, examples, cell, retry_failed, on_example)
    for store in sorted({run.config.store for run in runs}):  # the sweep's merged cells into one part
        compact(ResultStore(store), wait=False)
    return written


def execute_ray(runs: list[PlannedRun], retry_failed: bool = False, address: str | None = None,
                on_done: Callable[[int], None] | None = None) -> int:
    """Run the plan as Ray tasks: each task loads one model once and runs a share of that model's runs.

    A task asks for one GPU where the cluster has GPUs. Rows go to the shared store through the same
    per-run locks, so Ray tasks and other sweeps never duplicate a row.
    """
    try:
        import ray
    except ImportError:
        raise KvbenchError("--executor ray needs Ray: pip install 'kvbench[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    workers = max(1, gpus or int(resources.get("CPU", 1)))
    groups: dict[tuple, list[PlannedRun]] = {}
    for run in runs:
        groups.setdefault(model_key(run.config), []).append(run)
    chunks_per_group = max(1, workers // max(1, len(groups)))
    task_fn = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1, max_retries=0)(_ray_chunk)
    futures = []
    for group in groups.values():
        for k in range(min(chunks_per_group, len(group))):
            futures.append(task_fn.remote(group[k::chunks_per_group], retry_failed))
    written = 0
    while futures:
        ready, futures = ray.wait(futures, num_returns=1)
        count = ray.get(ready[0])
        written += count
        if on_done:
            on_done(count)
    return written


def _ray_chunk(runs: list[PlannedRun], retry_failed: bool) -> int:
    return execute_local(runs, retry_failed)
