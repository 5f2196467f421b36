"""``kvbench bench``: decoding speed and memory of each press against the full cache, on equal work.

Every cell (press x budget) of a batch size decodes the same random prompts for exactly ``gen_len`` tokens
(EOS ignored). The cells of one batch size run side by side: their generations advance in turn, one decoding
step each, every step timed between device synchronisations, so that all cells see the same machine
conditions (a shared CPU's speed drifts by tens of percent within minutes). Ratios are to the full cache
in the same run.

With ``memory_gib``, each cell also runs alone at the largest batch whose memory fits in that many GiB:
measured on CUDA (peak allocated at batch 1 and 2), estimated from the KV buffers elsewhere.
"""

from __future__ import annotations

import datetime as dt
import gc
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from kvbench.bench.anchors import label_compiled
from kvbench.bench.config import BenchConfig
from kvbench.bench.results import BenchRow, dtype_name, store_rows
from kvbench.bench.timing import timed_step
from kvbench.engine.generate import run_to_end
from kvbench.engine.window import worth_keeping
from kvbench.errors import KvbenchError
from kvbench.runs.session import device_name


def cells(config: BenchConfig) -> list[tuple[str, int | None]]:
    """(press, budget) pairs: the full cache first (the reference), then every press at every budget."""
    from kvbench.presses import press_parameters

    for press in config.presses:
        press_parameters(press)  # an unknown press or wrapper fails here with one line
    if any(b < 1 for b in config.budgets):
        raise KvbenchError(f"budget must be >= 1, got {min(config.budgets)}")
    out: list[tuple[str, int | None]] = [("full", None)]
    out += [(p, b) for p in config.presses if p != "full" for b in config.budgets]
    return out


def workload_cells(config: BenchConfig) -> list[tuple[str, int | None]]:
    """Whole runs compare ways of batching, not presses: the presses given, the full cache only if listed."""
    return [(p, b) for p, b in cells(config) if p != "full" or "full" in config.presses]


def build_presses(config: BenchConfig) -> dict:
    """Every press of the run by name, with its arguments (checked before any model loads)."""
    from kvbench.presses import make_checked_press, parse_press_args

    names = list(dict.fromkeys(p for p, _ in cells(config)))
    args = parse_press_args(list(config.press_args), names)
    return {name: make_checked_press(name, args[name]) for name in names}


def validate(config: BenchConfig) -> None:
    from kvbench.checks import bench_parts
    from kvbench.models import resolve, resolve_device, resolve_dtype
    from kvbench.store import ResultStore

    spec = resolve(config.model)
    if spec.source == "shape" and not config.random_weights:
        raise KvbenchError(f"{config.model!r} is a shape alias (no weights are shipped): use it with --random-weights")
    resolve_dtype(config.dtype, resolve_device(config.device))
    presses = build_presses(config)
    for name, budget in cells(config):
        if budget is not None and presses[name].evicts:
            presses[name].cadence(budget)  # a press bounded by its budget needs room for its buffer
    for name, value in (("--prompt-len", config.prompt_len), ("--gen-len", config.gen_len),
                        *(("--batch-size", b) for b in config.batch_sizes), ("--max-batch", config.max_batch)):
        if value < 1:
            raise KvbenchError(f"{name} must be >= 1, got {value}")
    if config.warmup < 0:
        raise KvbenchError(f"--warmup must be >= 0, got {config.warmup}")
    _validate_workload(config, presses)
    if config.compile:
        _validate_compile(config, presses)
    if config.memory_gib is not None and not (math.isfinite(config.memory_gib) and config.memory_gib > 0):
        raise KvbenchError(f"--memory-gib must be a finite number > 0, got {config.memory_gib}")
    if config.store:
        ResultStore(Path(config.store) / "bench").check_writable(parts=False)  # bench parts: their own schema
        bench_parts(config.store, required=False)


def _validate_compile(config: BenchConfig, presses: dict) -> None:
    from kvbench.engine.compiled import check_backend, check_compilable

    check_backend(config.compile_backend)
    if config.count_ops:
        raise KvbenchError("--ops counts the operators eager decoding dispatches; a compiled step runs one graph: "
                           "give --ops or --compile")
    for name, budget in cells(config):
        check_compilable(presses[name], budget)


