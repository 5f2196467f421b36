"""Ranking slots by score, ties by recency: what the engine evicts by and what allocating presses count with.

Ranking never depends on where a token sits physically, so batched and single runs evict alike.
"""

from __future__ import annotations

import torch


def rank_slots(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Indices that sort slots by descending score, equal scores by descending position (newest first).

    Ranking never depends on where a token sits physically, so batched and single runs evict alike.
    """
    newest_first = positions.argsort(dim=-1, descending=True, stable=True)
    by_score = scores.gather(-1, newest_first).argsort(dim=-1, descending=True, stable=True)
    return newest_first.gather(-1, by_score)


def slot_ranks(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Each slot's place in ``rank_slots`` (0 = kept first)."""
    ranked = rank_slots(scores, positions)
    order = torch.arange(ranked.shape[-1], device=ranked.device).expand_as(ranked)
    return torch.empty_like(ranked).scatter_(-1, ranked, order)


def lowest_slots(scores: torch.Tensor, positions: torch.Tensor, n: int) -> torch.Tensor:
    """The last ``n`` of ``rank_slots``: the lowest scores, equal scores oldest first. One slot needs no sort."""
    if n > 1:
        return rank_slots(scores, positions)[..., -n:]
    tied = scores == scores.amin(dim=-1, keepdim=True)
    return positions.masked_fill(~tied, torch.iinfo(torch.long).max).argmin(dim=-1, keepdim=True)
