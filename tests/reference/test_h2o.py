"""h2o against H2O's own cache.

Source: FMInference/H2O @ ac75c2a, ``h2o_hf/utils_real_drop/modify_llama.py``: ``H2OKVCache_LayerWise``
(lines 242-330: ``__call__`` 258-287, ``_update_hh_score`` 317-326), called by ``H2OLlamaAttention.forward``
(lines 476-509) after every forward (prefill and each decoding step) with that forward's softmaxed attention
``attn_weights`` [bsz, heads, q_len, kv_len], the forward's own keys already appended to the cache (478-481).

The rule, per layer and head: ``hh_score`` is the attention each cached token has received, summed over every
query that has seen it, the prompt's queries included (``attn_score_cache.sum(0).sum(1)``, the new tokens' own
columns starting from this forward's sum). When the cache holds more than ``hh_size + recent_size`` tokens it
keeps the last ``recent_size`` entries and the ``topk(hh_size)`` of ``hh_score`` among the others (per head),
in token order (a boolean mask over the cache, lines 271-285), and gathers ``hh_score`` the same way.

kvbench's ``h2o`` at ``--budget B`` with its defaults (``recent_ratio=0.5``, ``normalize=false``) is this cache
with ``recent_size = int(0.5 * B)`` and ``hh_size = B - recent_size``: identical kept sets with one KV head per
query head (group 1, H2O's MHA case). Named differences:

- GQA (group > 1): H2O's code is MHA only (its ``hh_score`` has one row per query head and the mask indexes the
  KV tensor with it, which fails for GQA). kvbench scores a KV head by the *mean over its group* of the query
  heads' accumulated attention (as kvpress does); the reference below generalises H2O the same way, and is
  identical to kvbench with that generalisation.
- ``normalize=true`` (age-normalised scores, the paper harness's intention) and ``recent_ratio`` other than H2O's
  equal split are kvbench options, not H2O's rule; the defaults are H2O's.
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
    """``H2OLlamaAttention.forward`` lines 484-507: repeat_kv, q·Kᵀ scaled, causal mask, fp32 softmax."""
    heads, n, _ = queries.shape
    s = keys.shape[1]
    keys = keys.repeat_interleave(heads // keys.shape[0], dim=0)  # repeat_kv (lines 206-215)
    logits = torch.matmul(queries, keys.transpose(1, 2)) * scaling
    causal = torch.ones(n, n, dtype=torch.bool).triu(1)  # _make_causal_mask: new token i sees cache + new[:i+1]
    mask = torch.cat([torch.zeros(n, s - n, dtype=torch.bool), causal], dim=1)
    logits = logits + torch.zeros(n, s).masked_fill(mask, torch.finfo(logits.dtype).min)
    return torch.softmax(logits, dim=-1, dtype=torch.float32)


def evict(keys, positions, hh_score, hh_size, recent_size):
    """``H2OKVCache_LayerWise.__call__`` lines 264-287 for one layer, per KV head (group mean for GQA)."""
    kv_heads, seq_len = positions.shape
    if seq_len <= hh_size + recent_size:
        return keys, positions, hh_score
    group = hh_score.shape[0] // kv_heads
    score = hh_score.view(kv_heads, group, seq_len).mean(dim=1)  # group 1: H2O's own per-head score
    _, keep_topk = torch.topk(score[:, :seq_len - recent_size], hh_size, dim=-1)
    keep_topk = keep_topk.sort().values
    keep_recent = torch.arange(seq_len - recent_size, seq_len).repeat(kv_heads, 1)
    mask = torch.zeros(kv_heads, seq_len, dtype=torch.bool).scatter(-1, torch.cat([keep_topk, keep_recent], -1), 1)
    size = hh_size + recent_size
    return (keys[mask].view(kv_heads, size, -1), positions[mask].view(kv_heads, size),
            hh_score[mask.repeat_interleave(group, dim=0)].view(-1, size))


def reference(forwards, budget, recent_ratio=0.5, prompt_queries=True):
    """H2O's layer-wise cache over ``forwards``: ``recent_size = int(recent_ratio * budget)``, the rest heavy
    hitters. ``prompt_queries=False`` (not H2O: a check that the prompt's queries matter) scores the prefill by its
    last query alone."""
    recent_size = int(recent_ratio * budget)
    hh_size = budget - recent_size
    first = forwards[0]
    kv_heads, d = first.keys.shape[1], first.keys.shape[-1]
    caches = [(torch.empty(kv_heads, 0, d), torch.empty(kv_heads, 0, dtype=torch.long), None)
              for _ in range(first.layers)]
    kept = []
    for forward in forwards:
        n = forward.positions.numel()
        for i, (keys, positions, hh_score) in enumerate(caches):
            keys = torch.cat([keys, forward.keys[i]], dim=1)  # lines 476-479
            positions = torch.cat([positions, forward.positions.expand(kv_heads, n)], dim=1)
            attn = attention(forward.queries[i], keys, forward.scaling)
            attn = attn if prompt_queries or hh_score is not None else attn[:, -1:]
            new = attn.sum(1)  # _update_hh_score: sum over batch and queries (line 322 / 324)
            if hh_score is not None:
                new[:, :-n] += hh_score  # lines 324-326
            caches[i] = evict(keys, positions, new, hh_size, recent_size)
        kept.append([[set(row.tolist()) for row in positions] for _, positions, _ in caches])
    return kept


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("budget", [8, 30])
def test_seeded(group, budget):
    forwards = synthetic_forwards(group, group=group)
    assert_identical(run_cache(make_press("h2o"), budget, forwards), reference(forwards, budget),
                     forwards, "h2o", f"seeded group {group} budget {budget}")


@pytest.mark.parametrize("group", GROUPS)
def test_in_situ(group):
    model, tokenizer = tiny_model(group)
    prompt = tokenizer("Tom has 12 apples. He buys 7 more. How many?")["input_ids"]
    forwards, kept = trace_model(model, prompt, make_press("h2o"), 24, max_new_tokens=60)
    assert_identical(kept, reference(forwards, 24), forwards, "h2o", f"tiny-llama group {group}")


@pytest.mark.parametrize("group", GROUPS)
def test_prompt_queries_count(group):
    """The accumulated score includes every prompt query's attention, as H2O's does: kvbench is identical to the
    reference and differs from one that scores the prefill by its last query alone."""
    forwards = synthetic_forwards(3, group=group, prompt=40, steps=20)
    kvbench = run_cache(make_press("h2o"), 16, forwards)
    assert_identical(kvbench, reference(forwards, 16), forwards, "h2o", f"seeded prompt 40 group {group}")
    assert compare(kvbench, reference(forwards, 16, prompt_queries=False), forwards).first_difference is not None
