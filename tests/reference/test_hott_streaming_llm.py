"""hott-streaming_llm against the paper's harness (the HOTT kvpress fork) as its code runs.

Source: minghui-liu/kvpress @ 43d9e37 (the harness of "Hold Onto That Thought", arXiv 2512.12008):
- ``kvpress/presses/base_press.py`` lines 188-281 (``BasePress.forward_hook``): after each attention layer's
  forward, ``is_prefilling = cache_position[-1] <= q_len`` (:215) picks ``compress_prefilling`` or
  ``compress_decoding`` (:232-235), whose keys and values replace the layer's cache (:278-279);
- ``kvpress/presses/scorer_press.py`` lines 47-102 (``ScorerPress``): prefill compresses when ``cache_budget <
  q_len`` (:57-62), decoding when ``cache_budget < kv_len`` (:86-91), both keep ``scores.topk(cache_budget)``
  and ``gather`` keys and values with those indices (:67-73, :96-101), so the cache's physical order after a
  compression is ``topk``'s output order; HF's ``DynamicCache`` appends each forward's tokens at the end;
- ``kvpress/presses/streaming_llm_press.py`` lines 29-53 (``StreamingLLMPress.score``, ``n_sink=4``): at prefill
  ones with zeros at ``[n_sink, n_sink + q_len - budget)``; in decoding zeros with ones at the first ``n_sink``
  and last ``budget - n_sink`` cache *indices* (slots), not positions;
- ``reason/evaluate.py`` lines 101-109, 296-305: ``StreamingLLMPress()`` with ``press.cache_budget =
  cache_budget``; the scores are ``ones_like``/``zeros_like`` the keys, so in the model's dtype.

``fork_run`` below simulates that cache per layer (physical order, the new tokens appended, ``topk`` then
``gather``) and is shared with the other hott references (``test_hott_h2o``, ``test_hott_h2o_fixed``,
``test_hott_knorm``). The tie order is ``torch.topk``'s on this machine (CPU), on scores laid out in the fork's
slot order and dtype: all kept scores tie (all ones), so which slots are "the first n_sink" after a compression
is what ``topk`` returned first.

kvbench's ``hott-streaming_llm`` simulates the fork's slot order the same way: identical kept sets, with float32
and bfloat16 scores (and, checked by hand, in situ on the embedded SmolLM2-135M at budgets 16 and 32). Named
difference: the fork ran CUDA's ``topk``, whose tie order this CPU reference cannot show (kvbench runs the same
call on its own device, so on a GPU it follows CUDA's order). Neither re-rotates cached keys.
"""

from __future__ import annotations

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


class ForkScorerPress:
    """``ScorerPress`` (scorer_press.py:16-102) over one layer's cache ``keys`` [1, kv_heads, n, d] in the fork's
    slot order: each compress returns the ``topk`` indices to gather (None: the cache is left as it is)."""

    needs_attentions = False

    def __init__(self, cache_budget: int):
        self.cache_budget = cache_budget

    def score(self, layer, keys, attentions, is_prefill, q_len):
        raise NotImplementedError

    def compress_prefilling(self, layer, keys, attentions, q_len):
        if self.cache_budget <= 0 or self.cache_budget >= q_len:  # :57-62
            return None
        scores = self.score(layer, keys, attentions, True, q_len)  # :65
        return scores.topk(self.cache_budget, dim=-1).indices  # :67

    def compress_decoding(self, layer, keys, attentions, q_len):
        if self.cache_budget == 0 or self.cache_budget >= keys.shape[2]:  # :86-91
            return None
        scores = self.score(layer, keys, attentions, False, q_len)  # :94
        return scores.topk(self.cache_budget, dim=-1).indices  # :96


class ForkStreamingLLM(ForkScorerPress):
    """``StreamingLLMPress.score`` (streaming_llm_press.py:29-53): rules by slot index."""

    def __init__(self, cache_budget: int, n_sink: int = 4):
        super().__init__(cache_budget)
        self.n_sink = n_sink

    def score(self, layer, keys, attentions, is_prefill, q_len):
        if is_prefill:  # :40-45
            n_pruned = q_len - self.cache_budget
            scores = torch.ones_like(keys[..., 0])
            scores[:, :, self.n_sink:self.n_sink + n_pruned] = 0
        else:  # :46-51
            n_local = self.cache_budget - self.n_sink
            scores = torch.zeros_like(keys[..., 0])
            scores[:, :, :self.n_sink] = 1
            scores[:, :, -n_local:] = 1
        return scores


