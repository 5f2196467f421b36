"""What the engine tells a press and the cache about a step: the step's tokens, recent queries, and the slots.

``SlotView`` is the engine's implementation of the view a press scores (``kvbench.presses.base.View``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch

from kvbench.engine.scores import attention_probs


class StepMode(Enum):
    """What a forward does to the cache."""

    BULK = "bulk"  # the first write of several tokens into an empty cache
    SLOT = "slot"  # one token per sequence, each into a free slot in place
    OVERFLOW = "overflow"  # tokens that do not fit: gather slots and tokens, then compress (a long prompt)


@dataclass(frozen=True)
class StepPlan:
    """One forward's plan: the tokens the decode loop feeds, and what ``begin_step`` decided the forward does to
    the cache. Immutable: the layers and ``end_step`` read it, nobody changes it mid-forward."""

    positions: torch.Tensor  # [B, L] original position of each new token
    valid: torch.Tensor  # [B, L] False for padding and for frozen (finished) sequences
    valid_counts: list[int]  # host copy of valid.sum(-1)
    decode_step: int = 0  # 0 = the prefill, t = the t-th decoding forward
    mode: StepMode = StepMode.BULK
    used_after: int = 0  # slots that may hold a valid entry once this step's tokens are written
    keep_n: tuple[int, ...] = ()  # overflow: entries each sequence keeps after the step
    overflow_evicts: bool = False  # overflow: whether any sequence keeps fewer entries than it holds
    token_ids: torch.Tensor | None = None  # [B, L] the tokens, for a press that reads them (``Press.reads_tokens``)


@dataclass
class QueryWindow:
    """Recent queries (post-RoPE) of each row, with their positions: what ``SlotView.attention`` averages."""

    queries: torch.Tensor  # [N, H_q, W, D]
    positions: torch.Tensor  # [N, W]
    valid: torch.Tensor  # [N, W]
    scaling: float
    #: positions [n] -> the model's RoPE (cos, sin) [n, rotary dims], for a press with ``reads_rope``; else None.
    rope: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass
class SlotView:
    """What a press sees: slots in physical order, and how to get attention over them.

    Rows are sequences; when a view covers every layer (decoding), row ``l * batch + b`` is layer ``l`` of
    sequence ``b`` and ``layer_idx`` is None.
    """

    keys: torch.Tensor  # [N, H, S, D]
    values: torch.Tensor
    positions: torch.Tensor  # [N, H, S]
    valid: torch.Tensor  # [N, H, S]
    state: dict[str, torch.Tensor]  # per-slot press state, [N, H, S]
    query_position: torch.Tensor  # [N] position of the newest token
    budget: int | None
    #: [N] int64 seed of each row (from the sequence's seed and the layer), and the forward's number, for
    #: presses that draw random numbers: a function of these and a slot's position is batch-invariant.
    seeds: torch.Tensor | None = None
    step: int = 0
    #: [N] each row's own decoding step where rows joined the batch at different forwards (continuous batching);
    #: None when every row is at ``step``.
    row_step: torch.Tensor | None = None
    #: [N] prompt tokens of each row's sequence (positions below it are the prompt's).
    prompt_length: torch.Tensor | None = None
    layer_idx: int | None = None
    #: Layers folded into the rows (row ``l * batch + b``): 1 for a one-layer view.
    layers: int = 1
    window: QueryWindow | None = None
    #: Entries each row keeps at the compression the press is scoring for (a row keeping at least what it holds
    #: keeps all); None outside the engine's compressions.
    compress_to: list[int] | None = None
    #: The model's RoPE (``kvbench.engine.rope``) for a press with ``reads_rope``: positions [n] -> cos, sin
    #: [n, rotary dims], and ``inv_freq``; None otherwise.
    rope: Callable | None = None
    #: Overrides ``attention``: the cache's kept window attention, or attention that tests make by hand.
    attention_override: Callable[[str], torch.Tensor] | None = None

    def attention(self, gqa: str = "mean", last: int | None = None) -> torch.Tensor:
        """Mean attention [N, H, S] that the recent queries (``press.query_window``) place on the slots; ``last``
        restricts it to each row's ``last`` newest queries."""
        if self.attention_override is not None and last is None:
            return self.attention_override(gqa)
        if self.window is None:
            raise RuntimeError("this press asked for attention without a query window")
        w = self.window
        valid = w.valid
        if last is not None:
            newest = w.positions.masked_fill(~w.valid, -1).amax(dim=-1, keepdim=True)
            valid = valid & (w.positions > newest - last)
        return attention_probs(w.queries, w.positions, valid, self.keys, self.positions, self.valid, w.scaling,
                               reduce="mean", gqa=gqa)
