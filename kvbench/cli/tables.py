"""Terminal tables."""

from __future__ import annotations

from rich.table import Table

from kvbench.runs.plan import Cell, RunConfig, summarize
from kvbench.tasks import Task


def _compiled(config: RunConfig) -> str:
    """The title's note of a compiled run (``--compile``): its forwards that compiled a graph are not timed."""
    return f"; decoding compiled ({config.compile}: tok/s leaves out the compiling steps)" if config.compile else ""


def result_table(task: Task, cells: list[Cell], config: RunConfig) -> Table:
    if config.kind == "fidelity":
        return fidelity_table(task, cells, config)
    table = Table(title=f"{config.model} on {task.name} (protocol {task.protocol}; "
                        f"n={len(cells[0].rows) if cells else 0}{_compiled(config)}; store: {config.store})")
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
                        f"(protocol {task.protocol}; n={len(cells[0].rows) if cells else 0}{_compiled(config)}; "
                        f"store: {config.store})")
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


def ranking_table(task: Task, cells: list[Cell], config: RunConfig) -> tuple[Table, list[str]]:
    """The run's presses ranked by how much of the full cache's behaviour they keep (``--measure fidelity``):
    teacher-forced top-1 agreement and KL first, then attention loss, accuracy, length, speed and memory, each
    measured metric with its standard error over the examples; a press in bold only where its top-1 is better than
    the next press's by a paired interval excluding zero. Returns the table and the lines that read it."""
    from kvbench.cli.reading import distinguished_best, reading

    n = len(cells[0].rows) if cells else 0
    table = Table(title=f"{config.model} on {task.name} (protocol {task.protocol}; n={n}{_compiled(config)}; "
                        f"{config.max_new_tokens or 'the dataset default'} new tokens at most; store: {config.store})",
                  caption="mean ± standard error over the examples; top-1 and KL(full‖press): the full cache's "
                          "response replayed under the press, teacher-forced (top-1: the press picks the full "
                          "cache's next token); attention loss: attention mass on evicted entries; bold: best top-1 "
                          "at its budget by a paired 95% interval; tok/s: each sequence's wall-clock rate, the cells "
                          "run one after another (`kvbench bench` times presses side by side)")
    for name in ("press", "budget", "n", "top-1", "KL", "attn loss", "accuracy", "out tok", "tok/s", "KV MiB"):
        table.add_column(name, justify="left" if name == "press" else "right")
    best = distinguished_best(cells)
    for cell in cells:
        s = summarize(cell)
        table.add_row(s["press"], str(s["budget"]), str(s["n"]), _spread(cell, "fidelity_top1", True),
                      _spread(cell, "fidelity_kl_mean", False), _spread(cell, "attention_loss_mean", True),
                      _spread(cell, "correct", True), f"{s['output_tokens']:.1f}", f"{s['tokens_per_s']:.1f}",
                      f"{s['peak_kv_mib']:.2f}", style="bold" if cell in best else None)
    return table, reading(cells)


def _spread(cell: Cell, column: str, percent: bool) -> str:
    """A cell's mean of ``column`` ± its standard error over the examples; n/a where it was not measured."""
    from kvbench.cli.reading import per_example, standard_error

    values = per_example(cell, column)
    if not values:
        return "n/a"
    mean, error = sum(values.values()) / len(values), standard_error(values)
    exact = not error > 0  # one example, or the same value on every example (the full cache's top-1)
    if percent:
        return f"{100 * mean:.1f}%" if exact else f"{100 * mean:.1f} ± {100 * error:.1f}%"
    return f"{mean:.3f}" if exact else f"{mean:.3f} ± {error:.3f}"
