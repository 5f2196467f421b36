"""snapkv-d against SnapKV's ``update_kv`` rule, applied at every compression of the cache SnapKV would hold.

Source: FasterDecoding/SnapKV @ e216ddc, ``snapkv/monkeypatch/snapkv_utils.py`` lines 23-70
(``SnapKVCluster.update_kv``): with ``C = max_capacity_prompt`` and ``w = window_size``, if the cache holds
``q_len >= C`` entries, the last ``w`` queries attend to every key (``/ sqrt(head_dim)``, line 45), a causal mask
(``finfo.min``) inside the last ``w x w`` block (46-52), a float32 softmax over all keys (54), the *sum* over the
window queries of the attention on the non-window prefix (55), ``avg_pool1d`` (``count_include_pad`` left at
True) or ``max_pool1d`` with ``padding = kernel_size // 2`` over the prefix alone, in the cache's physical order
(56-61), ``topk(C - w)`` (62), and the cache becomes the gathered prefix in ``topk`` order followed by the window
(63-69). Defaults: the class's w=64, k=5, avgpool (24); ``init_snapkv``'s w=32, k=5, avgpool (72-81), the ones
SnapKV's code runs with unless configured; the LongBench configs' w=32, k=7, maxpool
(``experiments/LongBench/config/ablation_c*_w32_k7_maxpool.json``). GQA: ``llama_hijack_4_37.py`` lines 76-77
call ``repeat_kv`` *before* ``update_kv``, so every query head selects its own tokens (the cache holds one copy
per query head).

SnapKV compresses the prompt only. kvbench's ``snapkv-d`` (SnapKV-D, the decoding variant) applies the rule at
every compression: the reference runs ``update_kv`` whenever the cache it simulates holds ``budget + buffer``
entries (buffer 1; a prompt longer than the budget at the prefill), with ``C = budget``, on that cache in its own
physical order (the kept prefix in ``topk`` order, then the window, then the tokens appended since), the window
being the last ``w`` queries each at its own position (the last ``w`` entries of that cache are always the ``w``
newest tokens).

Agreement: with kvbench's three choices below (``gqa="mean", order="token", ties="newest"``) the reference is
identical to kvbench at every compression, seeded (groups 1, 2, 7; budgets 36 and 40 with w=32, 12 and 20 with
w=8) and in situ (tiny llama, groups 1, 2, 7), for ``init_snapkv``'s configuration (kvbench's defaults), the
LongBench configuration (``kernel_size=7 pooling=max``) and without pooling. ``check`` then puts back the source's
choice for one difference at a time and asserts that the kept sets differ exactly where that difference applies,
and that the literal rule (all three the source's) differs wherever one applies: for MHA without pooling the
literal rule itself is identical.

Named differences (named in kvbench's docstring, ``kvbench/presses/snapkv_d.py``; the third is the engine's ranking,
``kvbench/presses/ranking.py``):

1. GQA: kvbench keeps one set per KV head, scored by the mean over the query group of each query head's
   window-summed attention (what KVCache-Factory's kv-head layout does: Zefan-Cai/KVCache-Factory @ c97f9d7,
   ``pyramidkv/pyramidkv_utils.py`` lines 252-298, ``_grouped_window_attn_cache``, the group reduced before
   pooling; kvpress and SnapKV issue #22 likewise); SnapKV's code selects per query head after ``repeat_kv``.
   Moves the kept sets at the first compression for every group > 1.
2. Pooling order: kvbench pools the prefix along token order; SnapKV's ``avg/max_pool1d`` runs along the cache's
   physical order, which after the first compression is ``topk``'s score order, so its neighbours there are not
   neighbours in the text (harmless at the prefill, SnapKV's only use). Moves the kept sets from the second
   compression on whenever ``kernel_size > 1``.
3. Ties: kvbench ranks equal scores newest first; SnapKV keeps CPU ``topk``'s order of equal scores. Max pooling
   gives neighbours exactly equal scores, so with the LongBench configuration the kept sets differ from the
   first compression; average pooling of real-valued attention had no ties here.

Not differences (identical kept sets): the pooling edges (kvbench revision 2 pools the scored prefix alone,
counting the zero padding, as ``avg_pool1d`` does here; revision 1 pooled every slot without counting padding);
the window inside the budget (``C = budget``: ``C - w`` scored entries + ``w``, as SnapKV's ``max_capacity_prompt``
counts its window); summed vs mean window attention (one factor per compression, the same ranking); the causal
mask inside the window and the softmax over every held key, window included.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from kvbench.presses import make_press
from tests.reference.harness import (
    GROUPS,
    assert_identical,
    compare,
    log,
    run_cache,
    synthetic_forwards,
    tiny_model,
    trace_model,
)

PROMPT = "Tom has 12 apples. He buys 7 more. How many?"


def stacked(forwards):
    """Every forward's keys and queries along the sequence (positions are 0, 1, 2, ...: index = position)."""
    positions = torch.cat([f.positions for f in forwards])
    assert torch.equal(positions, torch.arange(positions.numel()))
    return torch.cat([f.keys for f in forwards], dim=2), torch.cat([f.queries for f in forwards], dim=2)


