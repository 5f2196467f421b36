"""A registered attention function over the cache's physical slots, and the attention scores presses ask for.

Attention output always comes from ``scaled_dot_product_attention`` (no eager attention). Scores are a
separate softmax(q·K/sqrt(d)) computed only for layers whose press asks, over the same visible slots and
with the same mask (invalid slots and slots later than the query are excluded).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kvbench.errors import KvbenchError

if TYPE_CHECKING:
    from kvbench.engine.cache import BudgetCache

IMPLEMENTATION = "kvbench"
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


def kvbench_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    kvbench_cache: BudgetCache | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over the slots returned by ``BudgetCache.update``; masks built from the cache itself."""
    if kvbench_cache is None:
        raise RuntimeError("the kvbench attention implementation needs kvbench_cache=BudgetCache(...)")
    _refuse_unsupported(module, kwargs, kvbench_cache.max_length)
    layer = kvbench_cache.layers[module.layer_idx]
    b, hq, lq, d = query.shape
    h = key.shape[1]
    scaling = d**-0.5 if scaling is None else scaling
    if kvbench_cache.mode == "shadow":  # ShadowKV: exact over the prompt, then sparse (kvbench.engine.shadow)
        out = layer.attend_prompt(query, key, value, scaling) if kvbench_cache.decode_step == 0 else \
            layer.attend(query, scaling)
        return out.transpose(1, 2).contiguous(), None
    if lq == 1 and kvbench_cache.mode != "overflow":
        # One query per sequence: fold the GQA group into the query length, so keys are never expanded.
        mask = layer.valid[:, :, None, : key.shape[2]]
        out = F.scaled_dot_product_attention(query.view(b, h, hq // h, d), key, value, attn_mask=mask, scale=scaling)
        out = out.view(b, hq, 1, -1)
    else:
        positions, valid = layer.visible_positions()
        if kvbench_cache.heads_uniform:
            positions, valid = positions[:, :1], valid[:, :1]
        q_pos = kvbench_cache.step.positions
        mask = valid[:, :, None, :] & (positions[:, :, None, :] <= q_pos[:, None, :, None])
        if mask.shape[1] > 1:
            mask = mask.repeat_interleave(hq // h, dim=1)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
        out = out.nan_to_num(0.0)  # padding queries may see no key; their outputs are never used
    layer.after_attention(query, scaling)
    return out.transpose(1, 2).contiguous(), None


def _refuse_unsupported(module: torch.nn.Module, kwargs: dict, length: int) -> None:
    """Attention variants the slot attention does not implement fail here rather than give a wrong answer."""
    window = kwargs.get("sliding_window")
    if window is not None and window < length:
        raise KvbenchError(f"{type(module).__name__}: sliding-window attention ({window} tokens) is not supported; "
                           f"kvbench evicts from full-attention caches only (this run needs {length} tokens)")
    for name, what in (("softcap", "attention logit soft-capping"), ("s_aux", "attention sinks")):
        if kwargs.get(name) is not None:
            raise KvbenchError(f"{type(module).__name__}: {what} is not supported by kvbench's attention")


def _no_mask(*args, **kwargs) -> None:
    return None  # masks come from the cache's own slot state, never from transformers' mask builders


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, kvbench_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, _no_mask)


@contextlib.contextmanager
def use_kvbench_attention(model):
    """Route ``model``'s attention through ``kvbench_attention`` for the duration of the block."""
    register()
    previous = model.config._attn_implementation
    model.config._attn_implementation = IMPLEMENTATION
    try:
        yield model
    finally:
        model.config._attn_implementation = previous
