"""scope against SCOPE's own cache: its H2O prefill and its "slide" decoding.

Source: Linking-ai/SCOPE @ 8cbae48.

- ``model/kv_utils.py`` lines 669-702, ``H2OKVCluster.update_kv`` (the prefill, ``q_len`` = the prompt): a prompt
  shorter than ``max_capacity_prompt`` C stays whole (679-680); otherwise every prompt query's softmax over the
  prompt's keys (682-691; the causal mask is applied only to the last ``window_size`` w queries x w keys, 683-689:
  the earlier queries see the keys after them too), summed over the queries for the keys before the last w (692),
  ``topk(C - w)`` of them (694) then the last w (696-700).
- ``model/kv_utils.py`` lines 736-766, ``update_kv_in_decoding`` with ``decoding_metric == 'slide'``: after each
  decoding token is appended, a cache of ``k_len >= C + D`` entries (D = ``decoding_window_size``) keeps its first
  C physical entries (749-750), the ``topk(D - r)`` of the entries after them and before the last r
  (r = ``decoding_recent_size``) by the current query's softmax (743-745, 753-754), and its last r (762-765).
- ``model/llama_model.py`` lines 1157-1184, ``llama_flash_attn2_forward_H2O``: the keys and values are repeated to
  the query heads (``repeat_kv``, 1160-1161) before the cluster sees them, so every query head has its own cache and
  selection; the prefill compresses once (1168-1171); decoding appends, then compresses (1174-1184), the step's
  attention reading the uncompressed cache.
- ``run_longgenbench.py`` lines 169-171: ``window_size = 8`` for H2O; ``scripts/scripts_longgenbench/
  eval_h2o+scope_4k_512.sh``: C = 2048, D = 512 or 1024, r = 256.

kvbench's ``scope`` with ``scoring=current, buffer=1, prefill_budget=C, prefill_window=w, recent_ratio=r/D`` at
``--budget C + D`` is this rule (``tests/reference`` checks it below), with these named differences (the press's
docstring names them too):

1. Per KV head, not per query head: SCOPE repeats the KV heads before caching, so each query head selects its
   own tokens; kvbench's cache holds one set per KV head, scored by the mean over its query heads
   (``gqa=mean``). At GQA group 1 the two coincide (identical kept sets below); at groups 2 and 7 the query heads
   of one group keep different sets, which no per-KV-head cache can hold: kvbench is identical to the reference
   with the group-mean adaptation, and differs from the per-query-head reference.
2. A causal prefill: kvbench's prefill scores are each prompt query's softmax over the keys up to it; SCOPE's
   earlier queries (all but the last w) also see the keys after them. Reproducing that needs every prompt query,
   which the engine does not hand a press. A prompt longer than C: identical to the reference with a causal
   prefill; the exact reference differs from the prefill on. A prompt shorter than C (no prefill compression):
   identical to the exact reference.
3. Numerics: SCOPE runs in float16 (its scores are float16 probabilities, ties broken by ``topk``); kvbench scores
   in float32, ties by recency. The seeded and traced inputs here are float32.
"""

import math

import pytest
import torch

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

#: (C, D, r, w): prefill capacity, decoding window, decoding recent, prefill window. A 24-token seeded prompt is
#: longer than the first two C (prefill compression) and shorter than the third (the first C entries, generated
#: tokens included, pinned).
SEEDED = {"long": (12, 16, 4, 8), "long-small-window": (16, 8, 4, 2), "short": (32, 8, 2, 8)}


def _grouped(scores, group, group_mean):
    """kvbench's adaptation, not SCOPE's: each query head scores by its group's mean, so the group selects alike."""
    if not group_mean or group == 1:
        return scores
    heads = scores.shape[0] // group
    return scores.view(heads, group, *scores.shape[1:]).mean(dim=1).repeat_interleave(group, dim=0)


def prefill(queries, keys, positions, capacity, window, *, group=1, group_mean=False, causal=False):
    """``H2OKVCluster.update_kv`` on one layer: queries [Hq, P, d], keys [Hq, P, d] (repeated), positions [P]."""
    heads, q_len, d = queries.shape
    if q_len < capacity:  # 679-680: the prompt stays whole
        return positions.expand(heads, -1).clone(), keys
    attn = queries @ keys.transpose(1, 2) / math.sqrt(d)  # 682
    low = torch.finfo(attn.dtype).min
    if causal:  # named difference 2: kvbench's causal prefill
        attn = attn.masked_fill(torch.ones(q_len, q_len, dtype=torch.bool).triu(1), low)
    else:  # 683-689: only the last window's block is masked
        mask = torch.full((window, window), low)
        cond = torch.arange(window)
        mask.masked_fill_(cond < (cond + 1).view(window, 1), 0)
        attn[:, -window:, -window:] += mask
    probs = torch.softmax(attn, dim=-1, dtype=torch.float32).to(queries.dtype)  # 691
    scores = _grouped(probs[:, :, :-window].sum(dim=-2), group, group_mean)  # 692-693
    indices = scores.topk(capacity - window, dim=-1).indices  # 694
    order = torch.cat([indices, torch.arange(q_len - window, q_len).expand(heads, -1)], dim=1)  # 696-700
    return positions[order], keys.gather(1, order[..., None].expand(-1, -1, d))


