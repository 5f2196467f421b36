"""``kvbench run``'s core: every (press, budget) cell of one model on one dataset, scored and stored.

Everything is validated before the model loads, so bad input fails in a second, not after a download. The cells
run through ``kvbench.runs.runner`` (``Cell``, ``decoding`` and ``pending`` are re-exported from it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import replace

from kvbench.errors import ConfigError, KvbenchError
from kvbench.models import (
    cached_revision,
    default_system_prompt,
    model_shape,
    resolve,
    resolve_device,
    resolve_dtype,
)
from kvbench.presses import Press, make_checked_press, parse_press_args
from kvbench.runs.config import BATCHINGS, KINDS, MEASUREMENTS, RunConfig
from kvbench.runs.runner import Cell, decoding, max_new_tokens, pending, run_fidelity_cell, run_generation_cell
from kvbench.runs.session import load_session
from kvbench.store import ResultStore
from kvbench.tasks import Example, Task, load_examples, load_task
from kvbench.tasks.protocols import DEFAULT_PROTOCOL, get_protocol

__all__ = ["Cell", "RunConfig", "build_cells", "decoding", "execute", "parse_budget", "pending", "plan", "run_key",
           "summarize"]

def parse_budget(text: str) -> int | None:
    if text.strip().lower() in {"full", "none"}:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"--budget {text!r} is not an integer or 'full'") from None
    if not 1 <= value <= 2**31:
        raise ConfigError(f"--budget must be >= 1 and <= 2^31, got {value}")
    return value


def plan(config: RunConfig) -> tuple[Task, list[Example], list[Cell]]:
    """Validate everything and list the cells, without loading the model."""
    from kvbench.checks import store_to_write

    cells = build_cells(config)
    store_to_write(config.store)
    task = prepared_task(config)
    return task, protocol_examples(config, task), cells


def prepared_task(config: RunConfig) -> Task:
    """The dataset under the run's protocol, with the system prompt the run uses."""
    protocol = get_protocol(config.protocol)
    task = load_task(config.dataset).for_protocol(protocol)
    if protocol.raw_text:  # the fork sent no system prompt (build_cells refuses one)
        return task
    if config.system_prompt is not None:  # given: "" means none
        return replace(task, system=config.system_prompt or None)
    return replace(task, system=default_system_prompt(config.model) or task.system)


def protocol_examples(config: RunConfig, task: Task) -> list[Example]:
    """The examples a run uses: the protocol draws the ``--num-samples`` subset."""
    protocol = get_protocol(config.protocol)
    return load_examples(task, config.num_samples, config.data_dir, protocol.subset_seed, protocol.subset,
                         revision=config.dataset_revision)


def build_cells(config: RunConfig) -> list[Cell]:
    """Validate the options and build one cell per (press, budget); touches neither model nor data."""
    if config.num_samples is not None and config.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {config.num_samples}")
    if config.max_new_tokens is not None and not 1 <= config.max_new_tokens <= 2**31:
        raise ConfigError(f"--max-new-tokens must be >= 1 and <= 2^31, got {config.max_new_tokens}")
    unknown = set(config.measure) - set(MEASUREMENTS)
    if unknown:
        raise ConfigError(f"--measure {sorted(unknown)[0]!r} is unknown (known: {', '.join(MEASUREMENTS)})")
    if config.kind not in KINDS:
        raise ConfigError(f"kind {config.kind!r} is unknown (known: {', '.join(KINDS)})")
    if not 1 <= config.batch_size <= 2**31:
        raise ConfigError(f"--batch-size must be >= 1 and <= 2^31, got {config.batch_size}")
    if config.batching not in BATCHINGS:
        raise ConfigError(f"--batching {config.batching!r} is unknown (known: {', '.join(BATCHINGS)})")
    decoding(config)
    protocol = get_protocol(config.protocol)
    if config.system_prompt and protocol.raw_text:
        raise ConfigError(f"--protocol {protocol.name} feeds raw text without a chat template: --system-prompt "
                          "does not apply")
    for b in config.budgets:
        if b is not None and b < 1:
            raise ConfigError(f"--budget must be >= 1, got {b}")
    resolve(config.model)
    resolve_dtype(config.dtype, resolve_device(config.device))  # bad values fail here, not at the model load
    names = list(dict.fromkeys(config.presses))
    if not names:
        raise ConfigError("--press: give at least one press (see `kvbench presses`)")
    args = parse_press_args(list(config.press_args), names)
    cells: list[Cell] = []
    for name in names:
        press = make_checked_press(name, args[name])
        if press.sparse and config.measure:
            raise ConfigError(f"{name} evicts nothing: --measure {', '.join(config.measure)} does not apply")
        if not press.evicts:
            cells.append(Cell(press=press, budget=None))
            continue
        budgets = [b for b in config.budgets if b is not None]
        if not budgets:
            raise ConfigError(f"press {name!r} evicts: give at least one --budget")
        for b in dict.fromkeys(budgets):
            try:
                press.cadence(b)  # a press bounded by its budget needs room for its buffer
            except KvbenchError as err:
                raise ConfigError(str(err)) from None
            cells.append(Cell(press=press, budget=b))
    if config.compile is not None:
        check_compile(config, cells)
    check_model_data(config.model, [cell.press for cell in cells])
    return cells


