"""The physical order of a source's cache, for presses whose source's rules read it: the bug-compatible ``hott-*``
presses and ``rkv`` (R-KV stores its kept entries in ``topk``'s order too).

The kvpress fork keeps each layer's cache as a tensor whose order is the order ``scores.topk(budget)`` returned
at the last compression (by score, ties in ``topk``'s own order), with newer tokens appended at the end. Its
rules that read "the last 64 entries" or "index 4", and its state shared between layers, therefore act on that
order, not on token positions. kvbench's slots have no meaningful order, so these presses keep the fork's index
of every slot as per-slot state (``fork_index``: index + 1; 0 = appended since the last compression), and run
the fork's own ``torch.topk`` on scores laid out in that order, so that ties fall as they fell there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

STATE = "fork_index"
#: Why a press that replays its source's cache order cannot decode as one graph (``--compile``).
COMPILE_REFUSAL = ("it replays its source's physical cache order (source_order): per-row lengths and gathers sized "
                   "on the host")
_BIG = torch.iinfo(torch.long).max // 2


def fork_index(view) -> torch.Tensor:
    """[N, H, S] long: each valid slot's index in the fork's cache (invalid slots: a large number)."""
    stored = view.state[STATE]
    old = view.valid & (stored > 0)
    new = view.valid & (stored == 0)
    n_old = old.sum(dim=-1, keepdim=True)
    # appended tokens follow the old ones in position order
    rank = view.positions.masked_fill(~new, _BIG).argsort(dim=-1).argsort(dim=-1)
    index = torch.where(old, stored.long() - 1, n_old + rank)
    return index.masked_fill(~view.valid, _BIG)


def to_fork_order(values: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, length: int,
                  fill: float = 0.0) -> torch.Tensor:
    """[N, H, length]: ``values`` [N, H, S] laid out by fork index (positions no slot fills get ``fill``)."""
    out = values.new_full((*values.shape[:2], length + 1), fill)
    return out.scatter_(-1, index.clamp(max=length), values.masked_fill(~valid, fill))[..., :length]


def from_fork_order(ordered: torch.Tensor, index: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """[N, H, S]: per slot, the value at its fork index in ``ordered`` [N, H, L] (``fill`` past the end)."""
    padded = torch.cat([ordered, ordered.new_full((*ordered.shape[:2], 1), fill)], dim=-1)
    return padded.gather(-1, index.clamp(max=ordered.shape[-1]))


def fork_topk(ordered: torch.Tensor, lengths: list[int], keep: int, trigger: int) -> list[torch.Tensor | None]:
    """Per row holding ``trigger`` or more, ``ordered[row, :, :length].topk(keep)``: the fork's call (values sorted,
    ties in topk's own order on this device). Rows of equal length go through one call.

    Returns per row the [H, keep] kept fork indices in their new order, or None where the row is not compressed.
    """
    out: list[torch.Tensor | None] = [None] * len(lengths)
    for length in sorted(set(lengths)):
        if length < trigger:
            continue
        rows = [r for r, n in enumerate(lengths) if n == length]
        kept = ordered[rows, :, :length].topk(keep, dim=-1).indices
        for r, indices in zip(rows, kept):
            out[r] = indices
    return out


def reorder(view, index: torch.Tensor, kept: list[torch.Tensor | None]) -> torch.Tensor:
    """Apply a compression: store each kept slot's new fork index; return scores that make the engine keep exactly
    those slots (``-inf`` for the rest). Rows without a compression keep their order and get zero scores."""
    scores = torch.zeros(view.valid.shape, dtype=torch.float32, device=view.valid.device)
    for row, indices in enumerate(kept):
        if indices is None:
            continue
        h, k = indices.shape
        new_of_old = torch.full((h, int(index[row].masked_fill(~view.valid[row], 0).max()) + 2), -1,
                                dtype=torch.long, device=indices.device)
        new_of_old.scatter_(-1, indices, torch.arange(k, device=indices.device).expand(h, k))
        new = new_of_old.gather(-1, index[row].clamp(max=new_of_old.shape[-1] - 1))
        new = new.masked_fill(~view.valid[row], -1)
        view.state[STATE][row] = (new + 1).clamp(min=0).float()
        scores[row] = torch.where(new >= 0, (k - new).float(), -torch.inf)
    return scores


def compress(press, view, index: torch.Tensor, lengths: list[int], ordered: torch.Tensor) -> torch.Tensor:
    """The fork's compression of ``press`` at its cadence: ``topk`` over ``ordered`` scores in the model's dtype,
    then the new order; returns the engine's scores (see ``reorder``)."""
    keep, trigger = press.cadence(view.budget)
    return reorder(view, index, fork_topk(ordered.to(view.keys.dtype), lengths, keep, trigger))


def window_padded(lengths: list[int], window: int, shape: tuple[int, int], device,
                  prefix_scores: Callable[[list[int], int], torch.Tensor]) -> torch.Tensor:
    """[N, H, max length] scores in fork order: ``prefix_scores(rows, n)`` ([rows, H, n]) on the entries before
    each row's last ``window``, and those last entries padded with the row's maximum (the fork's
    ``F.pad(scores, (0, window), value=scores.max())``, over every head of the layer)."""
    scores = torch.zeros(*shape, max(lengths), device=device)
    for length in sorted(set(lengths)):
        rows = [r for r, n in enumerate(lengths) if n == length]
        prefix = length - window
        if prefix <= 0:
            continue
        part = prefix_scores(rows, prefix)
        scores[rows, :, :prefix] = part
        scores[rows, :, prefix:length] = part.flatten(1).amax(dim=-1)[:, None, None]
    return scores


def valid_lengths(view) -> list[int]:
    """Entries each row holds (the same in every KV head under these uniform presses)."""
    return view.valid[:, 0].sum(dim=-1).tolist()
