from __future__ import annotations

from pathlib import Path

import typer

from kvbench.results.metrics import METRICS


def report(
    store: Path = typer.Argument(Path("results"), help="Result store to report on."),
    format: str = typer.Option("terminal", "--format", "-f", help="terminal, markdown, latex or csv."),
    metric: str = typer.Option("accuracy", "--metric", "-m", help=f"One of: {', '.join(METRICS)} (see the "
                               "README's metrics)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write to this file instead of stdout."),
    plots: Path | None = typer.Option(None, "--plots", help="Also write PNG plots (accuracy and output length "
                                      "vs budget, per model and dataset) to this directory."),
    reference: str | None = typer.Option(None, "--reference", help="Show published figures beside ours: hott "
                                         "(the paper's accuracies)."),
    paired: bool = typer.Option(False, "--paired", help="Under each table, every press against the full cache on "
                                "the same examples: mean difference, bootstrap 95% interval and (accuracy) exact "
                                "McNemar p. The csv output always has these columns."),
    bench: bool = typer.Option(False, "--bench", help="The speed and memory tables stored by `kvbench bench "
                               "--store` (the latest run of each configuration) instead."),
) -> None:
    """Tables in the paper's layout (press x dataset x budget, Avg., Δ vs full), and plots."""
    from kvbench.checks import choice, output_dir, output_file
    from kvbench.results.plots import plot
    from kvbench.results.report import check_options, render

    output_file("--out", out)
    output_dir("--plots", plots)
    if not bench:
        check_options(metric, format, reference, paired)
        _merge_small_parts(store)
    if bench:
        from kvbench.bench import results as bench_results

        choice("--format", format, bench_results.FORMATS)
        text = bench_results.render(bench_results.load_rows(store), fmt=format)
    else:
        text = render(store, metric=metric, fmt=format, reference=reference, paired=paired)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        typer.echo(f"wrote {out}")
    else:
        typer.echo(text, nl=False)
    if plots:
        for path in plot(store, plots):
            typer.echo(f"wrote {path}")


def _merge_small_parts(store: Path) -> None:
    """A store left with many small parts (killed sweeps) is compacted first, when it may be written: reading
    thousands of files costs far more than merging them once."""
    import os

    from kvbench.store import ResultStore
    from kvbench.store.compaction import AUTO_PARTS, compact

    results = ResultStore(store)
    if store.is_dir() and os.access(store, os.W_OK) and len(results.parts()) >= AUTO_PARTS:
        results.check_writable()
        typer.echo(f"merging {len(results.parts())} parts of {store} first (kvbench store compact)", err=True)
        done = compact(results)
        typer.echo(f"merged {done.merged} parts ({done.rows} rows) in {done.seconds:.1f} s", err=True)
