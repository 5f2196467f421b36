"""``kvbench score``'s core: re-extract and re-score stored responses without generating."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvbench.errors import KvbenchError
from kvbench.store import ResultStore
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
            on_part: Callable[[], None] | None = None) -> RescoreSummary:
    """Re-apply each row's dataset config under the row's protocol (current extractors and scorer) to its
    stored response; whether the response started inside ``<think>`` is read from the stored prompt.

    Parts whose rows change are rewritten atomically, one at a time; ``dry_run`` only counts.
    """
    store = ResultStore(store_path)
    parts = store.parts()
    if not parts:
        raise KvbenchError(f"no result parts in {store_path}")
    tasks: dict[tuple[str, str], Task] = {}
    summary = RescoreSummary()
    for part in parts:
        rows = store.read_part(part).to_pylist()
        touched = False
        for row in rows:
            if dataset and row["dataset"] != dataset:
                continue
            key = (row["dataset"], row["protocol"] or DEFAULT_PROTOCOL)
            if key not in tasks:
                tasks[key] = load_task(key[0]).for_protocol(get_protocol(key[1]))
            new = tasks[key].score(row["response"], row["gold"], row["prompt"]).columns()
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
        if on_part:
            on_part()
    return summary