def eager_attentions(queries, keys, positions, scaling, dtype):
    """``output[1]`` of transformers 4.51's ``eager_attention_forward`` (what the fork's H2O reads): ``repeat_kv``,
    ``q @ k^T * scaling``, the causal mask (slot ``j`` hidden from the query at ``cache_position`` p when j > p),
    softmax in float32 cast to the model's dtype (``dtype``). queries [q_heads, n, d], keys [1, kv_heads, kv, d]."""
    heads, kv, dim = keys.shape[1], keys.shape[2], keys.shape[3]
    group = queries.shape[0] // heads
    key_states = keys[:, :, None].expand(1, heads, group, kv, dim).reshape(1, heads * group, kv, dim)
    logits = torch.matmul(queries[None].to(keys.dtype), key_states.transpose(2, 3)) * scaling
    masked = torch.arange(kv)[None, :] > positions[:, None]
    logits = logits.masked_fill(masked, torch.finfo(logits.dtype).min)
    return torch.softmax(logits, dim=-1, dtype=torch.float32).to(dtype)  # [1, q_heads, n, kv]


def fork_run(forwards, press: ForkScorerPress, attention_dtype=None):
    """The fork's cache over ``forwards``: every forward, layers 0..L-1 in order, each appends its new tokens
    (``DynamicCache.update``), attends, then ``forward_hook`` compresses it (base_press.py:211-235) and the
    gathered keys replace the cache (:278). Returns kept[t][layer][head]."""
    n_layers = forwards[0].layers
    keys: list[torch.Tensor | None] = [None] * n_layers  # [1, kv_heads, n, d], the fork's slot order
    slots: list[torch.Tensor | None] = [None] * n_layers  # [1, kv_heads, n]: the position in each slot
    kept = []
    for forward in forwards:
        n, heads = forward.positions.numel(), forward.keys.shape[1]
        for layer in range(n_layers):
            new_keys, new_slots = forward.keys[layer][None], forward.positions.expand(1, heads, n)
            keys[layer] = new_keys if keys[layer] is None else torch.cat([keys[layer], new_keys], dim=2)
            slots[layer] = new_slots if slots[layer] is None else torch.cat([slots[layer], new_slots], dim=2)
            attentions = None
            if press.needs_attentions:
                attentions = eager_attentions(forward.queries[layer], keys[layer], forward.positions,
                                              forward.scaling, attention_dtype or keys[layer].dtype)
            is_prefilling = bool(forward.positions[-1] <= n)  # base_press.py:215
            compress = press.compress_prefilling if is_prefilling else press.compress_decoding
            indices = compress(layer, keys[layer], attentions, n)
            if indices is not None:  # scorer_press.py:68-72 / :97-101
                keys[layer] = keys[layer].gather(2, indices[..., None].expand(-1, -1, -1, keys[layer].shape[-1]))
                slots[layer] = slots[layer].gather(2, indices)
        kept.append([[set(row.tolist()) for row in s[0]] for s in slots])
    return kept


def as_dtype(forwards, dtype):
    """The same forwards with keys, values and queries in ``dtype`` (the paper's models run in bfloat16)."""
    return [type(f)(f.positions, f.keys.to(dtype), f.values.to(dtype), f.queries.to(dtype), f.scaling)
            for f in forwards]


def reference(forwards, budget, n_sink=4):
    return fork_run(forwards, ForkStreamingLLM(budget, n_sink))


NAME = "hott-streaming_llm"


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("budget", [8, 30, 40])
def test_seeded(group, budget):
    forwards = synthetic_forwards(group, group=group, prompt=36, steps=60)
    assert_identical(run_cache(make_press(NAME), budget, forwards), reference(forwards, budget), forwards, NAME,
                     f"seeded group {group} budget {budget}")


@pytest.mark.parametrize("budget", [8, 30, 40])
def test_seeded_bfloat16(budget):
    """The paper's models are bfloat16: the fork's scores are then bfloat16 ``ones``/``zeros``."""
    forwards = as_dtype(synthetic_forwards(3, group=2, prompt=36, steps=60), torch.bfloat16)
    assert_identical(run_cache(make_press(NAME), budget, forwards), reference(forwards, budget), forwards, NAME,
                     f"seeded bfloat16 budget {budget}")


@pytest.mark.parametrize("group", GROUPS)
def test_in_situ(group):
    model, tokenizer = tiny_model(group)
    prompt = tokenizer("Tom has 12 apples. He buys 7 more. How many?")["input_ids"]
    forwards, kept = trace_model(model, prompt, make_press(NAME), 24, max_new_tokens=60)
    assert_identical(kept, reference(forwards, 24), forwards, NAME, f"tiny-llama group {group}")


def test_differs_from_streaming_llm_by_position():
    """The fork's rule is not StreamingLLM by position once ``topk`` has reordered the slots (on this CPU): the
    reference must tell the two apart, or the tests above could not fail."""
    forwards = synthetic_forwards(0, group=2, prompt=36, steps=60)
    agreement = compare(run_cache(make_press("streaming_llm"), 30, forwards), reference(forwards, 30), forwards)
    assert agreement.first_difference is not None, str(agreement)
