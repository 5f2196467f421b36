"""adakv:P against AdaKV's head-wise allocation: FFY0/AdaKV's own, and NVIDIA kvpress's.

Sources:

- FFY0/AdaKV @ efe4e2e, ``adaptive_snapkv/monkeypatch/snapkv_utils.py`` lines 297-370 and 380-501
  (``AdaptiveSnapKVCluster``, ``update_kv_gqa``; ``update_kv_wo_gqa`` 507-619 is the same over query heads):
  ``base = budget - window`` (303) and ``floor = int(base * floor_alpha)`` (305); each head's prefix scores
  sorted (445); a joint ``topk`` of ``heads * base`` over the heads' sorted scores counts each head's entries
  (452-458); head ``h`` keeps its ``round(count_h * (1 - alpha) + floor)`` best (460, 478) and the window is added
  to every head (488). Defaults: window 32, kernel 7, maxpool (298; ``config_compress``), ``floor_alpha=0.2``
  (``experiments/LongBench/pred.py`` line 27), skip 0, no normalisation, GQA by the group's mean with
  ``--gqa_support`` (``gqa_func="mean"``, lines 351-358; without it, over query heads after ``repeat_kv``).
- NVIDIA/kvpress @ 8bb29b9, ``kvpress/presses/adakv_press.py`` lines 53-78 (``AdaKVPress.compress``):
  ``n_kept`` per head on average (the window inside: the scorer pads its window with ``max + 1``, e.g.
  ``snapkv_press.py`` line 103); each head's top ``n_safe = int(n_kept * alpha_safeguard)`` are raised to the
  dtype's max (65-67); the ``heads * (k_len - n_kept)`` lowest scores over all heads are pruned (70-71).
  ``alpha_safeguard=0.20``.

Both compress the prompt only. Here each runs at every compression of kvbench's cadence (the sequence holds
``budget + 1`` entries: the prefill of a longer prompt, then every step) on the cache it holds, whose heads hold
different numbers of entries once it has compressed: FFY0's joint ``topk`` and kvpress's joint bottom-k run over
every head's held slots (shorter heads padded with ``-inf``, dropped first). The scores are the inner press's:
snapkv-d's (``tests/reference/test_snapkv_d.py``: window attention, group mean, pooled along token order), the same
for both transcriptions, so only the allocation is compared.

kvbench's ``adakv:`` is kvpress's rule: identical kept sets at every compression (seeded, four KV heads: groups 1,
2, 7, budgets 16 and 24 at alpha 0.2, budget 16 at alpha 0 and 0.9, budget 75 at alpha 0.84; in situ: tiny llama,
groups 1, 2, 7 at budget 24, alpha 0.2 and 0.9, two KV heads for groups 1 and 2, one for group 7). At alpha 0.2
these budgets guarantee the window alone (``int(0.2 * 24) = 4``); at 0.9 and 0.84 the guarantee changes the kept
sets (asserted). kvbench revision 1 computed the guarantee in float32 (``int(0.84 * 75)`` = 62, kvpress's Python
63) and kept what kvpress keeps at a guarantee of 62 (alpha 0.83), not 63, from the prefill
(``test_safeguard_rounding``); revision 2 computes it as kvpress does. It differs from FFY0's in one named way,
measured: with alpha > 0 and two KV heads or more the kept sets differ (at the first compression in 12 of these
15 cases, by the third in the others; a head keeps a few entries more or fewer); at alpha 0, or with one KV
head, they are identical.

1. The safeguard: kvpress (and kvbench) guarantees each head its ``int(alpha * budget)`` best entries, window
   included, so with snapkv-d's window of 32 protected tokens a budget up to 164 guarantees no scored entry at
   alpha 0.2 (``int(0.2 * 164) = 32``); FFY0 guarantees ``int(alpha * (budget - window))`` scored entries on top
   of the window and shares the rest in proportion to each head's count in the joint selection
   (``round(count * (1 - alpha) + floor)``), so a layer keeps ``heads * budget`` entries only up to rounding.

Outside the allocation (the scorer's, see ``test_snapkv_d.py``): FFY0's scorer defaults are snapkv-d's LongBench
configuration (``-a kernel_size=7 -a pooling=max``), kvbench's are ``init_snapkv``'s (5, avg); kvbench shares
among KV heads scored by the group's mean, FFY0's ``--gqa_support`` layout (without it FFY0 shares among query
heads); FFY0's own cache, re-compressed during decoding, would pool over its score-ordered slots.
"""

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
from tests.reference.test_snapkv_d import PROMPT, pool, stacked, window_scores