def _validate_workload(config: BenchConfig, presses: dict) -> None:
    if config.workload not in ("step", "run"):
        raise KvbenchError(f"--workload must be step or run, got {config.workload!r}")
    if config.workload == "step":
        return
    if config.examples < 1 or min(config.batch_sizes) < 2:
        raise KvbenchError("--workload run needs --examples >= 1 and every --batch-size >= 2 (batch 1 always runs "
                           "as the reference)")
    if config.memory_gib is not None or config.count_ops or config.profile_dir or config.static_shapes:
        raise KvbenchError("--workload run times whole runs: --memory-gib, --ops, --profile, --static-shapes and "
                           "--compile apply to --workload step")
    sparse = [name for name, press in presses.items() if press.sparse]
    if sparse:
        raise KvbenchError(f"--workload run: {sparse[0]} cannot take a sequence into a running batch (continuous "
                           "batching); time it with --workload step")


def execute(config: BenchConfig, on_progress: Callable[[str, int, int], None] | None = None):
    """Run the benchmark: (rows, dtype name, device name). ``on_progress(label, done, total)`` follows the steps.

    With a store, each batch size's rows are stored as soon as they are measured: running out of memory at a
    larger batch ends the run with a one-line error and keeps what was measured.
    """
    import torch

    from kvbench.runs.session import load_session

    validate(config)
    session = load_session(config.model, config.dtype, config.device, config.seed, config.random_weights)
    loaded = session.loaded
    model = loaded.model
    from kvbench.presses import for_tokenizer

    presses = {name: for_tokenizer(press, loaded.tokenizer) for name, press in build_presses(config).items()}
    bench = _Bench(config, model, loaded.device, presses, on_progress)
    started = dt.datetime.now(dt.timezone.utc)
    rows: list[BenchRow] = []

    def measured(new_rows: list[BenchRow]) -> None:
        rows.extend(new_rows)
        if config.store:
            store_rows(config, session, new_rows, started)

    if config.workload == "run":
        from kvbench.bench.workload import run_workload

        measured(run_workload(config, workload_cells(config), model, bench.presses, bench._sync, bench.on_progress))
        return rows, dtype_name(loaded.dtype), device_name(loaded.device)
    try:
        for batch in config.batch_sizes:
            batch_rows = bench.side_by_side(batch)
            if config.count_ops:
                from kvbench.bench.opcount import add_counts

                add_counts(batch_rows, model, bench.prompts[:batch], bench.presses)
            measured(batch_rows)
            if config.profile_dir:
                bench.profile(batch, Path(config.profile_dir))
            if config.compile:
                from kvbench.bench.anchors import hf_rows

                measured(hf_rows(model, bench.prompts[:batch], config.gen_len, batch_rows[0], bench._sync,
                                 config.compile_backend))
        if config.memory_gib is not None:
            measured(bench.equal_memory(config.memory_gib))
    except torch.OutOfMemoryError as err:
        kept = f"; {len(rows)} rows measured before it are stored" if config.store and rows else ""
        raise KvbenchError(f"out of memory ({str(err).splitlines()[0]}){kept}; try smaller --batch-size") from None
    return rows, dtype_name(loaded.dtype), device_name(loaded.device)


