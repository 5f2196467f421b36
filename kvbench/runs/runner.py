"""One runner for every cell: the session's rows of one (press, budget) under one run's settings, stored as they come.

``store_cell`` is the skeleton ``run`` (free generation) and ``fidelity`` (teacher-forced replay) share: under the
cell's lock, the pending examples in batches; a batch that fails with an error the user cannot prevent (out of
memory, device, disk) is recorded as failed and the cell goes on; each row is stored as one atomic part and its
stale failure record cleared. ``run.RunConfig`` says what to run, ``run.plan`` checks it first.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from kvbench.errors import ConfigError
from kvbench.presses import Press, for_tokenizer
from kvbench.runs.measurement_columns import attention_loss_columns, critical_token_positions, retention_columns
from kvbench.runs.session import Session
from kvbench.store import ResultStore
from kvbench.store.compaction import compact
from kvbench.tasks import Example, Task
from kvbench.tasks.protocols import get_protocol

if TYPE_CHECKING:
    from kvbench.runs.config import RunConfig


@dataclass(frozen=True)
class Cell:
    """One (press, budget) combination, keyed once its model revision is known (``plan.keyed``), with the rows it
    produced (``plan.execute`` returns cells with them). Frozen: each step makes the next cell, none writes back."""

    press: Press
    budget: int | None
    run_key: str = ""
    rows: tuple[dict, ...] = ()


def decoding(config: RunConfig) -> dict:
    """Temperature, top-p, top-k and repetition penalty: the options given, else the protocol's."""
    protocol = get_protocol(config.protocol)
    values = {name: getattr(config, name) if getattr(config, name) is not None else getattr(protocol, name)
              for name in ("temperature", "top_p", "top_k", "repetition_penalty")}
    if not all(math.isfinite(v) for v in values.values()):
        raise ConfigError("--temperature, --top-p and --repetition-penalty must be finite numbers")
    if values["temperature"] < 0 or not 0.0 < values["top_p"] <= 1.0:
        raise ConfigError("--temperature must be >= 0 and --top-p in (0, 1]")
    if values["top_k"] < 0 or values["repetition_penalty"] <= 0:
        raise ConfigError("--top-k must be >= 0 and --repetition-penalty > 0")
    return values


def max_new_tokens(config: RunConfig, task: Task) -> int:
    return config.max_new_tokens or int(task.generation.get("max_new_tokens", 512))


def pending(store: ResultStore, cell: Cell, examples: list[Example], retry_failed: bool = False) -> list[Example]:
    """Examples of ``cell`` not yet stored (nor recorded as failed, unless retrying failures)."""
    skip = store.done(cell.run_key)
    if not retry_failed:
        skip |= {(f["example_id"], f["sample"]) for f in store.failures(cell.run_key)}
    return [e for e in examples if (e.id, 0) not in skip]


#: What a cell's producer yields: (index of the example in the chunk it was given, its output), as each finishes.
Produced = Iterator[tuple[int, object]]


def store_cell(store: ResultStore, config: RunConfig, task: Task, examples: list[Example], cell: Cell,
               produce: Callable[[list[Example], set[int]], Produced], row_of: Callable[[Example, object], dict],
               chunk_size: int | None = 1, retry_failed: bool = False,
               on_example: Callable[[Cell, Example], None] | None = None) -> int:
    """Every pending example of ``cell``, in chunks of ``chunk_size`` (None = all at once, for continuous batching):
    ``produce(chunk, started)`` yields each example's output as it finishes and adds to ``started`` the examples
    it has begun; ``row_of(example, output)`` makes its row, stored at once. Returns rows written.

    A chunk that fails with an error the user cannot prevent (out of memory, device, disk) records its examples
    begun and not finished as failed; the rest of the chunk and the cell go on. The cell's lock makes this
    process its only writer, so concurrent sweeps never duplicate a row.
    """
    written = 0
    with store.lock(cell.run_key):
        store.clear_stale_failures(cell.run_key)
        todo = pending(store, cell, examples, retry_failed)  # re-read under the lock
        while todo:
            chunk = todo if chunk_size is None else todo[:chunk_size]
            started: set[int] = set()
            finished: set[int] = set()
            try:
                for index, output in produce(chunk, started):
                    store.append([row_of(chunk[index], output)])  # one atomic part per example
                    store.clear_failure(cell.run_key, chunk[index].id, 0)
                    finished.add(index)
                    written += 1
                    if on_example:
                        on_example(cell, chunk[index])
            except (RuntimeError, MemoryError, OSError) as err:  # out of memory, device or disk: record, go on
                if not started:  # it failed before beginning any: the whole chunk fails
                    started = set(range(len(chunk)))
                record_failures(store, config, task, cell, [chunk[i] for i in sorted(started - finished)], err,
                                on_example)
            todo = [e for i, e in enumerate(chunk) if i not in started] + todo[len(chunk):]
        compact(store, {cell.run_key}, wait=False)  # the cell's one-row parts into one (skipped if one is running)
    return written