def slide(query, keys, positions, capacity, decoding_window, recent, *, group=1, group_mean=False):
    """``update_kv_in_decoding``, ``slide``, on one layer: query [Hq, 1, d], keys [Hq, k_len, d] and positions
    [Hq, k_len] after the append, in physical order."""
    heads, k_len, d = keys.shape
    if k_len < capacity + decoding_window:  # 740-741
        return positions, keys
    attn = query @ keys.transpose(1, 2) / math.sqrt(d)  # 743
    probs = torch.softmax(attn, dim=-1, dtype=torch.float32).to(query.dtype)  # 744
    scores = _grouped(probs[:, :, :-recent].sum(dim=-2), group, group_mean)  # 745-746
    decoding = scores[:, capacity:].topk(decoding_window - recent, dim=-1).indices + capacity  # 753-754
    past = torch.cat([torch.arange(capacity).expand(heads, -1), decoding], dim=1)  # 749-750, 758
    kept_keys = keys[:, :-recent].gather(1, past[..., None].expand(-1, -1, d))  # 760
    return (torch.cat([positions[:, :-recent].gather(1, past), positions[:, -recent:]], dim=1),
            torch.cat([kept_keys, keys[:, -recent:]], dim=1))  # 762-765


def reference(forwards, capacity, decoding_window, recent, window=8, *, group_mean=False, causal=False):
    """SCOPE's H2O prefill + slide decoding over every layer; ``kept[t][layer][query head]`` (the query heads of a
    group hold identical sets under ``group_mean``)."""
    first = forwards[0]
    group = first.group
    caches = []
    for layer in range(first.layers):
        keys = first.keys[layer].repeat_interleave(group, dim=0)  # repeat_kv, llama_model.py 1160
        caches.append(prefill(first.queries[layer], keys, first.positions, capacity, window, group=group,
                              group_mean=group_mean, causal=causal))
    kept = [[[set(h.tolist()) for h in positions] for positions, _ in caches]]
    for forward in forwards[1:]:
        for layer, (positions, keys) in enumerate(caches):
            new = forward.keys[layer].repeat_interleave(group, dim=0)  # [Hq, 1, d]
            positions = torch.cat([positions, forward.positions.expand(positions.shape[0], -1)], dim=1)
            caches[layer] = slide(forward.queries[layer], torch.cat([keys, new], dim=1), positions, capacity,
                                  decoding_window, recent, group=group, group_mean=group_mean)
        kept.append([[set(h.tolist()) for h in positions] for positions, _ in caches])
    return kept


def per_kv_head(kept, group):
    """The first query head of each group: where every head of a group agrees, the KV head's set."""
    return [[heads[::group] for heads in layers] for layers in kept]


def slide_press(capacity, decoding_window, recent, window):
    return make_press("scope", {"scoring": "current", "buffer": "1", "prefill_budget": str(capacity),
                                "prefill_window": str(window), "recent_ratio": str(recent / decoding_window)})


def check(kvbench, forwards, params, case, prompt_length):
    """Identical to SCOPE's rule where kvbench can hold it; the named differences elsewhere, asserted."""
    capacity, decoding_window, recent, window = params
    group = forwards[0].group
    exact = reference(forwards, capacity, decoding_window, recent, window)
    if group == 1 and prompt_length < capacity:
        return assert_identical(kvbench, exact, forwards, "scope", f"{case}: SCOPE's slide")
    adapted = reference(forwards, capacity, decoding_window, recent, window, group_mean=group > 1,
                        causal=prompt_length >= capacity)
    agreement = assert_identical(kvbench, per_kv_head(adapted, group), forwards, "scope",
                                 f"{case}: SCOPE's slide, causal prefill, group mean")
    differs = compare(kvbench, per_kv_head(exact, group), forwards)
    log("scope", f"{case}: SCOPE's slide (named differences 1-2)", differs)
    assert differs.first_difference is not None, "the named difference did not show"
    if group == 1:  # difference 2 alone: at the prefill
        assert differs.first_difference.startswith("forward 0,"), differs
    else:  # difference 1: the query heads of a group disagree, which no per-KV-head cache can hold
        assert any(len({frozenset(s) for s in heads[g:g + group]}) > 1 for layers in exact for heads in layers
                   for g in range(0, len(heads), group))
    return agreement


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("case", SEEDED)
def test_seeded(group, case):
    params = SEEDED[case]
    forwards = synthetic_forwards(group, group=group, prompt=24, steps=60)
    kvbench = run_cache(slide_press(*params), params[0] + params[1], forwards)
    check(kvbench, forwards, params, f"seeded {case} group {group}", 24)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize(("text", "params"), [("Tom has 12 apples. He buys 7 more. How many?", (20, 12, 3, 8)),
                                              ("Tom has 12 apples.", (24, 8, 2, 8))], ids=["long", "short"])
def test_in_situ(group, text, params):
    model, tokenizer = tiny_model(group)
    prompt = tokenizer(text)["input_ids"]
    forwards, kept = trace_model(model, prompt, slide_press(*params), params[0] + params[1], max_new_tokens=60)
    check(kept, forwards, params, f"tiny-llama {len(prompt)}-token prompt group {group}", len(prompt))


def test_default_is_not_scopes_slide():
    """kvbench's default (accumulated attention, re-selected every 16 steps, 25 % of the prefill budget protected)
    is its own variant: it differs from SCOPE's slide at the same split of the budget."""
    forwards = synthetic_forwards(1, group=1, prompt=24, steps=60)
    capacity, decoding_window, recent, window = SEEDED["short"]
    press = make_press("scope", {"prefill_budget": str(capacity)})
    agreement = compare(run_cache(press, capacity + decoding_window, forwards),
                        reference(forwards, capacity, decoding_window, recent, window), forwards)
    assert agreement.first_difference is not None
