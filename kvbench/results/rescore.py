"""``kvbench score``'s core: re-extract and re-score stored responses without generating."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvbench.checks import store_to_read
from kvbench.store import ResultStore
from kvbench.store.compaction import compaction_lock
from kvbench.tasks import Task, load_task
from kvbench.tasks.protocols import DEFAULT_PROTOCOL, get_protocol


@dataclass
class RescoreSummary:
    rows: int = 0
    changed: int = 0
    parts_rewritten: int = 0
    newly_correct: int = 0
    newly_wrong: int = 0


def rescore(store_path: str, dataset: str | None = None, dry_run: bool = False,
            on_part: Callable[[], None] | None = None,
            tasks: dict[tuple[str, str], Task] | None = None) -> RescoreSummary:
    """Re-apply each row's dataset config under the row's protocol (current extractors and scorer) to its
    stored response; whether the response started inside ``<think>`` is read from the stored prompt.

    Parts whose rows change are rewritten atomically, one at a time; ``dry_run`` only counts. ``tasks``:
    ``stored_tasks(store_path, dataset)`` when the caller has checked them already.
    """
    tasks = stored_tasks(store_path, dataset) if tasks is None else tasks  # all checked before any part changes
    store = ResultStore(store_path)
    summary = RescoreSummary()
    with compaction_lock(store):  # no part is merged away while it is rewritten
        for part in store.parts():
            _rescore_part(store, part, tasks, dataset, dry_run, summary)
            if on_part:
                on_part()
    return summary


def _rescore_part(store: ResultStore, part, tasks: dict, dataset: str | None, dry_run: bool,
                  summary: RescoreSummary) -> None:
    """Re-score one part's rows into ``summary``; rewrite the part if any changed (unless ``dry_run``)."""
    rows = store.read_part(part).to_pylist()
    touched = False
    for row in rows:
        if (dataset and row["dataset"] != dataset) or row.get("kind") == "fidelity":
            continue  # a teacher-forced replay answers nothing of its own: it has no score
        task = tasks[(row["dataset"], row["protocol"] or DEFAULT_PROTOCOL)]
        new = task.score(row["response"], row["gold"], row["prompt"]).columns()
        summary.rows += 1
        if any(row[k] != new[k] for k in new):
            summary.changed += 1
            summary.newly_correct += int(new["correct"] and not row["correct"])
            summary.newly_wrong += int(row["correct"] and not new["correct"])
            row.update(new)
            touched = True
    if touched and not dry_run:
        store.replace_part(part, rows)
        summary.parts_rewritten += 1


def stored_tasks(store_path: str, dataset: str | None = None) -> dict[tuple[str, str], Task]:
    """The dataset config of each (dataset, protocol) the store's rows ran (only ``dataset``'s when given), after
    checking the store's parts and ``dataset``."""
    if dataset is not None:
        load_task(dataset)  # an unknown dataset fails here instead of re-scoring nothing
    table = store_to_read(store_path).read(["dataset", "protocol"])
    pairs = {(d, p or DEFAULT_PROTOCOL) for d, p in zip(table["dataset"].to_pylist(), table["protocol"].to_pylist())}
    return {(d, p): load_task(d).for_protocol(get_protocol(p)) for d, p in sorted(pairs) if dataset in (None, d)}
