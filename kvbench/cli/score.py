from __future__ import annotations

from pathlib import Path

import typer


def score(
    store: Path = typer.Argument(Path("results"), help="Result store to re-score."),
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="Only rows of this dataset."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Count what would change; write nothing."),
) -> None:
    """Re-extract and re-score stored responses with the current dataset configs (no generation)."""
    from kvbench.cli.progress import progress_bar
    from kvbench.results.rescore import rescore, stored_tasks
    from kvbench.store import ResultStore

    tasks = stored_tasks(str(store), dataset)  # the store's parts and every config checked before any work
    parts = len(ResultStore(store).parts())
    with progress_bar(transient=True) as progress:
        bar = progress.add_task("re-scoring", total=parts)
        summary = rescore(str(store), dataset, dry_run, on_part=lambda: progress.advance(bar),
                          tasks=tasks)
    verb = "would change" if dry_run else "changed"
    typer.echo(f"re-scored {summary.rows} rows: {summary.changed} {verb} "
               f"({summary.newly_correct} now correct, {summary.newly_wrong} now wrong), "
               f"{summary.parts_rewritten} parts rewritten")
