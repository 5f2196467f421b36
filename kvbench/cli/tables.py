"""Terminal tables."""

from __future__ import annotations

from rich.table import Table

from kvbench.runs.plan import Cell, RunConfig, summarize
from kvbench.tasks import Task


def _compiled(config: RunConfig) -> str:
    """The title's note of a compiled run (``--compile``), whose first steps include the compilation."""
    return f"; decoding compiled ({config.compile}: tok/s includes the compile)" if config.compile else ""


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
    teacher-forced top-1 agreement and KL first, then attention loss, accuracy, length, speed and memory; the best
    press of each budget in bold. Returns the table and the lines that read it."""
    n = len(cells[0].rows) if cells else 0
    table = Table(title=f"{config.model} on {task.name} (protocol {task.protocol}; n={n}{_compiled(config)}; "
                        f"{config.max_new_tokens or 'the dataset default'} new tokens at most; store: {config.store})",
                  caption="top-1 and KL(full‖press): the full cache's response replayed under the press, "
                          "teacher-forced (top-1: the press picks the full cache's next token); attention loss: "
                          "attention mass on evicted entries; tok/s: each sequence's wall-clock rate, the cells run "
                          "one after another (`kvbench bench` times presses side by side)")
    for name in ("press", "budget", "n", "top-1", "KL", "attn loss", "accuracy", "out tok", "tok/s", "KV MiB"):
        table.add_column(name, justify="left" if name == "press" else "right")
    summaries = [summarize(cell) for cell in cells]
    best = best_presses(cells, summaries)
    for cell, s in zip(cells, summaries):
        style = "bold" if cell in best.values() else None
        table.add_row(s["press"], str(s["budget"]), str(s["n"]), _percent(s["top1"]), _number(s["kl"], 3),
                      _percent(s["attention_loss"]), _percent(s["accuracy"]), f"{s['output_tokens']:.1f}",
                      f"{s['tokens_per_s']:.1f}", f"{s['peak_kv_mib']:.2f}", style=style)
    return table, reading(cells, summaries, best)


def best_presses(cells: list[Cell], summaries: list[dict]) -> dict:
    """Per budget, the evicting cell with the highest top-1 agreement (the lower KL among equals)."""
    best: dict = {}
    for cell, s in zip(cells, summaries):
        if not cell.press.evicts or s["top1"] != s["top1"]:
            continue
        current = best.get(cell.budget)
        if current is None or (-s["top1"], s["kl"]) < (-summaries[cells.index(current)]["top1"],
                                                       summaries[cells.index(current)]["kl"]):
            best[cell.budget] = cell
    return best


def reading(cells: list[Cell], summaries: list[dict], best: dict) -> list[str]:
    """One line per budget: which press keeps the most of the full cache's behaviour, and which the least."""
    lines = []
    for budget, cell in best.items():
        rivals = [(s, c) for c, s in zip(cells, summaries) if c.budget == budget and c.press.evicts
                  and s["top1"] == s["top1"]]
        s = summaries[cells.index(cell)]
        worst, worst_cell = min(rivals, key=lambda pair: (pair[0]["top1"], -pair[0]["kl"]))
        if worst_cell is cell:  # the only evicting press at this budget: nothing to rank it against
            lines.append(f"At budget {budget}, {s['press']} picks the full cache's next token {s['top1']:.0%} of the "
                         f"time (KL {s['kl']:.3f}); no other evicting press ran at this budget.")
            continue
        lines.append(f"At budget {budget}, {s['press']} keeps the most of the full cache's behaviour: it picks the "
                     f"full cache's next token {s['top1']:.0%} of the time (KL {s['kl']:.3f}), against "
                     f"{worst['top1']:.0%} for {worst['press']} (KL {worst['kl']:.3f}).")
    return lines


def _percent(value: float) -> str:
    return "n/a" if value != value else f"{value:.1%}"


def _number(value: float, digits: int) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"
