"""The ``kvbench`` command line: Typer wiring only; each command lives in its own module."""

from __future__ import annotations

import sys

import typer

from kvbench.cli import bench as bench_cmd
from kvbench.cli import datasets as datasets_cmd
from kvbench.cli import inspect as inspect_cmd
from kvbench.cli import lmeval as lmeval_cmd
from kvbench.cli import models as models_cmd
from kvbench.cli import presses as presses_cmd
from kvbench.cli import report as report_cmd
from kvbench.cli import run as run_cmd
from kvbench.cli import score as score_cmd
from kvbench.cli import store as store_cmd
from kvbench.cli import sweep as sweep_cmd
from kvbench.cli import verify as verify_cmd

app = typer.Typer(
    help="Benchmark KV-cache eviction during decoding on reasoning tasks.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
app.command("run")(run_cmd.run)
app.command("fidelity")(run_cmd.fidelity)
app.command("presses")(presses_cmd.presses)
app.command("models")(models_cmd.models)
app.command("sweep")(sweep_cmd.sweep)
app.command("score")(score_cmd.score)
app.command("report")(report_cmd.report)
app.command("bench")(bench_cmd.bench)
app.command("verify")(verify_cmd.verify)
app.command("inspect")(inspect_cmd.inspect)
app.command("lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                         "help_option_names": []})(lmeval_cmd.lm_eval)
app.add_typer(datasets_cmd.app, name="datasets")
app.add_typer(store_cmd.app, name="store")


def main() -> None:
    from kvbench.errors import KvbenchError
    from kvbench.quiet import quiet_libraries

    quiet_libraries()
    try:
        app()
    except KvbenchError as err:
        typer.secho(f"error: {err}", err=True, fg="red")
        sys.exit(2)
