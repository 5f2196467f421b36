"""kvpress's ``DecodingPress`` in plain torch, shared by the transcriptions of the presses kvbench runs under it
(``keydiff``, ``expected-attention``, and the schedule itself, ``test_decoding_schedule.py``).

Source: NVIDIA/kvpress @ 8bb29b9 (the same files in kvpress 0.5.5 for these lines, ``docs/kvpress-peer.md``).

- ``kvpress/presses/decoding_press.py`` lines 194-236 (``_find_target_compression_ratio``): the ratio whose
  ``int(k_len * (1 - ratio))`` is the target, by bisection; 0 for a cache at or under the target.
- ``kvpress/presses/scorer_press.py`` lines 86-100 (``ScorerPress.compress``): ratio 0 leaves the cache as it is;
  ``n_kept = int(k_len * (1 - ratio))``, ``scores.topk(n_kept).indices``, keys and values gathered in ``topk``'s
  order, so after a compression the cache's physical order is by score.
- ``kvpress/presses/decoding_press.py`` lines 113-179 (``forward_hook``), after each layer's attention with the
  forward's tokens already in the cache: nothing at the prefill (129; ``base_press.py`` 37-40); otherwise the
  layer's counter goes up (137) and at ``compression_interval`` forwards, or a forward of ``q_len >= target_size``
  tokens (141), the whole cache is compressed (147-166) and the counter reset (169).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def find_target_compression_ratio(q_len, target_tokens):
    """``DecodingPress._find_target_compression_ratio`` (decoding_press.py lines 194-236), verbatim."""
    if q_len <= target_tokens:
        return 0.0
    ratio = 1.0 - (target_tokens / q_len)
    low, high = 0.0, 1.0
    iteration = 0
    while iteration < 20:
        n_kept = int(q_len * (1 - ratio))
        if n_kept == target_tokens:
            break
        elif n_kept > target_tokens:
            low = ratio
            ratio = (ratio + high) / 2
        else:
            high = ratio
            ratio = (low + ratio) / 2
        iteration += 1
    return ratio


def scorer_compress(scores: torch.Tensor, positions: torch.Tensor, budget: int, tensors: dict,
                    ties: str = "topk", dim: int = -2):
    """``DecodingPress.compress`` (102-111) then ``ScorerPress.compress`` (scorer_press.py 86-100) on one layer:
    ``scores`` and ``positions`` [..., n] in physical order, ``tensors`` (keys, values) with their entries along
    ``dim``. Returns the positions and tensors kept, in ``topk``'s order; None where the cache is left as it is.

    ``ties="newest"`` is not the source: equal scores ranked newest first (kvbench's ranking)."""
    k_len = scores.shape[-1]
    ratio = find_target_compression_ratio(k_len, budget)
    if ratio == 0:  # line 86: a cache at or under the target is left as it is
        return None
    n_kept = int(k_len * (1 - ratio))  # line 94
    if ties == "topk":
        indices = scores.topk(n_kept, dim=-1).indices  # line 95
    else:
        newest_first = positions.argsort(dim=-1, descending=True, stable=True)
        by_score = scores.gather(-1, newest_first).argsort(dim=-1, descending=True, stable=True)
        indices = newest_first.gather(-1, by_score)[..., :n_kept]
    kept = {name: t.gather(dim, indices[..., None].expand(*indices.shape, t.shape[-1])).contiguous()
            for name, t in tensors.items()}  # lines 99-100
    return positions.gather(-1, indices), kept


def decoding_press(forwards, budget: int, interval: int, score: Callable[[torch.Tensor], torch.Tensor], *,
                   prefill_over: int | None = None, ties: str = "topk", q_len_trigger: bool = True):
    """kept[t][layer][head] of kvpress's cache under ``DecodingPress(base, compression_interval=interval,
    target_size=budget)`` for a base press whose ``score`` reads the keys only (``score(keys [1, H, n, d])`` ->
    [1, H, n]): each layer's ``forward_hook`` after its attention, the cache in its own physical order.

    Not the rule, for naming kvbench's differences one at a time: ``prefill_over=n`` also compresses a prefill of
    more than ``n`` tokens to ``budget``; ``ties="newest"`` ranks equal scores newest first;
    ``q_len_trigger=False`` drops line 141's ``q_len >= target_size``.
    """
    first = forwards[0]
    kv_heads, d = first.keys.shape[1], first.keys.shape[-1]
    keys = [torch.empty(1, kv_heads, 0, d, dtype=first.keys.dtype) for _ in range(first.layers)]
    positions = [torch.empty(1, kv_heads, 0, dtype=torch.long) for _ in range(first.layers)]
    step_counts = [0] * first.layers  # layer_step_counts, line 54
    kept = []

    def compress(i):
        done = scorer_compress(score(keys[i]), positions[i], budget, {"keys": keys[i]}, ties)
        if done is not None:
            positions[i], keys[i] = done[0], done[1]["keys"]

    for forward in forwards:
        q_len = forward.positions.numel()
        for i in range(first.layers):
            # DynamicCache.update appends the forward's keys before attention; the hook runs after it
            keys[i] = torch.cat([keys[i], forward.keys[i][None]], dim=2)
            positions[i] = torch.cat([positions[i], forward.positions.expand(1, kv_heads, q_len)], dim=2)
            if int(forward.positions[-1]) + 1 == q_len:  # is_prefilling (base_press.py 37-40): line 129, no-op
                if prefill_over is not None and q_len > prefill_over:  # not the source: kvbench's prefill cut
                    compress(i)
                continue
            step_counts[i] += 1  # line 137
            if step_counts[i] >= interval or (q_len_trigger and q_len >= budget):  # line 141
                compress(i)
                step_counts[i] = 0  # line 169
        kept.append([[set(row.tolist()) for row in p[0]] for p in positions])
    return kept
