from __future__ import annotations


def presses() -> None:
    """List the eviction policies, their parameters with defaults, and their sources (installed plug-in presses
    too; any other press class is used as --press module:Class or --press path/to/file.py:Class)."""
    from rich.console import Console
    from rich.table import Table

    from kvbench.presses import PRESSES, WRAPPERS, class_parameters, plugin_presses, press_parameters
    from kvbench.presses.plugins import installed

    table = Table(title="presses (set parameters with --press-arg key=value or press.key=value)", show_lines=True)
    table.add_column("press", style="bold")
    table.add_column("rule (higher = keep)")
    table.add_column("parameters (default)")
    table.add_column("source (code checked in tests/reference/)", min_width=48)
    for name, cls in PRESSES.items():
        params = "\n".join(f"{p}={d!r}: {doc}" if doc else f"{p}={d!r}" for p, _, d, doc in press_parameters(name))
        table.add_row(name, cls.summary, params, _source(cls))
    for name, cls in WRAPPERS.items():  # their own parameters; the wrapped press brings its own
        params = "\n".join(f"{p}={d!r}: {doc}" if doc else f"{p}={d!r}"
                           for p, _, d, doc in class_parameters(cls))
        table.add_row(f"{name}:PRESS", cls.summary, params, _source(cls))
    for name, found in plugin_presses().items():  # installed packages' presses (entry points kvbench.presses)
        origin = f"plug-in {installed()[name].value}"
        if isinstance(found, Exception):
            table.add_row(name, f"[red]does not load: {found}[/red]", "", origin)
            continue
        params = "\n".join(f"{p}={d!r}: {doc}" if doc else f"{p}={d!r}" for p, _, d, doc in press_parameters(name))
        table.add_row(name, found.summary, params, f"{found.source}\n({origin})".strip())
    Console(width=160).print(table)


def _source(cls) -> str:
    """The paper a press comes from and the code its rule is transcribed from (``Press.reference``)."""
    return f"{cls.source}\ncode: {cls.reference}" if cls.reference else cls.source