def check_model_data(model: str, presses: list[Press]) -> None:
    """A press's per-model statistics or gates against the model's shapes, from its configuration alone (before
    any weights load); where the configuration cannot be read here the run checks when it builds the cache."""
    calibrated = [press for press in presses if press.calibration]
    if not calibrated:
        return
    try:
        shape = model_shape(model)
    except KvbenchError:
        return
    for press in calibrated:
        try:
            press.check_model(*shape)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def check_compile(config: RunConfig, cells: list[Cell]) -> None:
    """``--compile``: a known backend, and every cell a press whose decoding step can be one graph."""
    from kvbench.engine.compiled import check_backend, check_compilable

    try:
        check_backend(config.compile)
        if "attention-loss" in config.measure:
            raise ConfigError("--compile: --measure attention-loss reads a shadow of every key sized by the tokens "
                              "seen so far; measure it without --compile")
        for cell in cells:
            check_compilable(cell.press, cell.budget)
    except KvbenchError as err:
        raise ConfigError(str(err)) from None


def run_key(config: RunConfig, task: Task, cell: Cell, model_revision: str | None,
            examples: Sequence[Example] = ()) -> str:
    """Hash of everything that changes the output of a row (the hub commit the examples were read at, too)."""
    sampling = decoding(config)
    payload = {
        "model": config.model, "revision": model_revision, "press": cell.press.name,
        "press_args": cell.press.params(), "budget": cell.budget, "dataset": task.name,
        "dataset_version": task.version, "prompt_hash": task.prompt_hash, "data": data_source(config, task),
        "max_new_tokens": max_new_tokens(config, task), "temperature": sampling["temperature"],
        "top_p": sampling["top_p"] if sampling["temperature"] > 0 else 1.0, "seed": config.seed,
        "dtype": resolved_dtype(config),
    }
    # only when set, so the keys of runs made before these options existed stay valid
    if config.stop_on_loop:
        payload["stop_on_loop"] = True
    if config.compile:  # a compiled graph may round differently: its rows are its own
        payload["compile"] = config.compile
    if config.measure:
        payload["measure"] = sorted(config.measure)
    if config.kind != "generate":
        payload["kind"] = config.kind
    if cell.press.revision > 1:
        payload["press_revision"] = cell.press.revision
    if cell.press.origin:  # a plug-in: the class its name resolved to
        payload["press_class"] = cell.press.origin
    digest = cell.press.data_digest()
    if digest:  # the statistics or gates file's contents, not only its path
        payload["press_data"] = digest
    if config.protocol != DEFAULT_PROTOCOL:
        payload["protocol"] = config.protocol
    if get_protocol(config.protocol).revision > 1:  # what the protocol feeds the model changed
        payload["protocol_revision"] = get_protocol(config.protocol).revision
    if sampling["temperature"] > 0 and sampling["top_k"]:
        payload["top_k"] = sampling["top_k"]
    if sampling["repetition_penalty"] != 1.0:
        payload["repetition_penalty"] = sampling["repetition_penalty"]
    hub_sources = sorted({e.source for e in examples if e.source.startswith(("hub:", "mirror:"))})
    if hub_sources:  # local files keep their keys: a changed file fails the size check or shows in the column
        payload["data_revision"] = hub_sources
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolved_dtype(config: RunConfig) -> str:
    """The dtype a run computes in (``auto`` resolved on its device; ``fp32`` and ``float32`` one name): runs that
    resolve to the same settings share a key, and ``auto`` on a CPU and on a GPU do not."""
    return str(resolve_dtype(config.dtype, resolve_device(config.device))).removeprefix("torch.")


