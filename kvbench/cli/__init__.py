"""The ``kvbench`` command line: Typer wiring only; each command lives in its own module."""

from __future__ import annotations

import sys

import typer

from kvbench.cli import bench as bench_cmd
from kvbench.cli import calibrate as calibrate_cmd
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
app.command("calibrate")(calibrate_cmd.calibrate)
app.command("lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                         "help_option_names": []})(lmeval_cmd.lm_eval)
app.add_typer(datasets_cmd.app, name="datasets")
app.add_typer(store_cmd.app, name="store")


def main() -> None:
    # typer vendors click: its exceptions are typer's own (typer 0.29)
    from typer._click import exceptions as click

    from kvbench.errors import KvbenchError
    from kvbench.quiet import quiet_libraries

    quiet_libraries()
    try:
        code = app(standalone_mode=False)  # an early exit (typer.Exit) comes back as its code
    except KvbenchError as err:
        typer.secho(f"error: {err}", err=True, fg="red")
        sys.exit(2)
    except click.NoArgsIsHelpError as err:  # a bare command group: its help, as before
        typer.echo(err.ctx.get_help())
        sys.exit(2)
    except click.UsageError as err:  # a malformed command line: one line, with where to look
        command = err.ctx.command_path if err.ctx else "kvbench"
        typer.secho(f"error: {err.format_message()} (see {command} --help)", err=True, fg="red")
        sys.exit(2)
    except typer.Exit as err:  # commands that end early
        sys.exit(err.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    if isinstance(code, int) and code:
        sys.exit(code)
