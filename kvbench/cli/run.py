from __future__ import annotations

import inspect
from pathlib import Path

import typer


def _split(values: list[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def run(
    model: str = typer.Option("smollm2-135m", help="HF id, local directory, .gguf file, or alias: "
                              "smollm2-135m, tiny-llama, tiny-qwen2."),
    press: list[str] = typer.Option(["full"], "--press", "-p", help="Eviction policy; repeat or comma-separate "
                                    "to compare several (see `kvbench presses`)."),
    budget: list[str] = typer.Option([], "--budget", "-b", help="KV entries kept per layer per KV head, prompt "
                                     "included; repeat for several; 'full' = no eviction."),
    press_arg: list[str] = typer.Option([], "--press-arg", "-a", help="Press parameter key=value (every press "
                                        "that has it) or press.key=value; repeatable."),
    dataset: str = typer.Option("arith", "--dataset", "-d", help="Dataset config name "
                           "(`kvbench datasets list`; datasets_cfg/)."),
    num_samples: int | None = typer.Option(None, "--num-samples", "-n", help="Use a fixed seeded subset of N "
                                           "examples (the same for every press and budget)."),
    max_new_tokens: int | None = typer.Option(None, help="Generation limit (default: the dataset's)."),
    seed: int = typer.Option(0, help="Seed for sampling and seeded presses."),
    protocol: str = typer.Option("kvbench", help="Everything outside the cache that shapes the numbers: kvbench "
                                 "(chat template, faithful scorers) or hott / hott-sampling (the paper's harness as "
                                 "its code ran; see the README's protocol table)."),
    system_prompt: str | None = typer.Option(None, help="System prompt under the chat template (default: the "
                                             "model's own, e.g. Nemotron's 'detailed thinking on'; '' = none)."),
    temperature: float | None = typer.Option(None, help="0 = greedy (default: the protocol's; greedy but "
                                             "hott-sampling)."),
    top_p: float | None = typer.Option(None, help="Nucleus sampling threshold (with --temperature > 0)."),
    top_k: int | None = typer.Option(None, help="Sample among the k most likely tokens (0 = all)."),
    repetition_penalty: float | None = typer.Option(None, help="transformers' repetition penalty (1 = none)."),
    store: Path = typer.Option(Path("results"), help="Parquet result store directory."),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16."),
    device: str = typer.Option("auto", help="auto (cuda if present), cpu, cuda, cuda:N."),
    data_dir: Path | None = typer.Option(None, help="Local data <dir>/<name>/<split>.jsonl instead of the hub "
                                         "(default: $KVBENCH_DATA_DIR)."),
    dataset_revision: str | None = typer.Option(None, help="Hub revision of the dataset (commit, branch or tag; "
                                                "default: the dataset YAML's). The commit read is stored."),
    batch_size: int = typer.Option(1, help="Sequences decoding at once (evicted per sequence)."),
    batching: str = typer.Option("continuous", help="continuous: a finished sequence's row takes the next example "
                                 "at once; static: a batch decodes until its longest sequence ends. Outputs are "
                                 "the same, token for token; only speed differs (stored in column 'batching')."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Rerun examples recorded as failed."),
    measure: list[str] = typer.Option([], "--measure", help="Extra measurement, repeatable: attention-loss "
                                      "(attention mass on evicted entries, exact against a shadow full cache); "
                                      "retention (share of the question's numbers, names and option labels held); "
                                      "fidelity (the full cache's response replayed under the press: top-1 "
                                      "agreement and KL; the table then ranks the presses by it)."),
    stop_on_loop: bool = typer.Option(False, "--stop-on-loop", help="End a generation that falls into repetition "
                                      "(finish reason 'loop'); loops are measured either way."),
) -> None:
    """Generate, score and store one model on one dataset for each press x budget; print the comparison."""
    _execute(locals(), kind="generate")


def _execute(o: dict, kind: str) -> None:
    """Shared by ``run`` and ``fidelity``: build the frozen config from the options, execute, print the table."""
    from rich.console import Console

    from kvbench.cli.progress import progress_bar
    from kvbench.cli.tables import ranking_table, result_table
    from kvbench.runs.plan import RunConfig, execute, parse_budget, plan

    config = RunConfig(
        model=o["model"], presses=tuple(_split(o["press"])),
        budgets=tuple(parse_budget(b) for b in _split(o["budget"])),
        press_args=tuple(o["press_arg"]), dataset=o["dataset"], num_samples=o["num_samples"],
        max_new_tokens=o["max_new_tokens"], seed=o["seed"], temperature=o["temperature"], top_p=o["top_p"],
        top_k=o["top_k"], repetition_penalty=o["repetition_penalty"], protocol=o["protocol"],
        system_prompt=o["system_prompt"],
        store=str(o["store"]), dtype=o["dtype"], device=o["device"],
        data_dir=str(o["data_dir"]) if o["data_dir"] else None, dataset_revision=o["dataset_revision"],
        batch_size=o["batch_size"], batching=o.get("batching", "continuous"),
        stop_on_loop=o["stop_on_loop"], measure=tuple(_split(o["measure"])), kind=kind,
    )
    planned = plan(config)  # fail on bad input before any model loads
    verb = "replaying" if kind == "fidelity" else "generating"
    with progress_bar() as progress:
        bar = progress.add_task(f"loading {config.model}", total=None)

        def on_start(total: int) -> None:
            progress.update(bar, total=total, description=verb)

        def on_example(cell, example) -> None:
            label = cell.press.name if cell.budget is None else f"{cell.press.name}@{cell.budget}"
            progress.update(bar, advance=1, description=f"{verb} {label}")

        task, cells = execute(config, on_start=on_start, on_example=on_example, retry_failed=o["retry_failed"],
                              planned=planned)
    console = Console(width=max(Console().width, 120))
    if kind == "generate" and "fidelity" in config.measure:
        table, lines = ranking_table(task, cells, config)
        console.print(table)
        for line in lines:
            console.print(line)
        return
    console.print(result_table(task, cells, config))


def fidelity(**options) -> None:
    """Teacher-forced fidelity: replay the full cache's response under each press x budget.

    Per step: KL(full || compressed) of the next-token distributions, top-1 agreement, and the rank of the full
    cache's token; one forward per token, no sampling. Same options as `run`.
    """
    _execute(options, kind="fidelity")


fidelity.__signature__ = inspect.signature(run)  # typer reads run's options for fidelity too
fidelity.__annotations__ = run.__annotations__
