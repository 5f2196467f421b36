"""Continuous batching's splice: a row of a running batch's ``BudgetCache`` takes the one sequence of a one-row
``BudgetCache`` that has just prefilled its prompt, exactly as batch 1 built and filled it.

Everything a cache keeps per sequence moves with it: the slots (keys, values, positions, validity, press state),
its seeds and prompt length, the host counts that decide when it compresses, its window of recent queries, and
what the measurements hold of it. The forward at which it joins becomes its step offset, so the press and the
recorders see the sequence's own decoding step (``BudgetCache.row_step``).
"""

from __future__ import annotations

import torch


class RowSplicing:
    """The ``BudgetCache`` methods that change which sequences its rows hold (a mixin, kept apart from the
    per-step protocol in ``cache.py``): a sequence spliced in, rows kept, the tokens seen advanced. Each moves what
    the cache keeps per sequence and tells its parts (occupancy, query ring, kept window, recorders) to do the
    same."""

    def splice_row(self, row: int, single: RowSplicing, step: int) -> None:
        """Row ``row`` of this cache becomes ``single``'s sequence, which joins after forward ``step`` (so its next
        forward is its own decoding step 1). ``single`` has run its prefill and nothing else."""
        batch = len(self.occupancy.held)
        if self.keys is None:
            _, _, heads, _, key_dim = single.keys.shape
            self.allocate_rows(batch, heads, key_dim, single.values.shape[-1], single.keys.dtype, single.keys.device)
        self._copy_slots(row, single)
        device = self.keys.device
        self.row_seeds = self.row_seeds.to(device)
        self.row_seeds[:, row] = single.row_seeds[:, 0]
        if self.prompt_length is None:
            self.prompt_length = torch.zeros(batch, dtype=torch.long, device=device)
            self.step_offset = torch.zeros(batch, dtype=torch.long, device=device)
        self.prompt_length[row] = single.prompt_length[0]
        self.step_offset[row] = step
        self.occupancy.splice(row, single.occupancy)
        # Every valid slot of a row lies below the most its heads have held: a long sequence gone, attention shrinks.
        self.used = self.capacity if self.static_shapes else min(self.capacity, max(max(self.occupancy.high),
                                                                                    single.used))
        self.heads_uniform &= single.heads_uniform
        self.tokens_seen = max(self.tokens_seen, single.tokens_seen)
        if self.query_ring is not None:
            self.query_ring.splice(row, single.query_ring)
        if self.kept_window is not None:
            self.kept_window.stale.update(layer * batch + row for layer in range(len(self.layers)))
        if self.attention_loss is not None:
            self.attention_loss.splice(row, single.attention_loss, batch)
        if self.retention is not None:
            self.retention.splice(row, single.retention)


    def _copy_slots(self, row: int, single: RowSplicing) -> None:
        """The sequence's slots in use, and empty slots after them."""
        n = single.used
        for name, empty in (("keys", 0), ("values", 0), ("positions", -1), ("valid", False)):
            mine, theirs = getattr(self, name), getattr(single, name)
            mine[:, row] = empty
            mine[:, row, :, :n] = theirs[:, 0, :, :n]
        for name, state in self.state.items():
            state[:, row] = 0.0
            state[:, row, :, :n] = single.state[name][:, 0, :, :n]


    def keep_rows(self, rows: list[int]) -> None:
        """Only sequences ``rows`` stay in the batch, in that order: when nothing waits to join, finished rows leave
        rather than be computed for nothing."""
        index = torch.tensor(rows, device=self.keys.device)
        batch = len(self.occupancy.held)
        for name in ("keys", "values", "positions", "valid"):
            setattr(self, name, getattr(self, name).index_select(1, index))
        self.state = {name: state.index_select(1, index) for name, state in self.state.items()}
        self.row_seeds = self.row_seeds.index_select(1, index)
        self.prompt_length = self.prompt_length.index_select(0, index)
        self.step_offset = self.step_offset.index_select(0, index)
        self.occupancy.keep_rows(rows)
        self.used = min(self.capacity, max(self.occupancy.high))
        self.forget_row_masks()
        for layer in self.layers:  # their views are of the old buffers: bound again at the next forward
            layer.is_initialized = False
        if self.query_ring is not None:
            self.query_ring.keep_rows(index)
        if self.kept_window is not None:
            self.kept_window.keep_rows(rows, batch, len(self.layers))
        if self.attention_loss is not None:
            self.attention_loss.keep_rows(index)
        if self.retention is not None:
            self.retention.keep_rows(index)

    def advance_tokens(self, tokens_seen: int) -> None:
        """The longest running sequence's length: what ``get_seq_length`` reports once rows have come and gone."""
        self.tokens_seen = tokens_seen
