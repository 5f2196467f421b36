"""The query window's attention over the slots, kept between decoding steps instead of recomputed.

A window query never sees a key written after it (causality), and a key's logit never changes, so a query's
row of ``exp(logit - row max)`` is final when the query arrives; later it only loses the slots that are
evicted. Each decoding step therefore computes one new row (the new query against the slots, as much work as
the step's own attention) and zeroes the evicted columns, instead of a ``W``-query softmax over every slot.
The mean attention is then two reductions over the kept weights. It costs ``W x GQA group`` floats per slot
and KV head: worth it on CPU, where the recomputation dominates a step, not on a GPU, where memory is what
bounds the batch.
"""

from __future__ import annotations

import torch

from kvbench.engine.scores import masked_logits
from kvbench.presses.base import Press


def worth_keeping(press: Press, budget: int | None) -> bool:
    """Kept rows cost one query row per step: worth it where compressions come more often than once per window."""
    if budget is None or not press.evicts or not press.query_window or press.allocates:
        return False
    if not press.reads_whole_window:
        return False
    keep, trigger = press.cadence(budget)
    return trigger - keep < press.query_window


class KeptWindowAttention:
    """``weights [N, H, group, W, capacity]``: unnormalised attention of the ring's queries on each slot.

    Rows are the cache's folded rows (``layer * batch + b``); ring slot ``w`` holds the query whose position
    is ``query_positions[:, w]``. Masked entries (invalid slot, later key, invalid query) are exactly zero.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.weights: torch.Tensor | None = None
        self.fresh = False  # False after a multi-token step: recompute every row at the next decoding step
        #: Folded rows of sequences spliced in since the last update (continuous batching): recomputed whole.
        self.stale: set[int] = set()

    def update(self, queries: torch.Tensor, query_positions: torch.Tensor, query_valid: torch.Tensor,
               keys: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, scaling: float,
               ring_slot: int) -> None:
        """Bring the weights up to this step: queries [N, H_q, W, D] and positions/valid [N, W]; slots [N, H, S]."""
        n, hq, window, _ = queries.shape
        h, s = keys.shape[1], keys.shape[2]
        if self.weights is None:
            self.weights = torch.zeros(n, h, hq // h, window, self.capacity, dtype=torch.float32, device=keys.device)
        if self.fresh:
            rows = slice(ring_slot, ring_slot + 1)
        else:
            rows = slice(0, window)
            self.weights.zero_()
            self.stale.clear()
        self.weights[:, :, :, rows, :s] = _weights(queries[:, :, rows], query_positions[:, rows],
                                                   query_valid[:, rows], keys, positions, valid, scaling)
        if self.stale:
            new = torch.tensor(sorted(self.stale), device=keys.device)
            self.weights[new] = 0.0
            self.weights[new, :, :, :, :s] = _weights(queries[new], query_positions[new], query_valid[new], keys[new],
                                                      positions[new], valid[new], scaling)
            self.stale.clear()
        self.fresh = True

    def keep_rows(self, rows: list[int], batch: int, layers: int) -> None:
        """Only sequences ``rows`` (of ``batch``) stay, in that order; the folded rows follow them."""
        folded = [layer * batch + row for layer in range(layers) for row in rows]
        moved = {old: new for new, old in enumerate(folded)}
        if self.weights is not None:
            self.weights = self.weights.index_select(0, torch.tensor(folded, device=self.weights.device))
        self.stale = {moved[old] for old in self.stale if old in moved}

    def drop(self, slots: torch.Tensor, dropped: torch.Tensor | None = None) -> None:
        """Zero the columns of evicted ``slots`` [N, H, k]; ``dropped`` [N, 1, 1] says which rows evicted."""
        _, _, group, window, _ = self.weights.shape
        index = slots[:, :, None, None, :].expand(-1, -1, group, window, -1)
        if dropped is None:
            self.weights.scatter_(-1, index, 0.0)
        else:
            kept = self.weights.gather(-1, index) * ~dropped[..., None, None]
            self.weights.scatter_(-1, index, kept)

    def mean_attention(self, query_valid: torch.Tensor, used: int, gqa: str = "mean") -> torch.Tensor:
        """Attention [N, H, used] averaged over the valid queries, then over each GQA group (mean or max)."""
        weights = self.weights[..., :used]
        n, h, group, window, _ = weights.shape
        totals = weights.sum(dim=-1)  # [N, H, group, W]
        count = query_valid.sum(dim=-1).clamp(min=1)  # [N]
        # Each row's probabilities are its weights over its total; a row that sees nothing counts zero.
        scale = torch.where(totals > 0, 1 / totals.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
        scale = scale * (query_valid[:, None, None, :] / count[:, None, None, None])
        if gqa == "mean":
            flat = weights.reshape(n, h, group * window, used)
            return torch.matmul(scale.view(n, h, 1, group * window), flat).view(n, h, used) / group
        if gqa == "max":
            return torch.matmul(scale[..., None, :], weights).view(n, h, group, used).amax(dim=2)
        raise ValueError(f"gqa aggregation must be 'mean' or 'max', got {gqa!r}")


def _weights(queries, query_positions, query_valid, keys, positions, valid, scaling) -> torch.Tensor:
    """Each query's ``exp(logit - row max)`` over the slots, zero where it may not look."""
    logits, visible = masked_logits(queries, query_positions, query_valid, keys, positions, valid, scaling)
    return logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_().mul_(visible)
