"""Terminal tables."""

from __future__ import annotations

from rich.table import Table

from kvbench.run import Cell, RunConfig, summarize
from kvbench.tasks import Task


def result_table(task: Task, cells: list[Cell], config: RunConfig) -> Table:
    table = Table(title=f"{config.model} on {task.name} (n={len(cells[0].rows) if cells else 0}, "
                        f"store: {config.store})")
    for name in ("press", "budget", "n", "accuracy", "invalid", "truncated", "output tok", "tok/s", "peak KV MiB"):
        table.add_column(name, justify="left" if name == "press" else "right")
    for cell in cells:
        s = summarize(cell)
        table.add_row(
            s["press"], str(s["budget"]), str(s["n"]), f"{s['accuracy']:.1%}", f"{s['invalid']:.1%}",
            f"{s['truncated']:.1%}", f"{s['output_tokens']:.1f}", f"{s['tokens_per_s']:.1f}",
            f"{s['peak_kv_mib']:.3f}",
        )
    return table
