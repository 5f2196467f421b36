"""``kvbench inspect``: what the cache held of one example's tokens, step by step, under each press x budget.

One generation per press x budget (batch 1, the run's settings), with an ``on_step`` hook that counts, after the
prefill and after every decoding forward, how many (layer, KV head) pairs hold each token position. The
pictures (``kvbench.inspection.render``) are drawn from these counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kvbench.errors import ConfigError
from kvbench.presses import for_tokenizer
from kvbench.runs.plan import RunConfig, build_cells, prepared_task, protocol_examples
from kvbench.runs.runner import generation_settings


@dataclass(frozen=True)
class InspectConfig:
    #: The model, dataset, protocol, presses, budgets and generation settings, as ``kvbench run`` takes them.
    run: RunConfig
    #: Which example of the run's examples (0-based, in the order ``run`` takes them).
    example: int = 0


@dataclass
class Retention:
    """What one press at one budget held of one example: ``held[f][p]`` is how many of the ``slots`` (layer, KV
    head) pairs hold position ``p`` after forward ``f`` (0 = the prefill); ``None`` where ``p`` is not yet
    written."""

    label: str
    tokens: list[str]  # each position's text: the prompt's tokens, then the output's
    prompt_tokens: int
    slots: int
    held: list[list[int | None]] = field(default_factory=list)
    finish_reason: str = ""

    def evicted_at(self, position: int) -> int | None:
        """The first forward after which no layer or head holds ``position`` (None if some still does)."""
        for forward, counts in enumerate(self.held):
            if counts[position] == 0:
                return forward
        return None

    def final_share(self, position: int) -> float | None:
        count = self.held[-1][position] if self.held else None
        return None if count is None else count / self.slots


def default_dataset(data_dir: str | None = None) -> str:
    """GSM8K when its local data is present (``--data-dir``, ``$KVBENCH_DATA_DIR``), else the built-in arith."""
    from kvbench.tasks import data_dir as local_data

    root = local_data(data_dir)
    return "gsm8k" if root is not None and (root / "gsm8k").is_dir() else "arith"


def plan(config: InspectConfig):
    """The task, the example and the cells; everything checked before any model loads."""
    cells = build_cells(config.run)
    task = prepared_task(config.run)
    examples = protocol_examples(config.run, task)
    if not 0 <= config.example < len(examples):
        raise ConfigError(f"--example must be in [0, {len(examples) - 1}] ({len(examples)} examples), "
                          f"got {config.example}")
    for cell in cells:
        if cell.press.sparse:
            raise ConfigError(f"{cell.press.name} selects chunks per step and evicts nothing: inspect shows what "
                              "an evicting cache holds")
    return task, examples[config.example], cells


def inspect(config: InspectConfig, on_cell: Callable[[str], None] | None = None) -> list[Retention]:
    """One ``Retention`` per press x budget, in the order given."""
    from kvbench.engine.generate import generate
    from kvbench.runs.session import load_session

    task, example, cells = plan(config)
    run = config.run
    session = load_session(run.model, run.dtype, run.device, run.seed)
    codec = session.codec(task)
    settings = generation_settings(session, run, task)
    prompt_ids = codec.encode(codec.prompt(example))
    out = []
    for cell in cells:
        label = cell.press.name if cell.budget is None else f"{cell.press.name} @ {cell.budget}"
        if on_cell:
            on_cell(label)
        steps: list[tuple[list[int], int]] = []
        press = for_tokenizer(cell.press, session.loaded.tokenizer)
        (result,) = generate(session.loaded.model, [prompt_ids], press, cell.budget, settings,
                             detokenize=codec.decode, pad_token_id=session.loaded.tokenizer.pad_token_id,
                             on_step=lambda cache, step, steps=steps: steps.append(held_counts(cache)))
        ids = prompt_ids + result.tokens
        counts = [row for row, _ in steps]
        written = [len(prompt_ids) + forward for forward in range(len(counts))]  # positions written so far
        retention = Retention(label, [codec.decode([t]) for t in ids], len(prompt_ids), steps[0][1],
                              finish_reason=result.finish_reason)
        retention.held = [[c if p < n else None for p, c in enumerate(_pad(row, len(ids)))]
                          for row, n in zip(counts, written)]
        out.append(retention)
    return out


def held_counts(cache) -> tuple[list[int], int]:
    """How many (layer, KV head) pairs of sequence 0 hold each position now, and how many pairs the cache has
    (read off its own shape, as it was built for the model)."""
    import torch

    positions, valid = cache.positions[:, 0], cache.valid[:, 0]  # [layers, heads, slots]
    length = int(positions.max()) + 1
    counts = torch.zeros(length + 1, dtype=torch.long, device=positions.device)
    counts.index_add_(0, torch.where(valid, positions, length).flatten().clamp(min=0),
                      torch.ones(valid.numel(), dtype=torch.long, device=positions.device))
    return counts[:length].tolist(), valid.shape[0] * valid.shape[1]


def _pad(row: list[int], length: int) -> list[int]:
    return row[:length] + [0] * (length - len(row))
