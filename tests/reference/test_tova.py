"""tova against TOVA's own cache.

Source: schwartz-lab-NLP/TOVA @ 9c7d09b, ``src/tova_cache.py`` lines 31-51 (``TOVACache.reduce``), called by
``src/convert_models/llama_custom.py`` lines 112-113 (``tova_llama_attention_forward``) after every forward's
attention, prefill included, with that forward's softmaxed attention [bsz, heads, q_len, num_keys] (fp32 softmax,
line 91) over the cache with the forward's own keys already appended (``DynamicCache.update``, line 70).

The rule, per layer: if ``num_keys > cache_size``, average the *last* query's attention over *all* query heads
(``torch.mean(attn_weights[:, :, -1, :], dim=1)``, line 44), keep ``topk(cache_size)`` of it, sorted back into
cache order (lines 45-46), and gather the same tokens for every KV head (lines 47-51). In the prefill the last
query is the last prompt token's.

kvbench's ``tova`` at ``--budget B`` with its defaults (``per_head=false``) is this cache with
``cache_size = B``: identical kept sets for every GQA group (TOVA's mean over all query heads is defined for GQA
as for MHA), as long as no two scores tie. Named difference: tie order. Among entries with exactly equal scores
(a key repeated exactly, ``copies``, draws exactly the same attention) kvbench keeps the newest, TOVA whichever
``torch.topk`` returns first (on CPU, here: the older); both then hold the same keys, only at other positions
(``test_exact_ties``). (kvpress's ``TOVAPress`` also protects the newest token; TOVA does not, nor does kvbench.)
``per_head=true`` is a kvbench option, not TOVA's rule.
"""

import pytest
import torch

from kvbench.presses import make_press
from tests.reference.harness import (
    GROUPS,
    assert_identical,
    compare,
    run_cache,
    synthetic_forwards,
    tiny_model,
    trace_model,
)


def attention(queries, keys, scaling):
    """``tova_llama_attention_forward`` lines 72-91: repeat_kv, q·Kᵀ scaled, causal mask, fp32 softmax."""
    heads, n, _ = queries.shape
    s = keys.shape[1]
    keys = keys.repeat_interleave(heads // keys.shape[0], dim=0)  # repeat_kv
    logits = torch.matmul(queries, keys.transpose(1, 2)) * scaling
    causal = torch.ones(n, n, dtype=torch.bool).triu(1)  # new token i sees the cache and new tokens up to i
    mask = torch.cat([torch.zeros(n, s - n, dtype=torch.bool), causal], dim=1)
    logits = logits + torch.zeros(n, s).masked_fill(mask, torch.finfo(logits.dtype).min)
    return torch.softmax(logits, dim=-1, dtype=torch.float32)


def reference(forwards, budget, query=-1):
    """``TOVACache.reduce`` with ``cache_size = budget`` after every forward, each layer's cache in cache order.
    ``query`` is the query row scored (TOVA: -1, the last; another value only to show the check can fail)."""
    first = forwards[0]
    kv_heads, d = first.keys.shape[1], first.keys.shape[-1]
    caches = [(torch.empty(kv_heads, 0, d), torch.empty(0, dtype=torch.long)) for _ in range(first.layers)]
    kept = []
    for forward in forwards:
        for i, (keys, positions) in enumerate(caches):
            keys = torch.cat([keys, forward.keys[i]], dim=1)  # DynamicCache.update appends
            positions = torch.cat([positions, forward.positions])
            if keys.shape[1] > budget:  # line 41: num_keys <= cache_size returns
                attn_weights = attention(forward.queries[i], keys, forward.scaling)
                row = max(query, -attn_weights.shape[1])
                mean_attn_weights = torch.mean(attn_weights[:, row, :], dim=0)  # line 44: mean over all heads
                _, ind = torch.topk(mean_attn_weights, k=budget, dim=-1)  # line 45
                ind = torch.sort(ind).values  # line 46
                keys, positions = keys[:, ind], positions[ind]  # lines 47-51: the same tokens for every head
            caches[i] = (keys, positions)
        kept.append([[set(positions.tolist()) for _ in range(kv_heads)] for _, positions in caches])
    return kept


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("budget", [8, 30])
def test_seeded(group, budget):
    forwards = synthetic_forwards(group, group=group)
    assert_identical(run_cache(make_press("tova"), budget, forwards), reference(forwards, budget),
                     forwards, "tova", f"seeded group {group} budget {budget}")


@pytest.mark.parametrize("group", GROUPS)
def test_in_situ(group):
    model, tokenizer = tiny_model(group)
    prompt = tokenizer("Tom has 12 apples. He buys 7 more. How many?")["input_ids"]
    forwards, kept = trace_model(model, prompt, make_press("tova"), 24, max_new_tokens=60)
    assert_identical(kept, reference(forwards, 24), forwards, "tova", f"tiny-llama group {group}")


def test_prefill_scores_last_prompt_query():
    """A prompt longer than the budget is cut by the last prompt query's attention: a reference scoring the
    prefill by another query differs from kvbench at the first forward."""
    forwards = synthetic_forwards(5, group=2, prompt=40, steps=4)
    kvbench = run_cache(make_press("tova"), 16, forwards)
    assert_identical(kvbench, reference(forwards, 16), forwards, "tova", "seeded prompt 40 group 2")
    assert compare(kvbench, reference(forwards, 16, query=-2), forwards).forwards == 1


@pytest.mark.parametrize("group", GROUPS)
def test_exact_ties(group):
    """Repeated keys (``copies``) draw exactly the same attention, so their scores tie: both hold the same keys at
    every forward, but where TOVA's ``topk`` (on CPU, in cache order) keeps an older copy kvbench keeps the newest."""
    forwards = synthetic_forwards(group + 17, group=group, copies=0.4)
    kvbench, theirs = run_cache(make_press("tova"), 8, forwards), reference(forwards, 8)
    assert compare(kvbench, theirs, forwards).first_difference is not None
    keys = torch.cat([f.keys for f in forwards], dim=2).transpose(1, 2).flatten(2)  # [layers, positions, heads * d]
    tables = [[tuple(row) for row in layer.tolist()] for layer in keys]
    differing = 0
    for mine_t, theirs_t in zip(kvbench, theirs, strict=True):
        for key, mine_l, theirs_l in zip(tables, mine_t, theirs_t, strict=True):
            a, b = mine_l[0], theirs_l[0]
            assert sorted(key[p] for p in a) == sorted(key[p] for p in b)
            for p in a - b:
                differing += 1
                assert any(key[q] == key[p] and q < p for q in b - a)
    assert differing > 0