def window_scores(keys, queries, window_size):
    """``update_kv`` lines 45-55 for one layer: keys [H, n, d], queries [H, g, w, d] (g query heads read each
    cache row) -> [H, g, n - w], the window-summed attention on the prefix."""
    head_dim = queries.shape[-1]
    attn = torch.matmul(queries, keys[:, None].transpose(-1, -2)) / math.sqrt(head_dim)  # line 45
    mask = torch.full((window_size, window_size), torch.finfo(attn.dtype).min)  # line 46
    cond = torch.arange(window_size)
    mask.masked_fill_(cond < (cond + 1).view(window_size, 1), 0)  # line 48
    attn[..., -window_size:, -window_size:] += mask  # line 52
    attn = torch.softmax(attn, dim=-1, dtype=torch.float32).to(queries.dtype)  # line 54
    return attn[..., -window_size:, :-window_size].sum(dim=-2)  # line 55


def pool(scores, kernel_size, pooling):
    """Lines 56-61 on [1, H, n] (``avg_pool1d``'s ``count_include_pad`` left at True: zero padding counted)."""
    if pooling == "avgpool":
        return F.avg_pool1d(scores, kernel_size=kernel_size, padding=kernel_size // 2, stride=1)
    if pooling == "maxpool":
        return F.max_pool1d(scores, kernel_size=kernel_size, padding=kernel_size // 2, stride=1)
    raise ValueError("Pooling method not supported")


def top(scores, positions, k, ties="topk"):
    """Line 62: ``topk`` (ties in the order CPU ``topk`` returns them); ``ties="newest"``: equal scores ranked
    newest first (kvbench's ``ranking.rank_slots``, difference 3), for measuring."""
    if ties == "topk":
        return scores.topk(k, dim=-1).indices
    newest_first = positions.argsort(dim=-1, descending=True, stable=True)
    by_score = scores.gather(-1, newest_first).argsort(dim=-1, descending=True, stable=True)
    return newest_first.gather(-1, by_score)[:, :k]


def update_kv(cache, keys, queries, capacity, window_size, kernel_size, pooling, ties="topk"):
    """``SnapKVCluster.update_kv`` on one layer's cache of positions ``cache`` [H, n] (physical order), its keys
    [H, n, d] and the window queries [H, g, w, d]; the group's scores are averaged (g = 1: SnapKV's own layout)."""
    if capacity <= window_size:  # never in SnapKV (C > w, line 27): an allocation's share below the window
        return cache[:, cache.shape[1] - capacity:]  # keeps its newest entries (all protected)
    scores = window_scores(keys, queries, window_size).mean(dim=1)  # [H, n - w]; g > 1: KVCache-Factory 252-291
    pooled = pool(scores[None], kernel_size, pooling)[0]  # lines 56-61
    prefix = cache[:, :-window_size]
    indices = top(pooled[:, :prefix.shape[1]], prefix, capacity - window_size, ties)  # line 62
    return torch.cat([cache[:, :-window_size].gather(1, indices), cache[:, -window_size:]], dim=1)  # lines 63-69


def reference(forwards, budget, window_size=32, kernel_size=5, pooling="avgpool", gqa=None, order="source",
              ties="topk", layer_keep=None):
    """kept[t][layer][head] of SnapKV's cache, ``update_kv`` at every compression (budget + 1 held).

    ``gqa=None``: SnapKV's layout, one cache row per *query* head (``repeat_kv`` first); ``"mean"``: one per KV
    head, scored by the group's mean. ``order="token"`` sorts each row by position before scoring (kvbench's
    pooling order, difference 2); ``ties="newest"``: kvbench's tie order (3). ``layer_keep(layer, held)``: the
    entries a layer holding ``held`` keeps at a compression (None: all; default ``budget``), for allocations.
    """
    all_keys, all_queries = stacked(forwards)
    layers, kv_heads = all_keys.shape[:2]
    group = all_queries.shape[1] // kv_heads
    rows, per_row = (kv_heads, group) if gqa == "mean" else (kv_heads * group, 1)
    caches = [torch.empty(rows, 0, dtype=torch.long) for _ in range(layers)]
    kept = []
    for forward in forwards:
        newest = int(forward.positions[-1])
        for layer in range(layers):
            cache = torch.cat([caches[layer], forward.positions.expand(rows, -1)], dim=1)  # cache.update appends
            keep = budget if layer_keep is None else layer_keep(layer, cache.shape[1])
            if newest + 1 > budget and keep is not None and cache.shape[1] > keep:  # budget + 1 seen: compress
                if order == "token":
                    cache = cache.sort(dim=1).values
                kv_head = torch.arange(rows) * per_row // group  # query head h reads KV head h // group
                keys = all_keys[layer, kv_head[:, None], cache]  # [rows, n, d]
                assert newest + 1 >= window_size, "SnapKV needs window_size queries"
                queries = all_queries[layer, :, newest - window_size + 1:newest + 1]
                queries = queries.reshape(rows, per_row, window_size, -1)
                cache = update_kv(cache, keys, queries, keep, window_size, kernel_size, pooling, ties)
            caches[layer] = cache
        kept.append([[set(row.tolist()) for row in cache] for cache in caches])
    return kept


def per_query_head(kept, group):
    """kvbench's kept sets repeated over each KV head's query heads (SnapKV's cache layout)."""
    return [[[heads[h // group] for h in range(len(heads) * group)] for heads in step] for step in kept]


#: kvbench's parameters for each SnapKV configuration: (kvbench args, reference kwargs).
CONFIGS = {
    "init_snapkv": ({}, {"window_size": 32, "kernel_size": 5, "pooling": "avgpool"}),
    "longbench": ({"kernel_size": "7", "pooling": "max"}, {"window_size": 32, "kernel_size": 7, "pooling": "maxpool"}),
    "no_pooling": ({"kernel_size": "1"}, {"window_size": 32, "kernel_size": 1, "pooling": "avgpool"}),
    "window8": ({"window_size": "8"}, {"window_size": 8, "kernel_size": 5, "pooling": "avgpool"}),
}
#: kvbench's choice for each named difference (the source's is the reference's default).
KVBENCH = {"gqa": "mean", "order": "token", "ties": "newest"}


def applies(difference, group, kwargs):
    """Whether a named difference can move the kept sets: GQA with a group, the pooling order with a kernel,
    ties with max pooling (exact ties between neighbours; average pooling of random scores has none)."""
    if difference == "gqa":
        return group > 1
    if difference == "order":
        return kwargs["kernel_size"] > 1
    return kwargs["kernel_size"] > 1 and kwargs["pooling"] == "maxpool"


def check(kept, forwards, group, budget, config, case):
    """Identical with kvbench's three choices; the source's choice for any one of them differs exactly where that
    difference applies; the literal rule (all three the source's) differs wherever one applies."""
    kwargs = CONFIGS[config][1]
    case = f"{case} {config}"
    agreement = assert_identical(kept, reference(forwards, budget, **kwargs, **KVBENCH), forwards, "snapkv-d",
                                 f"{case} (kvbench: group mean, token-order pooling, ties newest first)")
    for difference, source in (("gqa", None), ("order", "source"), ("ties", "topk"), ("literal", None)):
        variant = {} if difference == "literal" else dict(KVBENCH, **{difference: source})
        mine = per_query_head(kept, group) if variant.get("gqa") is None else kept
        found = compare(mine, reference(forwards, budget, **kwargs, **variant), forwards)
        log("snapkv-d", f"{case} (source's {difference})", found)
        expected = any(applies(d, group, kwargs) for d in KVBENCH) if difference == "literal" else \
            applies(difference, group, kwargs)
        assert (found.first_difference is not None) == expected, f"{difference}: {found}"
    return agreement


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("budget", [36, 40])
@pytest.mark.parametrize("config", ["init_snapkv", "longbench", "no_pooling"])
def test_seeded(group, budget, config):
    forwards = synthetic_forwards(group, group=group, prompt=40, steps=50)
    kept = run_cache(make_press("snapkv-d", CONFIGS[config][0]), budget, forwards)
    check(kept, forwards, group, budget, config, f"seeded group {group} budget {budget}")


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("budget", [12, 20])
def test_seeded_window8(group, budget):
    forwards = synthetic_forwards(group, group=group, prompt=24, steps=50)
    kept = run_cache(make_press("snapkv-d", CONFIGS["window8"][0]), budget, forwards)
    check(kept, forwards, group, budget, "window8", f"seeded group {group} budget {budget}")


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("config", ["init_snapkv", "longbench", "window8"])
def test_in_situ(group, config):
    model, tokenizer = tiny_model(group)
    prompt = tokenizer(PROMPT)["input_ids"]
    budget = 20 if config == "window8" else 40
    forwards, kept = trace_model(model, prompt, make_press("snapkv-d", CONFIGS[config][0]), budget,
                                 max_new_tokens=60)
    check(kept, forwards, group, budget, config, f"tiny-llama group {group} budget {budget}")
