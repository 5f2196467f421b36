"""The recent queries a press with a query window scores with: a ring of the last W tokens' queries per layer."""

from __future__ import annotations

import torch

from kvbench.engine.view import QueryWindow


class QueryRing:
    """Queries [layers, B, H_q, W, D] with their positions and validity [B, W]; a ring, because a press takes
    the mean over the window's queries and their order does not matter."""

    def __init__(self, num_layers: int, size: int, batch: int):
        self.num_layers, self.size, self.batch = num_layers, size, batch
        self.queries: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.pointer = 0
        #: Where this step's queries go.
        self.slots: list[int] = []
        #: The same as a device tensor, when the layers' pushes run in a compiled graph (which must not read
        #: a host index that changes every step).
        self.slot_index: torch.Tensor | None = None
        self.compiled = False
        #: The model's RoPE (``QueryWindow.rope``), set for a press that reads pre-RoPE queries.
        self.rope = None

    def advance(self, positions: torch.Tensor, valid: torch.Tensor) -> None:
        """Before a forward: choose the ring slots of its tokens and record their positions (queries come per
        layer, through ``push``)."""
        n_new = positions.shape[1]
        if self.positions is None:
            b = positions.shape[0]
            self.positions = torch.zeros(b, self.size, dtype=torch.long, device=positions.device)
            self.valid = torch.zeros(b, self.size, dtype=torch.bool, device=positions.device)
        if n_new >= self.size:
            self.slots = list(range(self.size))
            self.pointer = 0
        else:
            self.slots = [(self.pointer + i) % self.size for i in range(n_new)]
            self.pointer = (self.pointer + n_new) % self.size
        n = len(self.slots)
        if self.compiled:
            self.slot_index = torch.tensor(self.slots, device=positions.device)
        if n == 1:
            self.positions[:, self.slots[0]] = positions[:, -1]
            self.valid[:, self.slots[0]] = valid[:, -1]
        else:
            index = torch.tensor(self.slots, device=positions.device)
            self.positions.index_copy_(1, index, positions[:, -n:])
            self.valid.index_copy_(1, index, valid[:, -n:])

    def push(self, layer_idx: int, query: torch.Tensor) -> None:
        """A layer's queries [B, H_q, L, D] of this step, into the slots ``advance`` chose."""
        if self.queries is None:
            b, hq, _, d = query.shape
            self.queries = query.new_zeros(self.num_layers, b, hq, self.size, d)
        n = len(self.slots)
        if self.compiled:
            self.queries[layer_idx].index_copy_(2, self.slot_index, query[:, :, -n:])
        elif n == 1:
            self.queries[layer_idx, :, :, self.slots[0]] = query[:, :, -1]
        else:
            index = torch.tensor(self.slots, device=query.device)
            self.queries[layer_idx].index_copy_(2, index, query[:, :, -n:])

    def layer_window(self, layer_idx: int, scaling: float) -> QueryWindow | None:
        if self.queries is None:
            return None
        return QueryWindow(self.queries[layer_idx], self.positions, self.valid, scaling, self.rope)

    def stacked_window(self, scaling: float) -> QueryWindow | None:
        """Every layer's window folded into the rows, as ``BudgetCache.stacked_view`` folds the slots."""
        if self.queries is None:
            return None
        n = self.num_layers
        return QueryWindow(self.queries.flatten(0, 1), self.positions.repeat(n, 1), self.valid.repeat(n, 1), scaling,
                           self.rope)

    def keep_rows(self, index: torch.Tensor) -> None:
        """Only the sequences at ``index`` stay, in that order."""
        self.batch = len(index)
        self.positions, self.valid = self.positions.index_select(0, index), self.valid.index_select(0, index)
        if self.queries is not None:
            self.queries = self.queries.index_select(1, index)

    def splice(self, row: int, other: QueryRing) -> None:
        """Row ``row`` takes ``other``'s one sequence, rotated so its oldest query sits where this ring writes
        next (the window is a set; only which query is overwritten next matters)."""
        shift = self.pointer - other.pointer
        if self.positions is None:
            self.positions = other.positions.new_zeros(self.batch, self.size)
            self.valid = other.valid.new_zeros(self.batch, self.size)
        self.positions[row] = other.positions[0].roll(shift)
        self.valid[row] = other.valid[0].roll(shift)
        if other.queries is not None:
            if self.queries is None:
                _, _, hq, w, d = other.queries.shape
                self.queries = other.queries.new_zeros(self.num_layers, self.batch, hq, w, d)
            self.queries[:, row] = other.queries[:, 0].roll(shift, dims=-2)