def padded(scores, fill=-torch.inf):
    """Per-head 1-D tensors of different lengths -> [1, heads, longest], padded at the end."""
    out = torch.full((1, len(scores), max(len(s) for s in scores)), fill)
    for h, s in enumerate(scores):
        out[0, h, :len(s)] = s
    return out


def ffy0_keep(heads, scores, budget, window_size, floor_alpha):
    """``update_kv_gqa`` lines 439-489 on one layer: ``heads`` each head's positions (the window last),
    ``scores`` its prefix scores -> each head's kept positions (its best in score order, then the window)."""
    base = budget - window_size  # line 303
    floor = int(base * floor_alpha)  # line 305
    attn_score = padded(scores)
    length = attn_score.shape[-1]
    sorted_attn_score, sorted_attn_score_indices = attn_score.sort(dim=-1, descending=True)  # line 445
    flat = sorted_attn_score.reshape(1, length * len(heads))  # line 452
    sorted_indices = torch.topk(flat, k=len(heads) * base, dim=-1).indices // length  # lines 453-454
    capacity = torch.zeros((1, len(heads)), dtype=sorted_indices.dtype)
    capacity.scatter_add_(-1, sorted_indices, torch.ones_like(sorted_indices))  # lines 457-458
    capacity = torch.round(capacity * (1 - floor_alpha) + floor).int()  # line 460
    kept = []
    for h, positions in enumerate(heads):
        index = sorted_attn_score_indices[0, h, :capacity[0, h]]  # line 478
        index = index[index < len(scores[h])]  # (a shorter head's padding)
        kept.append(torch.cat([positions[:-window_size][index], positions[-window_size:]]))  # line 488
    return kept


def kvpress_keep(heads, scores, budget, window_size, alpha_safeguard):
    """``AdaKVPress.compress`` lines 59-76 on one layer, ``n_kept = budget``: the window padded with
    ``max + 1`` as kvpress's scorers pad it; each head's positions in token order."""
    top = max(float(s.max()) for s in scores if len(s)) + 1  # snapkv_press.py line 103
    scores = padded([torch.cat([s, torch.full((window_size,), top)]) for s in scores])
    bsz, num_key_value_heads, k_len = scores.shape
    n_kept = budget
    n_safe = int(n_kept * alpha_safeguard)  # line 65
    top_indices = torch.topk(scores, n_safe, dim=-1).indices  # line 66
    scores.scatter_(-1, top_indices, torch.finfo(scores.dtype).max)  # line 67
    n_pruned = num_key_value_heads * (k_len - n_kept)  # line 70 (padding included: pruned first)
    indices = torch.topk(-scores.reshape(bsz, -1), n_pruned, dim=1).indices.flatten()  # line 71
    pruned = torch.zeros(num_key_value_heads * k_len, dtype=torch.bool)
    pruned[indices] = True
    pruned = pruned.view(num_key_value_heads, k_len)
    return [positions[~pruned[h, :len(positions)]] for h, positions in enumerate(heads)]


