from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Look after a result store: merge its small parts.", no_args_is_help=True)


@app.command("compact")
def compact(store: Path = typer.Argument(Path("results"), help="Result store to compact.")) -> None:
    """Merge the store's small parts into one (runs write one part per example; a finished cell or sweep merges
    its own, a killed one leaves them). Safe to kill at any point, and beside running sweeps."""
    from kvbench.checks import store_to_write
    from kvbench.store.compaction import compact as merge_parts

    done = merge_parts(store_to_write(str(store)))
    typer.echo(f"{store}: merged {done.merged} of {done.parts} parts ({done.rows} rows) into one in "
               f"{done.seconds:.1f} s" if done.merged else f"{store}: {done.parts} parts, nothing to merge")
