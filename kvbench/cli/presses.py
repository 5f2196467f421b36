from __future__ import annotations


def presses() -> None:
    """List the eviction policies, their parameters with defaults, and their sources."""
    from rich.console import Console
    from rich.table import Table

    from kvbench.presses import PRESSES, WRAPPERS, class_parameters, press_parameters

    table = Table(title="presses (set parameters with --press-arg key=value or press.key=value)", show_lines=True)
    table.add_column("press", style="bold")
    table.add_column("rule (higher = keep)")
    table.add_column("parameters (default)")
    table.add_column("source")
    for name, cls in PRESSES.items():
        params = "\n".join(f"{p}={d!r}: {doc}" if doc else f"{p}={d!r}" for p, _, d, doc in press_parameters(name))
        table.add_row(name, cls.summary, params, cls.source)
    for name, cls in WRAPPERS.items():  # their own parameters; the wrapped press brings its own
        params = "\n".join(f"{p}={d!r}: {doc}" if doc else f"{p}={d!r}"
                           for p, _, d, doc in class_parameters(cls))
        table.add_row(f"{name}:PRESS", cls.summary, params, cls.source)
    Console(width=160).print(table)
