from __future__ import annotations

import typer

from kvbench.cli.run import _split


def verify(
    press: str = typer.Argument(..., help="A press as --press takes it: a name, wrapper:press, module.path:Class or "
                                "path/to/file.py:Class."),
    press_arg: list[str] = typer.Option([], "--press-arg", "-a", help="Press parameter key=value (scale buffers and "
                                        "windows to the tiny models' short runs, e.g. -a buffer=4)."),
    arch: list[str] = typer.Option([], "--arch", help="Tiny architectures (default: all five); repeatable or "
                                   "comma-separated."),
    check: list[str] = typer.Option([], "--check", "-c", help="Checks to run (default: all); repeatable or "
                                    "comma-separated."),
    format: str = typer.Option("terminal", "--format", "-f", help="terminal or markdown."),
) -> None:
    """Certify a press: run kvbench's correctness oracles against it on a seeded tiny model of every supported
    architecture, and print checks x architectures with pass/fail and the worst deviation.

    The checks: budget >= length equals the full cache and HF generate; eviction equals masking (every step's
    logits against an independent masked forward, 1e-4); batched equals batch 1 with sequences ending early; the
    cache never exceeds its declared bound; no per-step growth once full; two runs alike; scores ignore invalid
    slots; the press object is unchanged by a run. Exit code 1 if any check fails (its first failing step, layer
    and head are printed), 2 on bad input.
    """
    from kvbench.checks import choice
    from kvbench.cli.progress import progress_bar
    from kvbench.verify import ARCHITECTURES, VerifyConfig, check_names, run_checks, validate

    choice("--format", format, ("terminal", "markdown"))
    config = VerifyConfig(press=press, press_args=tuple(press_arg), architectures=tuple(_split(arch)) or ARCHITECTURES,
                          checks=tuple(_split(check)))
    validate(config)  # bad input fails before any model is built
    with progress_bar(transient=True) as progress:
        bar = progress.add_task("verifying", total=len(config.architectures) * len(config.checks or check_names()))

        def on_progress(arch: str, name: str) -> None:
            progress.update(bar, advance=1, description=f"{arch}: {name}")

        results = run_checks(config, on_progress=on_progress)
    typer.echo(_table(press, results, format))
    failures = [(arch, o) for arch, outcomes in results.items() for o in outcomes if o.failed]
    if failures:
        arch, first = failures[0]
        typer.secho(f"FAILED {len(failures)} check(s); first: {first.check} on {arch} at {first.where}", err=True,
                    fg="red")
        raise typer.Exit(1)
    passed = sum(o.status == "pass" for outcomes in results.values() for o in outcomes)
    total = sum(len(outcomes) for outcomes in results.values())
    if not passed:
        typer.secho(f"NOTHING VERIFIED: no check applies to {press} as given (see n/a above)", err=True, fg="red")
        raise typer.Exit(1)
    typer.echo(f"{press}: {passed} of {total} checks passed, none failed ({total - passed} n/a)")


def _table(press: str, results: dict, fmt: str) -> str:
    """Checks down, architectures across; each cell the status and the worst deviation, a failure its place."""
    from kvbench.text_table import markdown_table, text_table

    archs = list(results)
    names = [o.check for o in results[archs[0]]]
    rows = []
    for i, name in enumerate(names):
        cells = []
        for arch in archs:
            outcome = results[arch][i]
            text = "PASS" if outcome.status == "pass" else outcome.status.upper() if outcome.failed else "n/a"
            detail = outcome.worst if outcome.status == "pass" else outcome.where
            cells.append(f"{text} {detail}".strip() if outcome.status != "n/a" else f"n/a ({outcome.where})")
        rows.append([name, *cells])
    headers = ["check", *archs]
    if fmt == "markdown":
        return markdown_table(headers, rows, left=len(headers))
    return text_table(f"kvbench verify {press}", headers, rows, left=len(headers))
