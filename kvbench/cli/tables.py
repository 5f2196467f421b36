"""Terminal tables."""

from __future__ import annotations

from rich.table import Table

from kvbench.run import Cell, RunConfig, summarize
from kvbench.tasks import Task


def result_table(task: Task, cells: list[Cell], config: RunConfig) -> Table:
    if config.kind == "fidelity":
        return fidelity_table(task, cells, config)
    table = Table(title=f"{config.model} on {task.name} (protocol {task.protocol}; "
                        f"n={len(cells[0].rows) if cells else 0}; store: {config.store})")
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


def fidelity_table(task: Task, cells: list[Cell], config: RunConfig) -> Table:
    table = Table(title=f"{config.model} on {task.name}: teacher-forced fidelity against the full cache "
                        f"(protocol {task.protocol}; n={len(cells[0].rows) if cells else 0}; store: {config.store})")
    for name in ("press", "budget", "n", "KL(full||press)", "max KL", "top-1 agreement", "mean rank", "peak KV MiB"):
        table.add_column(name, justify="left" if name == "press" else "right")
    for cell in cells:
        rows = cell.rows
        n = len(rows)

        def mean(key, rows=rows, n=n):
            return sum(r[key] for r in rows) / n if n else float("nan")

        table.add_row(cell.press.name, "full" if cell.budget is None else str(cell.budget), str(n),
                      f"{mean('fidelity_kl_mean'):.4f}", f"{max((r['fidelity_kl_max'] for r in rows), default=0):.3f}",
                      f"{mean('fidelity_top1'):.1%}", f"{mean('fidelity_rank_mean'):.2f}",
                      f"{mean('peak_kv_bytes') / 2**20:.3f}")
    return table