def run_generation_cell(
    session: Session, config: RunConfig, task: Task, examples: list[Example], cell: Cell,
    retry_failed: bool = False, on_example: Callable[[Cell, Example], None] | None = None,
) -> int:
    """Generate, score and store every pending example of one cell; return how many rows were written."""
    from kvbench.engine.continuous import ContinuousGeneration
    from kvbench.engine.generate import Hooks, generate
    from kvbench.runs.fidelity import fidelity_columns

    tokenizer = session.loaded.tokenizer
    codec = session.codec(task)
    settings = generation_settings(session, config, task)

    continuous = batching(config, cell) == "continuous"
    press = for_tokenizer(cell.press, tokenizer)  # what the press reads of the tokenizer (SepLLM's separators)

    def produce(chunk: list[Example], started: set[int]) -> Produced:
        prompts = [codec.prompt(e) for e in chunk]
        critical = ([critical_token_positions(tokenizer, task, e, p) for e, p in zip(chunk, prompts)]
                    if "retention" in config.measure else None)
        ids = [codec.encode(p) for p in prompts]
        loss = "attention-loss" in config.measure
        if not continuous:
            started.update(range(len(chunk)))
            outputs = generate(session.loaded.model, ids, press, cell.budget, settings, detokenize=codec.decode,
                               pad_token_id=tokenizer.pad_token_id, measure_attention_loss=loss,
                               critical_positions=critical, compile_backend=config.compile)
            yield from enumerate(zip(prompts, outputs))
            return
        stream = ContinuousGeneration(session.loaded.model, ids, press, cell.budget, settings,
                                      batch_size(config, cell), detokenize=codec.decode,
                                      pad_token_id=tokenizer.pad_token_id,
                                      hooks=Hooks(attention_loss=loss, critical_positions=critical),
                                      on_admit=started.add, compile_backend=config.compile)
        for finished in stream.steps():
            yield from ((index, (prompts[index], out)) for index, out in finished)

    def row_of(example: Example, output: tuple[str, object]) -> dict:
        prompt, out = output
        fidelity = ({} if "fidelity" not in config.measure
                    else fidelity_columns(session, task, example, cell.press, cell.budget, settings, config.compile))
        return {
            **base_row(session, config, task, cell, example, prompt, out, settings),
            **task.score(out.text, example.gold, prompt).columns(),
            **attention_loss_columns(out.attention_loss, settings.max_new_tokens),
            **retention_columns(out.retention), **fidelity,
        }

    return store_cell(ResultStore(config.store), config, task, examples, cell, produce, row_of,
                      None if continuous else batch_size(config, cell), retry_failed, on_example)


