from __future__ import annotations

import typer

app = typer.Typer(help="List, inspect and validate dataset configs (datasets_cfg/).",
                  no_args_is_help=True)

_DATA_DIR_HELP = "Local data <dir>/<name>/<split>.jsonl instead of the hub (default: $KVBENCH_DATA_DIR)."


def _source(layout: dict | None) -> str:
    if not layout:
        return "-"
    where = layout.get("path") or layout.get("dir") or layout.get("generator")
    split = layout.get("split") or "+".join(layout.get("splits", [])) or ""
    size = layout.get("size", "?")
    where += f"[{layout['name']}]" if layout.get("name") else ""
    where += f"@{layout['revision'][:12]}" if layout.get("revision") else ""
    return f"{where}:{split} ({size})" if split else f"{where} ({size})"


@app.command("list")
def list_datasets() -> None:
    """Every dataset config: version, answer type, scorer, hub and local sources with sizes."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from kvbench.tasks import available, load_task

    table = Table(title="datasets (datasets_cfg/)")
    for column in ("name", "version", "answer", "scorer", "hub", "local / built-in"):
        table.add_column(column)
    for name in available():
        task = load_task(name)
        table.add_row(name, str(task.version), task.answer_type, task.scorer, escape(_source(task.hub)),
                      escape(_source(task.local or task.builtin)))
    Console(width=160).print(table)


@app.command()
def show(
    name: str = typer.Argument(..., help="Dataset name."),
    data_dir: str | None = typer.Option(None, help=_DATA_DIR_HELP),
    protocol: str = typer.Option("kvbench", help="Show the prompt, gold and scorer of this protocol (kvbench, "
                                 "hott, hott-sampling)."),
    revision: str | None = typer.Option(None, help="Hub revision to read (default: the config's)."),
) -> None:
    """The config, the normalised fields of the first example, the size, and its full prompt."""
    from kvbench.tasks import load_examples, load_task
    from kvbench.tasks.protocols import get_protocol

    chosen = get_protocol(protocol)
    task = load_task(name).for_protocol(chosen)
    examples = load_examples(task, data_dir_override=data_dir, revision=revision)
    first = examples[0]
    typer.echo(f"{task.name} v{task.version}: {task.description}")
    typer.echo(f"hub: {_source(task.hub)}    local: {_source(task.local or task.builtin)}")
    typer.echo(f"read from {first.source}")
    typer.echo(f"loaded {len(examples)} examples; answer type {task.answer_type}; extractors "
               f"{', '.join(task.extractors)}; scorer {task.scorer}; generation {task.generation}")
    typer.echo(f"fields: {', '.join(['id', *first.fields, 'gold'])}")
    typer.echo(f"first example: id={first.id} gold={first.gold!r}")
    if chosen.raw_text:
        typer.echo(f"--- raw text (protocol {chosen.name}: no chat template) ---\n{task.user_content(first)[0]}")
        return
    for message in task.messages(first):
        typer.echo(f"--- {message['role']} ---\n{message['content']}")


@app.command()
def validate(data_dir: str | None = typer.Option(None, help=_DATA_DIR_HELP)) -> None:
    """Load every dataset available here and check its size, fields and prompt; non-zero exit if any fails."""
    from rich.console import Console
    from rich.table import Table

    from kvbench.errors import KvbenchError
    from kvbench.tasks import available, load_examples, load_task

    table = Table(title="dataset validation")
    for column in ("dataset", "status", "examples", "read from / detail"):
        table.add_column(column)
    failed = 0
    for name in available():
        try:
            task = load_task(name)
            examples = load_examples(task, data_dir_override=data_dir)
            for example in examples:
                task.messages(example)  # every field the prompt uses exists
                if not example.gold:
                    raise KvbenchError(f"example {example.id} has an empty gold answer")
            table.add_row(name, "[green]ok[/]", str(len(examples)), examples[0].source if examples else "")
        except KvbenchError as err:
            failed += 1
            table.add_row(name, "[red]failed[/]", "-", str(err))
    Console(width=160).print(table)
    if failed:
        raise typer.Exit(1)
