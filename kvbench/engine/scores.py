"""The attention scores presses ask for: softmax(q·K/sqrt(d)) over the visible slots, apart from the attention
output (which ``scaled_dot_product_attention`` computes), with the same mask: invalid slots and slots later than
the query are excluded.
"""

from __future__ import annotations

import torch

_QUERY_CHUNK = 256  # bounds the [B, H, chunk, S] score tensor during long prefills
#: Bounds the score tensor over rows too (256 MiB of float32): decoding folds every layer of a large batch into
#: the rows, and a GPU batch sized to fill memory must not need a window's scores for all of them at once.
_SCORE_ELEMENTS = 2**26


def attention_probs(
    query: torch.Tensor,
    query_positions: torch.Tensor,
    query_valid: torch.Tensor,
    keys: torch.Tensor,
    key_positions: torch.Tensor,
    key_valid: torch.Tensor,
    scaling: float,
    reduce: str = "sum",
    gqa: str = "mean",
) -> torch.Tensor:
    """Attention that the valid queries place on each key slot, per KV head.

    query [B, Hq, Lq, D] with positions/valid [B, Lq]; keys [B, H, S, D] with positions/valid [B, H, S].
    Probabilities are reduced over queries (``sum`` or ``mean`` over valid queries), then over the query
    heads of each GQA group (``mean`` or ``max``). Returns float32 [B, H, S].
    """
    b, hq, lq, _ = query.shape
    h, s = keys.shape[1], keys.shape[2]
    group = hq // h
    keys32 = keys.float()
    total = torch.zeros(b, h, group, s, dtype=torch.float32, device=keys.device)
    rows_per_chunk = max(1, _SCORE_ELEMENTS // (hq * min(lq, _QUERY_CHUNK) * max(s, 1)))
    for r0 in range(0, b, rows_per_chunk):
        r = slice(r0, min(b, r0 + rows_per_chunk))
        for start in range(0, lq, _QUERY_CHUNK):
            q = slice(start, min(lq, start + _QUERY_CHUNK))
            total[r] += _probs_sum(query[r, :, q], query_positions[r, q], query_valid[r, q], keys32[r],
                                   key_positions[r], key_valid[r], scaling)
    if reduce == "mean":
        total = total / query_valid.sum(dim=-1).clamp(min=1)[:, None, None, None]
    elif reduce != "sum":
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    if gqa == "mean":
        return total.mean(dim=2)
    if gqa == "max":
        return total.amax(dim=2)
    raise ValueError(f"gqa aggregation must be 'mean' or 'max', got {gqa!r}")


def masked_logits(query, query_positions, query_valid, keys, key_positions, key_valid, scaling):
    """float32 q·K logits [B, H, group, n, S] with masked entries at the float32 minimum, and the mask
    [B, H, 1, n, S] (True = visible), for query [B, Hq, n, D] and keys [B, H, S, D]."""
    b, hq, n, d = query.shape
    h, s = keys.shape[1], keys.shape[2]
    # Scale the (small) queries, not the logits; masks are built once per KV head and broadcast over the
    # GQA group; an invalid query sees no key.
    q = (query.float() * scaling).reshape(b, h, hq // h * n, d)
    logits = torch.matmul(q, keys.float().transpose(-1, -2)).view(b, h, hq // h, n, s)
    mask = key_valid[:, :, None, :] & (key_positions[:, :, None, :] <= query_positions[:, None, :, None])
    mask &= query_valid[:, None, :, None]
    mask = mask[:, :, None]
    return logits.masked_fill_(~mask, torch.finfo(torch.float32).min), mask


def _probs_sum(query, query_positions, query_valid, keys, key_positions, key_valid, scaling) -> torch.Tensor:
    """softmax(q·K) summed over the queries: [B, H, group, S]; a row that sees nothing is zeroed by its mask."""
    logits, mask = masked_logits(query, query_positions, query_valid, keys, key_positions, key_valid, scaling)
    return torch.softmax(logits, dim=-1).mul_(mask).sum(dim=3)
