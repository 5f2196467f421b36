"""What the decode loop and the attention hook need from a cache: ``BudgetCache`` and ``ShadowCache`` both are one.

One decoding step, in order: ``begin_step`` (the step's positions and valid tokens), the model's forward (each
attention layer finds ``cache.layers[i]`` and attends through it), ``end_step`` (scoring, eviction, bookkeeping).
The telemetry reads host-side counters only, so it costs no device synchronisation.
"""

from __future__ import annotations

from typing import Protocol

import torch

from kvbench.engine.view import StepPlan


class DecodingCache(Protocol):
    #: [B, layers, steps, KV heads] attention mass on evicted entries, when measured (else None).
    loss_log: torch.Tensor | None
    #: [B, layers, forwards] share of the critical prompt tokens held, when tracked (else None).
    retention_log: torch.Tensor | None
    layers: list

    def begin_step(self, positions: torch.Tensor, valid: torch.Tensor, valid_counts: list[int],
                   decode_step: int = 0, token_ids: torch.Tensor | None = None) -> StepPlan:
        """Before a forward: positions, valid and ids [B, L] of the tokens it writes (decode_step 0 = the prefill);
        returns the step's immutable plan, which the layers and ``end_step`` read."""

    def end_step(self) -> None:
        """After a forward: decoding's scoring and eviction, then the bookkeeping."""

    def track_critical(self, positions: list[list[int]], max_new_tokens: int, device) -> None:
        """Record after each forward the share of these prompt positions held (``retention_log``)."""

    def entries(self, row: int) -> float:
        """Entries per KV head held (or attended) for sequence ``row`` now."""

    def bytes_per_entry(self) -> int:
        """Bytes of one token's keys and values across all layers and KV heads."""

    def peak_bytes(self, row: int) -> int:
        """Peak KV bytes on the device for sequence ``row``."""

    def host_bytes(self, row: int) -> int:
        """Peak KV bytes offloaded to host memory for sequence ``row``."""

    def evicted_tokens(self, row: int) -> float:
        """Entries evicted per KV head for sequence ``row``."""
