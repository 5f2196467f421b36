from __future__ import annotations

from pathlib import Path

import typer


def sweep(
    grid: Path = typer.Argument(..., help="CSV grid: one run per row; 'a|b' in a cell expands to several runs."),
    store: Path = typer.Option(Path("results"), help="Parquet result store shared by every run."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and what is already stored; run nothing."),
    shard_spec: str | None = typer.Option(None, "--shard", help="Run only shard i of n (i/n, 0-based): a job "
                                          "array of n jobs covers the plan, each run in exactly one shard."),
    executor: str = typer.Option("local", help="local (this process) or ray (Ray tasks, one GPU each)."),
    ray_address: str | None = typer.Option(None, help="Ray cluster address (default: start or join a local one)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Rerun examples recorded as failed."),
) -> None:
    """Run a grid of runs (model x press x budget x dataset x ...), resumable and shardable."""
    from rich.console import Console
    from rich.table import Table

    from kvbench.cli.progress import progress_bar
    from kvbench.errors import ConfigError
    from kvbench.runs.sweep import execute_local, execute_ray, parse_shard, read_grid, shard, status

    if executor not in ("local", "ray"):
        raise ConfigError(f"--executor {executor!r}: use local or ray")
    runs = read_grid(grid, store=str(store), write=not dry_run)
    if shard_spec:
        runs = shard(runs, *parse_shard(shard_spec))
    states = status(runs, retry_failed)
    total = sum(s.pending for s in states)
    if dry_run:
        table = Table(title=f"plan: {len(runs)} runs from {grid}" + (f", shard {shard_spec}" if shard_spec else ""))
        for column in ("line", "model", "press", "budget", "dataset", "examples", "stored", "failed", "to run"):
            table.add_column(column, justify="left" if column in ("model", "press", "dataset") else "right")
        for s in states:
            c = s.run.config
            table.add_row(str(s.run.line), c.model, c.presses[0], str(c.budgets[0] or "full"), c.dataset,
                          str(s.examples), str(s.stored), str(s.failed), str(s.pending))
        Console(width=max(Console().width, 120)).print(table)
        typer.echo(f"{sum(s.stored for s in states)} rows stored, {sum(s.failed for s in states)} failed, "
                   f"{total} to run")
        return
    with progress_bar() as progress:
        overall = progress.add_task(f"sweep ({len(runs)} runs)", total=total)
        if executor == "ray":
            written = execute_ray(runs, retry_failed, ray_address,
                                  on_done=lambda n: progress.advance(overall, n))
        else:
            current = {"bar": None}

            def on_run_start(run, todo):
                if current["bar"] is not None:
                    progress.remove_task(current["bar"])
                current["bar"] = progress.add_task(f"  {run.label}", total=todo)

            def on_example(cell, example):
                progress.advance(overall)
                progress.advance(current["bar"])

            written = execute_local(runs, retry_failed, on_run_start, on_example)
    failed = sum(s.failed for s in status(runs))
    typer.echo(f"sweep done: {written} rows written, {failed} failed"
               + (" (rerun with --retry-failed)" if failed else ""))
