"""``kvbench bench --workload run``: examples per hour of whole runs, by batch 1, static and continuous batching.

A run's real cost depends on how long its outputs are, and reasoning outputs vary from a hundred tokens to the
limit. The workload is a cell's run over ``examples`` random prompts (``prompt_len / 2`` to ``prompt_len``
tokens) whose outputs have lengths drawn from ``length_mix``: ``TAIL_SHARE`` of them run to the limit (a model
that does not conclude), the rest are log-normal with median ``limit x MEDIAN_SHARE`` and shape ``SIGMA``. Each
output is replayed (teacher-forced: it ends exactly at its drawn length, as if EOS came there), so every way of
batching does the same work. The three run side by side, one forward each in turn, every forward timed between
device synchronisations, so they share the machine's conditions; ratios are within the run.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Generator
from dataclasses import dataclass

from kvbench.bench.results import BenchRow
from kvbench.bench.timing import timed_step

#: The length mix: share at the limit, and the rest's log-normal median (share of the limit) and shape.
TAIL_SHARE = 0.15
MEDIAN_SHARE = 1 / 6
SIGMA = 0.8
MIN_LENGTH = 8
LENGTH_MIX = (f"{TAIL_SHARE:.0%} at the limit, the rest log-normal with median limit/{1 / MEDIAN_SHARE:.0f} and "
              f"sigma {SIGMA}")
BATCHINGS = ("batch 1", "static", "continuous")


def length_mix(n: int, limit: int, seed: int) -> list[int]:
    """``n`` output lengths, at most ``limit``, from the documented mix (seeded)."""
    rng = random.Random(seed)
    lengths = []
    for _ in range(n):
        if rng.random() < TAIL_SHARE:
            lengths.append(limit)
        else:
            drawn = round(limit * MEDIAN_SHARE * math.exp(rng.gauss(0.0, SIGMA)))
            lengths.append(max(min(MIN_LENGTH, limit), min(limit, drawn)))
    return lengths


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    #: The tokens each example's output replays (its drawn length).
    outputs: list[list[int]]


def make_workload(n: int, prompt_len: int, limit: int, vocab: int, seed: int) -> Workload:
    rng = random.Random(seed + 1)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(max(1, prompt_len // 2), prompt_len))]
               for _ in range(n)]
    outputs = [[rng.randrange(vocab) for _ in range(length)] for length in length_mix(n, limit, seed)]
    return Workload(prompts, outputs)


def _static(model, work: Workload, press, budget, settings, size: int) -> Generator[None, None, tuple[list, int]]:
    """Batches of ``size`` examples in order, each decoding until its longest output ends; (outputs, decoding
    forwards)."""
    from kvbench.engine.generate import generation

    outputs, forwards = [], 0
    for start in range(0, len(work.prompts), size):
        end = start + size
        batch = yield from generation(model, work.prompts[start:end], press, budget, settings,
                                      seeds=range(start, min(end, len(work.prompts))),
                                      forced_tokens=work.outputs[start:end])
        outputs += batch
        forwards += max(o.output_tokens for o in batch) - 1
    return outputs, forwards


def _continuous(model, work: Workload, press, budget, settings, size: int) -> Generator[None, None, tuple[list, int]]:
    from kvbench.engine.continuous import ContinuousGeneration

    done: dict = {}
    stream = ContinuousGeneration(model, work.prompts, press, budget, settings, size, seeds=range(len(work.prompts)),
                                  forced_tokens=work.outputs)
    for finished in stream.steps():
        done.update(finished)
        yield
    return [done[i] for i in range(len(work.prompts))], stream.decoder.step


def continuous_forwards(lengths: list[int], rows: int) -> int:
    """The decoding forwards continuous batching takes for outputs of these lengths, each prompt taking the first
    free row (as ``ContinuousGeneration`` does: a sequence of n tokens needs its prefill and n - 1 forwards)."""
    queue, forwards = list(lengths), 0
    running: list[list] = []  # [tokens left to choose, waiting for its choice]
    while queue or running:
        while len(running) < rows and queue:
            running.append([queue.pop(0), True])
        for row in running:
            if row[1]:
                row[0], row[1] = row[0] - 1, False
        still = [row for row in running if row[0] > 0]
        if len(still) < len(running):  # some finished: their rows take the next prompts before the forward
            running = still
            continue
        forwards += 1
        for row in running:
            row[1] = True
    return forwards


def side_by_side(runs: dict[str, Generator], steps: dict[str, int], sync: Callable[[], None],
                 on_forward: Callable[[], None]) -> dict[str, tuple[float, int, list]]:
    """Advance the runs by one step each, always the one least far along (``steps``: about how many each takes),
    so that they progress together and share the machine's conditions from start to end; each step timed.
    Returns {name: (seconds, decoding forwards, outputs)}."""
    seconds = dict.fromkeys(runs, 0.0)
    done = dict.fromkeys(runs, 0)
    results: dict[str, tuple[list, int]] = {}
    while len(results) < len(runs):
        name = min((n for n in runs if n not in results), key=lambda n: done[n] / steps[n])
        elapsed, finished, value = timed_step(runs[name], sync)
        if finished:
            results[name] = value
        seconds[name] += elapsed
        done[name] += 1
        on_forward()
    return {name: (seconds[name], results[name][1], results[name][0]) for name in runs}


def run_workload(config, cells: list[tuple[str, int | None]], model, presses: dict, sync: Callable[[], None],
                 on_progress: Callable[[str, int, int], None]) -> list[BenchRow]:
    """Every cell x batch size of ``config`` (a ``BenchConfig``): batch 1, static and continuous side by side."""
    from kvbench.engine.generate import GenerationSettings, generate

    vocab = model.config.get_text_config(decoder=True).vocab_size
    work = make_workload(config.examples, config.prompt_len, config.gen_len, vocab, config.seed)
    settings = GenerationSettings(max_new_tokens=config.gen_len, seed=config.seed)
    lengths = [len(o) for o in work.outputs]
    steps = {size: {"batch 1": sum(lengths),
                    "static": sum(max(lengths[i:i + size]) for i in range(0, len(lengths), size)),
                    "continuous": continuous_forwards(lengths, size) + len(lengths)} for size in config.batch_sizes}
    total, done = sum(sum(s.values()) for s in steps.values()) * len(cells), 0
    rows: list[BenchRow] = []
    for press_name, budget in cells:
        press = presses[press_name]
        for size in config.batch_sizes:
            warm = GenerationSettings(max_new_tokens=min(config.warmup, config.gen_len))
            generate(model, work.prompts[:size], press, budget, warm)  # kernels, allocator, caches
            runs = {"batch 1": _static(model, work, press, budget, settings, 1),
                    "static": _static(model, work, press, budget, settings, size),
                    "continuous": _continuous(model, work, press, budget, settings, size)}
            label = f"{press_name}@{budget or 'full'} batch {size}: whole runs side by side"

            def forward(label: str = label) -> None:
                nonlocal done
                done += 1
                on_progress(label, min(done, total), total)

            rows += workload_rows(press_name, budget, size, side_by_side(runs, steps[size], sync, forward))
    return rows


def workload_rows(press: str, budget: int | None, size: int, measured: dict) -> list[BenchRow]:
    """One row per way of batching, its speed-up over batch 1 as ``ratio`` and the rest in ``extra``."""
    base_seconds, _, base_outputs = measured["batch 1"]
    static_seconds = measured["static"][0]
    rows = []
    for batching, (seconds, steps, outputs) in measured.items():
        n, tokens = len(outputs), sum(o.output_tokens for o in outputs)
        identical = all(_telemetry(a) == _telemetry(b) for a, b in zip(outputs, base_outputs))
        batch = 1 if batching == "batch 1" else size
        rows.append(BenchRow(
            press=press, budget=budget, batch=batch, tokens_per_s=tokens / seconds, ms_per_step=1000 * seconds / steps,
            ratio=base_seconds / seconds, kv_mib=max(o.peak_kv_bytes for o in outputs) * batch / 2**20,
            entries_per_head=round(max(o.mean_cache_len for o in outputs)), peak_memory_mib=None,
            setting=f"whole runs ({LENGTH_MIX})",
            extra={"batching": batching, "examples": n, "seconds": seconds, "decoding_forwards": steps,
                   "examples_per_hour": 3600 * n / seconds, "x_static": static_seconds / seconds,
                   "same_rows": identical, "output_tokens": tokens},
        ))
    return rows


def _telemetry(out) -> tuple:
    return out.tokens, out.evicted_tokens, out.peak_kv_bytes, out.mean_cache_len