def run_fidelity_cell(
    session: Session, config: RunConfig, task: Task, examples: list[Example], cell: Cell,
    retry_failed: bool = False, on_example: Callable[[Cell, Example], None] | None = None,
) -> int:
    """Replay every pending example's full-cache response under the cell's press (``kvbench.runs.fidelity``); store one
    row each (kind "fidelity"); return rows written."""
    from kvbench.runs.fidelity import reference, replay

    settings = generation_settings(session, config, task)

    def produce(chunk: list[Example], started: set[int]) -> Produced:
        started.add(0)
        ref = reference(session, task, chunk[0], settings, config.compile)
        yield 0, (ref, *replay(session, task, ref, cell.press, cell.budget, settings, config.compile))

    def row_of(example: Example, output: tuple) -> dict:
        ref, out, columns = output
        row = base_row(session, config, task, cell, example, ref.prompt, out, settings)
        return {**row, **columns, "batch_size": 1, "batching": "static"}  # replayed one example at a time

    return store_cell(ResultStore(config.store), config, task, examples, cell, produce, row_of, 1, retry_failed,
                      on_example)


def batching(config: RunConfig, cell: Cell) -> str:
    """How the cell's examples are batched: ``config.batching``, except that ShadowKV's sparse cache (which
    cannot take a sequence into a running batch) and batch 1 are static."""
    if batch_size(config, cell) == 1 or cell.press.sparse:
        return "static"
    return config.batching


def batch_size(config: RunConfig, cell: Cell) -> int:
    """Sequences decoded at once: ``--batch-size``, or 1 for a press whose choices are not batch-invariant."""
    return config.batch_size if cell.press.batch_invariant else 1


def generation_settings(session: Session, config: RunConfig, task: Task):
    from kvbench.engine.generate import GenerationSettings
    from kvbench.engine.loops import RepetitionStop

    protocol = get_protocol(config.protocol)
    return GenerationSettings(
        max_new_tokens=max_new_tokens(config, task), **decoding(config), seed=config.seed,
        eos_token_ids=session.codec(task).eos, stop_strings=tuple(task.generation.get("stop", ())),
        stop_on_loop=config.stop_on_loop, repetition_stop=RepetitionStop() if protocol.repetition_stop else None,
    )


def base_row(session: Session, config: RunConfig, task: Task, cell: Cell, example: Example, prompt: str, out,
             settings) -> dict:
    """The columns every stored row has: what was run, the output's telemetry, and provenance."""
    return {
        "run_key": cell.run_key, "kind": config.kind, "created_at": datetime.now(timezone.utc),
        "model": config.model, "model_source": session.loaded.spec.source, "model_revision": session.revision,
        "press": cell.press.name, "press_args": json.dumps(cell.press.params(), sort_keys=True),
        "budget": cell.budget, "buffer": cell.press.buffer,
        "dataset": task.name, "dataset_version": task.version, "split": task.split(config.data_dir),
        "dataset_revision": example.source,
        "prompt_hash": task.prompt_hash, "example_id": example.id, "sample": 0, "seed": config.seed,
        "max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature, "top_p": settings.top_p,
        "top_k": settings.top_k, "repetition_penalty": settings.repetition_penalty, "protocol": config.protocol,
        "stop_on_loop": config.stop_on_loop, "compile": config.compile,
        "prompt": prompt, "response": out.text, "gold": example.gold,
        "finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens, "output_tokens": out.output_tokens,
        "prefill_s": out.prefill_s, "decode_s": out.decode_s, "tokens_per_s": out.tokens_per_s,
        "compile_s": out.compile_s,
        "peak_kv_bytes": out.peak_kv_bytes, "host_kv_bytes": out.host_kv_bytes, "evicted_tokens": out.evicted_tokens,
        "mean_cache_len": out.mean_cache_len, "looped": out.looped, "loop_start": out.loop_start,
        "kv_byte_steps": out.kv_byte_steps, "batch_size": batch_size(config, cell), "batching": batching(config, cell),
        **session.provenance,
    }


def record_failures(store: ResultStore, config: RunConfig, task: Task, cell: Cell, examples: list[Example],
                    err: Exception, on_example: Callable[[Cell, Example], None] | None = None) -> None:
    """Record that ``examples`` failed with ``err`` (e.g. out of memory), so the run can go on."""
    _release_memory()
    message = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
    for example in examples:
        store.record_failure(cell.run_key, example.id, 0, message, {"press": cell.press.name, "budget": cell.budget,
                                                                    "dataset": task.name, "model": config.model})
        if on_example:
            on_example(cell, example)


def _release_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
