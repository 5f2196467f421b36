"""What a benchmark is asked to do (``BenchConfig``), shared by the timing (``core``) and its stored rows
(``results``)."""

from __future__ import annotations

from dataclasses import dataclass

from kvbench.models import DEFAULT_MODEL


@dataclass(frozen=True)
class BenchConfig:
    model: str = DEFAULT_MODEL
    presses: tuple[str, ...] = ("streaming_llm", "knorm", "random", "snapkv-d", "h2o")
    budgets: tuple[int, ...] = (128,)
    batch_sizes: tuple[int, ...] = (1,)
    prompt_len: int = 128
    gen_len: int = 1024
    press_args: tuple[str, ...] = ()
    random_weights: bool = False
    dtype: str = "auto"
    device: str = "auto"
    #: Decoding steps of an untimed generation per cell before measuring.
    warmup: int = 8
    memory_gib: float | None = None
    #: Upper bound on the batch tried for ``memory_gib``.
    max_batch: int = 1024
    #: Attend over every preallocated slot (fixed shapes).
    static_shapes: bool = False
    #: Also decode every cell as one compiled graph per step, beside eager, and time HF's anchors.
    compile: bool = False
    #: The torch.compile backend of ``compile`` (``kvbench.engine.compiled.BACKENDS``).
    compile_backend: str = "inductor"
    #: Write a torch profiler table of each cell's decoding steps to this directory.
    profile_dir: str | None = None
    #: Also count the aten operators and host synchronisations of one decoding step per cell (``bench.opcount``).
    count_ops: bool = False
    seed: int = 0
    store: str | None = None
    #: "step": decoding steps of equal work, cells side by side; "run": whole runs on a length mix, batch 1 against
    #: static and continuous batching (``kvbench.bench.workload``), over ``examples`` examples.
    workload: str = "step"
    examples: int = 32