def reference(forwards, budget, allocate, alpha, window_size=4, kernel_size=5, pooling="avgpool"):
    """kept[t][layer][head] of a cache compressed by ``allocate`` (``ffy0_keep`` or ``kvpress_keep``) whenever the
    sequence holds budget + 1, each head scored by snapkv-d over the positions it holds (token order)."""
    all_keys, all_queries = stacked(forwards)
    layers, kv_heads = all_keys.shape[:2]
    group = all_queries.shape[1] // kv_heads
    caches = [[torch.empty(0, dtype=torch.long)] * kv_heads for _ in range(layers)]
    kept = []
    for forward in forwards:
        newest = int(forward.positions[-1])
        for layer in range(layers):
            heads = [torch.cat([c, forward.positions]).sort().values for c in caches[layer]]
            if newest + 1 > budget:
                queries = all_queries[layer, :, newest - window_size + 1:newest + 1]
                scores = [pool(window_scores(all_keys[layer, h, positions][None], queries[None, h * group:
                                                                                          (h + 1) * group],
                                             window_size).mean(dim=1)[None], kernel_size, pooling)[0, 0]
                          for h, positions in enumerate(heads)]
                heads = allocate(heads, scores, budget, window_size, alpha)
            caches[layer] = heads
        kept.append([[set(c.tolist()) for c in heads] for heads in caches])
    return kept


def check(kept, forwards, budget, alpha, case):
    """kvpress's rule: identical. FFY0's: differs wherever the safeguards differ and there are heads to share
    between (alpha > 0, two KV heads or more), identical otherwise."""
    agreement = assert_identical(kept, reference(forwards, budget, kvpress_keep, alpha), forwards,
                                 "adakv:snapkv-d", f"{case} (kvpress AdaKVPress)")
    found = compare(kept, reference(forwards, budget, ffy0_keep, alpha), forwards)
    log("adakv:snapkv-d", f"{case} (FFY0 AdaKV)", found)
    assert (found.first_difference is not None) == (alpha > 0 and forwards[0].keys.shape[1] > 1), str(found)
    return agreement


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("budget", [16, 24])
def test_seeded(group, budget):
    forwards = synthetic_forwards(group, group=group, prompt=20, steps=50, kv_heads=4)
    kept = run_cache(make_press("adakv:snapkv-d", {"window_size": "4"}), budget, forwards)
    check(kept, forwards, budget, 0.2, f"seeded group {group} budget {budget}")


def binds(forwards, budget, alpha):
    """Whether kvpress's safeguard moves the kept sets here (else the case would not exercise it)."""
    return compare(reference(forwards, budget, kvpress_keep, alpha), reference(forwards, budget, kvpress_keep, 0.0),
                   forwards).first_difference is not None


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("alpha", ["0", "0.9"])
def test_seeded_alpha(group, alpha):
    """alpha 0: no safeguard, and FFY0's rule is kvpress's (the joint top entries, the window protected); alpha
    0.9: a safeguard of 14 entries of 16, window included, that changes the kept sets."""
    forwards = synthetic_forwards(group, group=group, prompt=20, steps=50, kv_heads=4)
    kept = run_cache(make_press("adakv:snapkv-d", {"window_size": "4", "alpha": alpha}), 16, forwards)
    check(kept, forwards, 16, float(alpha), f"seeded group {group} budget 16 alpha {alpha}")
    assert binds(forwards, 16, float(alpha)) == (alpha != "0")


@pytest.mark.parametrize("group", [1, 2])
def test_safeguard_rounding(group):
    """int(0.84 * 75) = 63 in double precision (kvpress's Python), 62 in float32 (kvbench revision 1)."""
    forwards = synthetic_forwards(group, group=group, prompt=85, steps=40, kv_heads=4)
    kept = run_cache(make_press("adakv:snapkv-d", {"window_size": "4", "alpha": "0.84"}), 75, forwards)
    check(kept, forwards, 75, 0.84, f"seeded group {group} budget 75 alpha 0.84")
    guarantee_62 = reference(forwards, 75, kvpress_keep, 0.83)  # int(0.83 * 75) = 62: what revision 1 guaranteed
    assert compare(kept, guarantee_62, forwards).first_difference is not None


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("alpha", ["0.2", "0.9"])
def test_in_situ(group, alpha):
    model, tokenizer = tiny_model(group)
    prompt = tokenizer(PROMPT)["input_ids"]
    press = make_press("adakv:snapkv-d", {"window_size": "4", "alpha": alpha})
    forwards, kept = trace_model(model, prompt, press, 24, max_new_tokens=60)
    check(kept, forwards, 24, float(alpha), f"tiny-llama group {group} budget 24 alpha {alpha}")
