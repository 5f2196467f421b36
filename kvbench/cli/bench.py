from __future__ import annotations

from pathlib import Path

import typer

from kvbench.cli.run import _split


def bench(
    model: str = typer.Option("smollm2-135m", help="Model as for `run`; with --random-weights also a shape alias: "
                              "r1-qwen-7b, llama-3.1-8b."),
    press: list[str] = typer.Option(["streaming_llm,knorm,random,snapkv-d,h2o"], "--press", "-p",
                                    help="Presses to time; the full cache always runs as the reference."),
    budget: list[str] = typer.Option(["128"], "--budget", "-b", help="KV entries per layer per KV head; repeatable."),
    batch_size: list[str] = typer.Option(["1"], "--batch-size", help="Batch sizes; repeatable or comma-separated."),
    prompt_len: int = typer.Option(128, help="Prompt tokens (random ids, seeded)."),
    gen_len: int = typer.Option(1024, help="Generated tokens per sequence (EOS ignored, so every cell does the same "
                                "work)."),
    press_arg: list[str] = typer.Option([], "--press-arg", "-a", help="Press parameter key=value or press.key=value."),
    random_weights: bool = typer.Option(False, "--random-weights", help="Build the model from its configuration with "
                                        "random weights (no download); needed for the shape aliases."),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16."),
    device: str = typer.Option("auto", help="auto (cuda if present), cpu, cuda, cuda:N."),
    warmup: int = typer.Option(8, help="Decoding steps of an untimed generation per cell first."),
    memory_gib: float | None = typer.Option(None, "--memory-gib", help="Also run each cell alone at the largest batch "
                                            "fitting in this memory (measured on CUDA, KV estimate elsewhere)."),
    max_batch: int = typer.Option(1024, help="Largest batch tried with --memory-gib."),
    static_shapes: bool = typer.Option(False, "--static-shapes", help="Attend over every preallocated slot."),
    compile: bool = typer.Option(False, "--compile", help="Also decode each cell as one compiled graph per step, "
                                 "beside eager; and time HF generate eager and with its static cache compiled."),
    compile_backend: str | None = typer.Option(None, help="--compile's backend: inductor (default), eager, aot_eager."),
    profile: Path | None = typer.Option(None, "--profile", help="Also write each cell's torch profiler table "
                                        "(its last 64 decoding steps: the cache at its budget) to this directory."),
    ops: bool = typer.Option(False, "--ops", help="Also count the aten operators (and host synchronisations) one "
                             "decoding step launches per cell, and HF generate's for reference: ops/step (three "
                             "more short generations per cell, under a dispatch-mode counter)."),
    workload: str = typer.Option("step", help="step: equal decoding steps, cells side by side. run: whole runs "
                                 "of --examples examples on a length mix (15% reach --gen-len, the rest log-normal, "
                                 "median --gen-len/6) by batch 1, static and continuous batching: examples/hour."),
    examples: int = typer.Option(32, help="Examples per whole run (--workload run)."),
    seed: int = typer.Option(0, help="Seed of the prompts, the random weights and seeded presses."),
    store: Path | None = typer.Option(None, help="Also append the results to STORE/bench/ (see `kvbench report "
                                      "--bench`)."),
    format: str = typer.Option("terminal", "--format", "-f", help="terminal, markdown or csv."),
) -> None:
    """Decoding speed and memory of each press against the full cache: tokens/s, ms per step, ratio, KV MiB.

    The cells of a batch size run side by side, one decoding step each in turn, so they share the machine's
    conditions; every step is timed between device synchronisations, after a warm-up.
    """
    from kvbench.bench.core import execute, validate
    from kvbench.bench.results import FORMATS, frame, render
    from kvbench.checks import choice
    from kvbench.cli.progress import progress_bar

    config = _config(locals())
    choice("--format", format, FORMATS)
    validate(config)  # bad input fails before the model loads
    with progress_bar() as progress:
        bar = progress.add_task(f"loading {model}", total=None)

        def on_progress(label: str, done: int, total: int) -> None:
            progress.update(bar, completed=done, total=total, description=label)

        rows, dtype_name, device_name = execute(config, on_progress=on_progress)
    typer.echo(render(frame(config, dtype_name, device_name, rows), fmt=format), nl=False)
    if store:
        typer.echo(f"stored in {store}/bench/")


def _config(o: dict):
    """The frozen ``BenchConfig`` of the command's options."""
    from kvbench.bench.core import BenchConfig
    from kvbench.errors import KvbenchError
    from kvbench.runs.plan import parse_budget

    if o["compile_backend"] is not None and not o["compile"]:
        raise KvbenchError(f"--compile-backend {o['compile_backend']} applies with --compile (give both)")
    budgets = tuple(parse_budget(b) for b in _split(o["budget"]))
    if None in budgets:
        raise KvbenchError("bench budgets are numbers (the full cache always runs as the reference)")
    try:
        batches = tuple(int(b) for b in _split(o["batch_size"]))
    except ValueError:
        raise KvbenchError(f"--batch-size takes integers, got {o['batch_size']}") from None
    return BenchConfig(
        model=o["model"], presses=tuple(_split(o["press"])), budgets=budgets, batch_sizes=batches,
        prompt_len=o["prompt_len"], gen_len=o["gen_len"], press_args=tuple(o["press_arg"]),
        random_weights=o["random_weights"], dtype=o["dtype"], device=o["device"], warmup=o["warmup"],
        memory_gib=o["memory_gib"], max_batch=o["max_batch"], static_shapes=o["static_shapes"],
        compile=o["compile"], compile_backend=o["compile_backend"] or "inductor",
        profile_dir=str(o["profile"]) if o["profile"] else None, seed=o["seed"],
        count_ops=o["ops"], workload=o["workload"], examples=o["examples"],
        store=str(o["store"]) if o["store"] else None,
    )