class _Bench:
    def __init__(self, config: BenchConfig, model, device, presses: dict, on_progress):
        self.config, self.model, self.device, self.presses = config, model, device, presses
        self.on_progress = on_progress or (lambda label, done, total: None)
        vocab = model.config.get_text_config(decoder=True).vocab_size
        import torch

        generator = torch.Generator().manual_seed(config.seed)
        rows = max(config.max_batch if config.memory_gib else 1, *config.batch_sizes)
        self.prompts = torch.randint(0, vocab, (rows, config.prompt_len), generator=generator).tolist()

    def _generation(self, press_name: str, budget: int | None, batch: int, gen_len: int, compiled: bool = False):
        from kvbench.engine.generate import GenerationSettings, generation

        settings = GenerationSettings(max_new_tokens=gen_len, seed=self.config.seed)  # no EOS: equal work
        backend = self.config.compile_backend if compiled else None
        return generation(self.model, self.prompts[:batch], self.presses[press_name], budget, settings,
                          static_shapes=self.config.static_shapes, compile_backend=backend)

    def _warm_up(self, press_name: str, budget: int | None, batch: int, compiled: bool = False) -> None:
        """The first ``warmup`` decoding steps of a generation sized as the timed one (a compiled step is compiled
        for the cache's shapes, which the generated length sets for the full cache)."""
        steps = self._generation(press_name, budget, batch, self.config.gen_len, compiled)
        for _ in range(min(self.config.warmup, self.config.gen_len) + 1):
            next(steps, None)
        steps.close()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def side_by_side(self, batch: int) -> list[BenchRow]:
        """Every cell (each eager and compiled, with --compile) one decoding step in turn; ratios to the full cache
        decoded the same way."""
        from kvbench.engine.compiled import compiled_graphs

        config = self.config
        variants = [(p, b, compiled) for compiled in ((False, True) if config.compile else (False,))
                    for p, b in cells(config)]
        warmup = []
        for press_name, budget, compiled in variants:  # warm-up: kernels, allocator, caches, compilation
            start = time.perf_counter()
            self._warm_up(press_name, budget, batch, compiled)
            warmup.append(time.perf_counter() - start)
        running = [self._generation(p, b, batch, config.gen_len, c) for p, b, c in variants]
        for steps in running:
            next(steps)  # the prefill, not timed
        times: list[list[float]] = [[] for _ in variants]
        outputs: list[list | None] = [None] * len(variants)
        total, done = (config.gen_len - 1) * len(variants), 0
        label = f"batch {batch}: {len(variants)} cells side by side"
        while any(o is None for o in outputs):
            for i, steps in enumerate(running):
                if outputs[i] is not None:
                    continue
                graphs = compiled_graphs()
                seconds, finished, value = timed_step(steps, self._sync)
                if finished:
                    outputs[i] = value
                    continue
                if compiled_graphs() == graphs:
                    times[i].append(seconds)
                else:  # a graph compiled at this step (the first eviction's): compile time, not a step's
                    warmup[i] += seconds
                done += 1
                self.on_progress(label, done, total)
        rows = [self._row(p, b, batch, t, o, None) for (p, b, _), t, o in zip(variants, times, outputs)]
        if config.compile:
            label_compiled(rows, variants, warmup)
        else:
            for row in rows:
                row.ratio = row.tokens_per_s / rows[0].tokens_per_s
        if self.device.type == "cuda":
            for row in rows:
                row.peak_memory_mib = self._peak_memory(row.press, row.budget, batch) / 2**20
        return rows

    def profile(self, batch: int, directory: Path, steps: int = 64) -> None:
        """Per cell, the operators of the last ``steps`` decoding steps (the steady state, once the cache is at
        its budget) by self time (device time on CUDA)."""
        from torch.profiler import ProfilerActivity, profile

        from kvbench.quiet import native_stderr_muted

        directory.mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        for press_name, budget in cells(self.config):
            generation = self._generation(press_name, budget, batch, self.config.gen_len)
            for _ in range(max(1, self.config.gen_len - steps)):  # the prefill and the steps before, not profiled
                next(generation)
            prof = profile(activities=activities)
            with native_stderr_muted():  # the profiler's native start and stop lines
                prof.__enter__()
            try:
                run_to_end(generation)
            finally:
                with native_stderr_muted():
                    prof.__exit__(None, None, None)
            name = f"{press_name}-{budget or 'full'}-b{batch}.txt"
            (directory / name).write_text(prof.key_averages().table(sort_by=sort, row_limit=40))

    def _row(self, press_name, budget, batch, step_times, outs, peak_memory) -> BenchRow:
        seconds = sum(step_times)
        per_seq = max(o.peak_kv_bytes for o in outs)
        bytes_per_entry = self._bytes_per_entry()
        return BenchRow(
            press=press_name, budget=budget, batch=batch, tokens_per_s=batch * len(step_times) / seconds,
            ms_per_step=1000 * statistics.mean(step_times), ratio=math.nan, kv_mib=batch * per_seq / 2**20,
            entries_per_head=per_seq // bytes_per_entry, peak_memory_mib=peak_memory,
            host_kv_mib=batch * max(o.host_kv_bytes for o in outs) / 2**20,
        )

    def _bytes_per_entry(self) -> int:
        """``BudgetCache.bytes_per_entry`` of this model, before any cache exists."""
        from kvbench.engine.telemetry import entry_bytes

        cfg = self.model.config.get_text_config(decoder=True)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        element = next(self.model.parameters()).element_size()
        return entry_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, head_dim, element)

    def _peak_memory(self, press_name: str, budget: int | None, batch: int) -> int:
        """CUDA allocator peak of one generation run alone (weights included)."""
        import torch

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        run_to_end(self._generation(press_name, budget, batch, self.config.gen_len))
        return torch.cuda.max_memory_allocated(self.device)

    def _bytes_per_sequence(self, press_name: str, budget: int | None) -> tuple[float, float]:
        """(fixed bytes, bytes per sequence) of one generation: measured on CUDA, else estimated from the KV
        buffers and, for a press with a query window, the window attention kept on CPU (float32)."""
        config = self.config
        if self.device.type == "cuda":
            one, two = (self._peak_memory(press_name, budget, b) for b in (1, 2))
            return one - (two - one), two - one
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        length = config.prompt_len + config.gen_len
        press = self.presses[press_name]
        if press.sparse:
            raise KvbenchError(f"--memory-gib: {press_name}'s memory is measured on CUDA only, not estimated")
        from kvbench.engine.cache import slot_capacity

        text = self.model.config.get_text_config(decoder=True)
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        capacity = slot_capacity(press, budget, text.num_hidden_layers, kv_heads, length)
        window = 0
        if worth_keeping(press, budget):
            window = text.num_hidden_layers * text.num_attention_heads * press.query_window * 4
        return weights, capacity * (self._bytes_per_entry() + window)

    def equal_memory(self, memory_gib: float) -> list[BenchRow]:
        """Each cell alone at the largest batch that fits in ``memory_gib``; ratio to the full cache's."""
        import torch

        limit = memory_gib * 2**30
        rows = []
        for press_name, budget in cells(self.config):
            fixed, per_seq = self._bytes_per_sequence(press_name, budget)
            batch = min(self.config.max_batch, int((limit - fixed) // per_seq))
            while batch >= 1:
                try:
                    rows.append(self._alone(press_name, budget, batch, fixed, per_seq))
                    break
                except torch.cuda.OutOfMemoryError:
                    batch = int(batch * 0.9)
                    gc.collect()
                    torch.cuda.empty_cache()
            else:
                raise KvbenchError(f"{press_name}: not even one sequence fits in {memory_gib} GiB")
        measured = "measured" if self.device.type == "cuda" else "KV estimate"
        for row in rows:
            row.setting = f"largest batch within {memory_gib:g} GiB ({measured})"
        for row in rows:
            row.ratio = row.tokens_per_s / rows[0].tokens_per_s
        return rows

    def _alone(self, press_name, budget, batch, fixed, per_seq) -> BenchRow:
        import torch

        self._warm_up(press_name, budget, batch)
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        steps = self._generation(press_name, budget, batch, self.config.gen_len)
        next(steps)
        times, label = [], f"{press_name} alone at batch {batch}"
        while True:
            seconds, finished, outs = timed_step(steps, self._sync)
            if finished:
                break
            times.append(seconds)
            self.on_progress(label, len(times), self.config.gen_len - 1)
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None
        row = self._row(press_name, budget, batch, times, outs, peak)
        row.extra = {"estimated_mib_per_sequence": per_seq / 2**20, "fixed_mib": fixed / 2**20,
                     "memory_measured": self.device.type == "cuda"}
        return row
