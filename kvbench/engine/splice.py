"""Continuous batching's splice: a row of a running batch's ``BudgetCache`` takes the one sequence of a one-row
``BudgetCache`` that has just prefilled its prompt, exactly as batch 1 built and filled it.

Everything a cache keeps per sequence moves with it: the slots (keys, values, positions, validity, press state),
its seeds and prompt length, the host counts that decide when it compresses, its window of recent queries, and
what the measurements hold of it. The forward at which it joins becomes its step offset, so the press and the
recorders see the sequence's own decoding step (``BudgetCache.row_step``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvbench.engine.cache import BudgetCache


def splice_row(cache: BudgetCache, row: int, single: BudgetCache, step: int) -> None:
    """Row ``row`` of ``cache`` becomes ``single``'s sequence, which joins after forward ``step`` (so its next
    forward is its own decoding step 1). ``single`` has run its prefill and nothing else."""
    batch = len(cache.occupancy.held)
    if cache.keys is None:
        _, _, heads, _, key_dim = single.keys.shape
        cache.allocate_rows(batch, heads, key_dim, single.values.shape[-1], single.keys.dtype, single.keys.device)
    _copy_slots(cache, row, single)
    device = cache.keys.device
    cache.row_seeds = cache.row_seeds.to(device)
    cache.row_seeds[:, row] = single.row_seeds[:, 0]
    if cache.prompt_length is None:
        cache.prompt_length = torch.zeros(batch, dtype=torch.long, device=device)
        cache.step_offset = torch.zeros(batch, dtype=torch.long, device=device)
    cache.prompt_length[row] = single.prompt_length[0]
    cache.step_offset[row] = step
    cache.occupancy.splice(row, single.occupancy)
    # Every valid slot of a row lies below the most its heads have held: a long sequence gone, attention shrinks.
    cache.used = min(cache.capacity, max(max(cache.occupancy.high), single.used))
    cache.heads_uniform &= single.heads_uniform
    cache.tokens_seen = max(cache.tokens_seen, single.tokens_seen)
    if cache.query_ring is not None:
        cache.query_ring.splice(row, single.query_ring)
    if cache.kept_window is not None:
        cache.kept_window.stale.update(layer * batch + row for layer in range(len(cache.layers)))
    if cache.attention_loss is not None:
        cache.attention_loss.splice(row, single.attention_loss, batch)
    if cache.retention is not None:
        cache.retention.splice(row, single.retention)


def _copy_slots(cache: BudgetCache, row: int, single: BudgetCache) -> None:
    """The sequence's slots in use, and empty slots after them."""
    n = single.used
    for name, empty in (("keys", 0), ("values", 0), ("positions", -1), ("valid", False)):
        mine, theirs = getattr(cache, name), getattr(single, name)
        mine[:, row] = empty
        mine[:, row, :, :n] = theirs[:, 0, :, :n]
    for name, state in cache.state.items():
        state[:, row] = 0.0
        state[:, row, :, :n] = single.state[name][:, 0, :, :n]


def keep_rows(cache: BudgetCache, rows: list[int]) -> None:
    """Only sequences ``rows`` stay in the batch, in that order: when nothing waits to join, finished rows leave
    rather than be computed for nothing."""
    index = torch.tensor(rows, device=cache.keys.device)
    batch = len(cache.occupancy.held)
    for name in ("keys", "values", "positions", "valid"):
        setattr(cache, name, getattr(cache, name).index_select(1, index))
    cache.state = {name: state.index_select(1, index) for name, state in cache.state.items()}
    cache.row_seeds = cache.row_seeds.index_select(1, index)
    cache.prompt_length = cache.prompt_length.index_select(0, index)
    cache.step_offset = cache.step_offset.index_select(0, index)
    cache.occupancy.keep_rows(rows)
    cache.used = min(cache.capacity, max(cache.occupancy.high))
    cache.forget_row_masks()
    for layer in cache.layers:  # their views are of the old buffers: bound again at the next forward
        layer.is_initialized = False
    if cache.query_ring is not None:
        cache.query_ring.keep_rows(index)
    if cache.kept_window is not None:
        cache.kept_window.keep_rows(rows, batch, len(cache.layers))
    if cache.attention_loss is not None:
        cache.attention_loss.keep_rows(index)
    if cache.retention is not None:
        cache.retention.keep_rows(index)
