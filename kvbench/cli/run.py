from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import kvbench.cli.run_options as options


def _split(values: list[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _command(kind: str, doc: str) -> Callable[..., None]:
    """The ``run`` or ``fidelity`` command: the same options (``run_options``), one frozen ``RunConfig``."""

    def command(  # typer reads a list option's default from the signature; nothing mutates it
        model: options.Model = "smollm2-135m",
        press: options.Press = ["full"],  # noqa: B006
        budget: options.Budget = [],  # noqa: B006
        press_arg: options.PressArg = [],  # noqa: B006
        dataset: options.Dataset = "arith", num_samples: options.NumSamples = None,
        max_new_tokens: options.MaxNewTokens = None, seed: options.Seed = 0, protocol: options.Protocol = "kvbench",
        system_prompt: options.SystemPrompt = None, temperature: options.Temperature = None,
        top_p: options.TopP = None, top_k: options.TopK = None, repetition_penalty: options.RepetitionPenalty = None,
        store: options.Store = Path("results"), dtype: options.Dtype = "auto", device: options.Device = "auto",
        data_dir: options.DataDir = None, dataset_revision: options.DatasetRevision = None,
        batch_size: options.BatchSize = 1, batching: options.Batching = "continuous",
        retry_failed: options.RetryFailed = False,
        measure: options.Measure = [],  # noqa: B006
        stop_on_loop: options.StopOnLoop = False,
        compile: options.Compile = False, compile_backend: options.CompileBackend = None,
    ) -> None:
        from kvbench.errors import ConfigError
        from kvbench.runs.plan import RunConfig, parse_budget

        if compile_backend is not None and not compile:
            raise ConfigError(f"--compile-backend {compile_backend} applies with --compile (give both)")

        config = RunConfig(
            model=model, presses=tuple(_split(press)), budgets=tuple(parse_budget(b) for b in _split(budget)),
            press_args=tuple(press_arg), dataset=dataset, num_samples=num_samples, max_new_tokens=max_new_tokens,
            seed=seed, temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
            protocol=protocol, system_prompt=system_prompt, store=str(store), dtype=dtype, device=device,
            data_dir=str(data_dir) if data_dir else None, dataset_revision=dataset_revision, batch_size=batch_size,
            batching=batching, stop_on_loop=stop_on_loop, measure=tuple(_split(measure)), kind=kind,
            compile=(compile_backend or "inductor") if compile else None,
        )
        _execute(config, retry_failed)

    command.__doc__ = doc
    return command


run = _command("generate", "Generate, score and store one model on one dataset for each press x budget; print the "
               "comparison.")
fidelity = _command("fidelity", """Teacher-forced fidelity: replay the full cache's response under each press x budget.

    Per step: KL(full || compressed) of the next-token distributions, top-1 agreement, and the rank of the full
    cache's token; one forward per token, no sampling. Same options as `run`.
    """)


def _execute(config, retry_failed: bool) -> None:
    """Plan (bad input fails before any model loads), execute with a progress bar, print the table."""
    from rich.console import Console

    from kvbench.cli.progress import progress_bar
    from kvbench.cli.tables import ranking_table, result_table
    from kvbench.runs.plan import execute, plan

    planned = plan(config)
    kind = config.kind
    verb = "replaying" if kind == "fidelity" else "generating"
    with progress_bar() as progress:
        bar = progress.add_task(f"loading {config.model}", total=None)

        def on_start(total: int) -> None:
            progress.update(bar, total=total, description=verb)

        def on_example(cell, example) -> None:
            label = cell.press.name if cell.budget is None else f"{cell.press.name}@{cell.budget}"
            progress.update(bar, advance=1, description=f"{verb} {label}")

        task, cells = execute(config, on_start=on_start, on_example=on_example, retry_failed=retry_failed,
                              planned=planned)
    console = Console(width=max(Console().width, 120))
    if kind == "generate" and "fidelity" in config.measure:
        table, lines = ranking_table(task, cells, config)
        console.print(table)
        for line in lines:
            console.print(line, soft_wrap=True)  # a long reading line wraps in the terminal, not mid-table
        return
    console.print(result_table(task, cells, config))

