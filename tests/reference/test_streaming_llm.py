"""streaming_llm against StreamingLLM's own cache.

Source: mit-han-lab/streaming-llm @ 2e50426, ``streaming_llm/kv_cache.py`` lines 23-64 (``StartRecentKVCache``:
``start_size=4``; ``__call__`` keeps ``k[:, :, :start_size]`` and ``k[:, :, seq_len - recent_size:]`` once
``seq_len > start_size + recent_size``), called after every forward in ``examples/eval_long_ppl.py``. The cache
is one tensor per layer in token order; every head keeps the same tokens.

kvbench's ``streaming_llm`` at ``--budget B`` is this cache with ``start_size + recent_size = B``: identical kept
sets. Named difference, outside the kept sets: StreamingLLM re-rotates cached keys to their cache positions
(``pos_shift/modify_llama.py``); kvbench keeps each key at its original position.
"""

import pytest
import torch

from kvbench.presses import make_press
from tests.reference.harness import GROUPS, assert_identical, run_cache, synthetic_forwards, tiny_model, trace_model


def reference(forwards, budget, start_size=4):
    """``StartRecentKVCache.__call__`` after every forward, on each layer's cache of positions."""
    recent_size = budget - start_size
    heads = forwards[0].keys.shape[1]
    caches = [torch.empty(0, dtype=torch.long) for _ in range(forwards[0].layers)]
    kept = []
    for forward in forwards:
        for i, cache in enumerate(caches):
            cache = torch.cat([cache, forward.positions])  # DynamicCache appends the forward's tokens
            seq_len = cache.shape[0]
            if seq_len > start_size + recent_size:
                cache = torch.cat([cache[:start_size], cache[seq_len - recent_size:seq_len]])
            caches[i] = cache
        kept.append([[set(cache.tolist()) for _ in range(heads)] for cache in caches])
    return kept


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("budget", [8, 30])
def test_seeded(group, budget):
    forwards = synthetic_forwards(group, group=group)
    assert_identical(run_cache(make_press("streaming_llm"), budget, forwards), reference(forwards, budget),
                     forwards, "streaming_llm", f"seeded group {group} budget {budget}")


@pytest.mark.parametrize("group", GROUPS)
def test_in_situ(group):
    model, tokenizer = tiny_model(group)
    prompt = tokenizer("Tom has 12 apples. He buys 7 more. How many?")["input_ids"]
    forwards, kept = trace_model(model, prompt, make_press("streaming_llm"), 24, max_new_tokens=60)
    assert_identical(kept, reference(forwards, 24), forwards, "streaming_llm", f"tiny-llama group {group}")
