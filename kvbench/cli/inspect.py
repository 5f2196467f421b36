from __future__ import annotations

from pathlib import Path

import typer

from kvbench.cli.run import _split


def inspect(
    model: str = typer.Option("smollm2-135m", help="Model as for `run`."),
    press: list[str] = typer.Option(["snapkv-d,streaming_llm"], "--press", "-p", help="Presses to picture; repeat "
                                    "or comma-separate (one panel each, per budget)."),
    budget: list[str] = typer.Option(["64"], "--budget", "-b", help="KV entries per layer per KV head; repeatable; "
                                     "'full' = no eviction."),
    press_arg: list[str] = typer.Option([], "--press-arg", "-a", help="Press parameter key=value or "
                                        "press.key=value; repeatable."),
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="Dataset (default: gsm8k when its local data "
                                       "is present, else the built-in arith)."),
    example: int = typer.Option(0, help="Which example (0-based, in the order `run` takes them)."),
    max_new_tokens: int = typer.Option(128, help="Generation limit."),
    protocol: str = typer.Option("kvbench", help="As for `run`."),
    out: Path = typer.Option(Path("inspect"), help="Directory for inspect.html (hover a cell: the token, its "
                             "position, when it was evicted, in how many layers and heads) and inspect.png."),
    seed: int = typer.Option(0, help="Seed for sampling and seeded presses."),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16."),
    device: str = typer.Option("auto", help="auto (cuda if present), cpu, cuda, cuda:N."),
    data_dir: Path | None = typer.Option(None, help="Local data instead of the hub (default: $KVBENCH_DATA_DIR)."),
) -> None:
    """A picture of what each press kept: tokens along x, forwards along y, held vs evicted, for one example.

    Writes a self-contained HTML page and a PNG, and prints the text with what the cache holds at the end
    (evicted tokens dimmed).
    """
    from rich.console import Console

    from kvbench.checks import output_dir
    from kvbench.inspection.render import write_html, write_png
    from kvbench.inspection.trace import InspectConfig, default_dataset, plan
    from kvbench.inspection.trace import inspect as run_inspect
    from kvbench.runs.plan import RunConfig, parse_budget

    local = str(data_dir) if data_dir else None
    run = RunConfig(
        model=model, presses=tuple(_split(press)), budgets=tuple(parse_budget(b) for b in _split(budget)),
        press_args=tuple(press_arg), dataset=dataset or default_dataset(local), max_new_tokens=max_new_tokens,
        protocol=protocol, seed=seed, dtype=dtype, device=device, data_dir=local,
    )
    config = InspectConfig(run=run, example=example)
    output_dir("--out", out, files=("inspect.html", "inspect.png"))
    plan(config)  # bad input fails before the model loads
    out.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)
    with console.status("loading the model") as status:
        panels = run_inspect(config, on_cell=lambda label: status.update(f"generating under {label}"))
    title = f"{model} on {run.dataset} example {example}: what the cache held"
    html_path = write_html(panels, out / "inspect.html", title)
    png_path = write_png(panels, out / "inspect.png", title)
    _print_text(panels)
    typer.echo(f"wrote {html_path} and {png_path}")


def _print_text(panels) -> None:
    """Each panel's text as the cache holds it at the end: held everywhere plain, partly yellow, evicted dim."""
    from rich.console import Console
    from rich.text import Text

    console = Console()
    console.print("What the cache holds at the end: plain = held by every layer and KV head, "
                  "[yellow]yellow = by some[/], [dim strike]dim = evicted[/] from all; the output in bold.")
    for panel in panels:
        text = Text()
        for i, token in enumerate(panel.tokens):
            share = panel.final_share(i)
            style = ("" if share is None or share == 1 else "dim strike" if share == 0 else "yellow")
            text.append(token, style=("bold " if i >= panel.prompt_tokens and style == "" else "") + style)
        console.rule(panel.label)
        console.print(text)
