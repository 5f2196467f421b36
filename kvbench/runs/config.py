"""What a run is asked to do (``RunConfig``): a frozen request, built once from the command line or a grid row and
passed down; nothing downstream writes into it."""

from __future__ import annotations

from dataclasses import dataclass

from kvbench.models import DEFAULT_MODEL
from kvbench.tasks.protocols import DEFAULT_PROTOCOL

MEASUREMENTS = ("attention-loss", "retention", "fidelity")
KINDS = ("generate", "fidelity")
BATCHINGS = ("continuous", "static")


@dataclass(frozen=True)
class RunConfig:
    model: str = DEFAULT_MODEL
    presses: tuple[str, ...] = ("full",)
    #: None = the full cache.
    budgets: tuple[int | None, ...] = ()
    press_args: tuple[str, ...] = ()
    dataset: str = "arith"
    num_samples: int | None = None
    #: None = the dataset's default.
    max_new_tokens: int | None = None
    seed: int = 0
    #: Decoding; None = the protocol's (greedy under kvbench and hott).
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    #: Prompt format, answer format, scorers, subset draw and stopping rule (``kvbench.tasks.protocols``).
    protocol: str = DEFAULT_PROTOCOL
    #: System prompt under a chat template; None = the model's own default (e.g. Nemotron's "detailed thinking
    #: on"), "" = none.
    system_prompt: str | None = None
    store: str = "results"
    dtype: str = "auto"
    device: str = "auto"
    data_dir: str | None = None
    #: The hub revision (commit, branch or tag) to read; None = the dataset YAML's ``revision`` (else main).
    dataset_revision: str | None = None
    batch_size: int = 1
    #: "continuous" (a finished sequence's row takes the next example at once) or "static" (a batch decodes until
    #: its longest sequence ends). Outputs are the same; only speed differs.
    batching: str = "continuous"
    #: End a generation that loops (finish_reason "loop"); loops are measured either way.
    stop_on_loop: bool = False
    #: Extra measurements: "attention-loss" (exact, against a shadow full cache; costs one q·K over all tokens).
    measure: tuple[str, ...] = ()
    #: "generate" (free generation, scored) or "fidelity" (replay the full cache's response under the press).
    kind: str = "generate"
    #: The torch.compile backend every decoding step runs under as one graph (``kvbench.engine.compiled``):
    #: inductor (generated code), eager or aot_eager (traced only); None = eager decoding.
    compile: str | None = None