def data_source(config: RunConfig, task: Task) -> str:
    """Where the examples come from: local files and the hub may hold different versions of a dataset."""
    from kvbench.tasks import data_dir

    kind = "builtin" if task.builtin else "local" if data_dir(config.data_dir) is not None else "hub"
    return f"{kind}:{task.split(config.data_dir)}"


#: The runner of each kind of run: free generation, or the teacher-forced replay of the full cache's response.
RUNNERS = {"generate": run_generation_cell, "fidelity": run_fidelity_cell}


def keyed(config: RunConfig, task: Task, cells: list[Cell], revision: str | None,
          examples: list[Example]) -> list[Cell]:
    """The cells with their run keys, for the model revision ``revision``."""
    return [replace(cell, run_key=run_key(config, task, cell, revision, examples)) for cell in cells]


def with_rows(store: ResultStore, cells: list[Cell], examples: list[Example]) -> list[Cell]:
    """The cells with every stored row of theirs (for ``examples``), in example order."""
    wanted = {e.id for e in examples}
    by_key: dict[str, list[dict]] = {c.run_key: [] for c in cells}
    for row in store.rows_of(set(by_key)):
        if row["example_id"] in wanted and row["sample"] == 0:
            by_key[row["run_key"]].append(row)
    order = {e.id: i for i, e in enumerate(examples)}  # whatever order the parts were written in
    return [replace(c, rows=tuple(sorted(by_key[c.run_key], key=lambda r: order[r["example_id"]]))) for c in cells]


def execute(
    config: RunConfig,
    on_start: Callable[[int], None] | None = None,
    on_example: Callable[[Cell, Example], None] | None = None,
    retry_failed: bool = False,
    planned: tuple[Task, list[Example], list[Cell]] | None = None,
) -> tuple[Task, list[Cell]]:
    """Run every cell on every example not already stored; return cells with all their rows (stored ones too).

    ``planned`` is ``plan(config)``'s result when the caller has validated already (the data is read once).
    """
    task, examples, planned_cells = planned or plan(config)
    store = ResultStore(config.store)
    revision = cached_revision(resolve(config.model))  # what loading resolves to, known without loading
    cells = keyed(config, task, planned_cells, revision, examples)
    todo = sum(len(pending(store, c, examples, retry_failed)) for c in cells)
    if todo:  # everything stored: the table comes from the store without loading the model
        session = load_session(config.model, config.dtype, config.device, config.seed)
        if session.revision != revision:
            cells = keyed(config, task, planned_cells, session.revision, examples)
            todo = sum(len(pending(store, c, examples, retry_failed)) for c in cells)
    if on_start:
        on_start(todo)
    for cell in cells if todo else ():
        RUNNERS[config.kind](session, config, task, examples, cell, retry_failed, on_example)
    return task, with_rows(store, cells, examples)


def summarize(cell: Cell) -> dict:
    """The numbers of one row of the result table."""
    rows = cell.rows
    n = len(rows)

    def mean(key):
        """The mean over the rows; NaN when there are none or the column was not measured."""
        values = [r.get(key) for r in rows]
        return sum(values) / n if n and None not in values else float("nan")

    return {
        "press": cell.press.name, "budget": "full" if cell.budget is None else cell.budget, "n": n,
        "accuracy": mean("correct") if n else float("nan"),
        "invalid": sum(r["extracted"] is None for r in rows) / n if n else float("nan"),
        "truncated": sum(r["finish_reason"] == "length" for r in rows) / n if n else float("nan"),
        "output_tokens": mean("output_tokens"), "tokens_per_s": mean("tokens_per_s"),
        "peak_kv_mib": mean("peak_kv_bytes") / 2**20,
        "top1": mean("fidelity_top1"), "kl": mean("fidelity_kl_mean"), "attention_loss": mean("attention_loss_mean"),
    }
