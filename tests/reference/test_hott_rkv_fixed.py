"""hott-rkv-fixed against the paper's harness's R-KV with its defects fixed.

Source: minghui-liu/kvpress @ 43d9e37, ``kvpress/presses/rkv_press.py`` lines 17-237 (``RKVPress``: ``cache_budget``,
``compress_interval=64``, ``window_size=8``, ``kernel_size=5``, ``lam = 0.1``), through ``scorer_press.py`` lines
47-73 (the prefill) and ``base_press.py`` lines 188-281, as built by ``reason/evaluate.py`` (see ``test_hott_rkv``).

The fork's rule, transcribed as in ``test_hott_rkv``: importance = the window's queries' softmax (float32) over the
keys each sees, the columns before the last 8 cache indices, the mean over the window, the max over the GQA group,
``max_pool1d(kernel 5, padding 2)`` along the cache's physical order; redundancy = the softmax of each non-window
key's mean cosine similarity to the non-window keys (its own zeroed); the last 8 cache indices padded with the
layer's maximum; ``topk(cache_budget)`` gathered in topk's order. "Fixed" means:
1. the sign: ``0.1 * importance - 0.9 * redundancy`` (R-KV's rule; the fork adds, keeping the most redundant keys);
2. the window's queries: the 8 newest tokens' own queries at their own positions, each seeing the cache's keys up to
   its own position: the fork's causal mask with ``q_len`` = the cache's length, as the fork's prefill builds it
   (its decoding path rebuilt the queries from a 5120-wide hidden-state buffer shared by all layers, all at the
   current position, and its mask with ``q_len = 8`` let window row ``i`` see cache indices ``0..i`` only);
3. the schedule: ``compress_interval = 64`` is, by its comment, "the buffer size": every layer compresses back to the
   budget when it holds ``budget + 64`` entries (the step's new token included), i.e. every 64 decoding steps once
   full, every layer on the same step. The fork's counter is one attribute for all layers, advanced and reset by
   layer 0 alone: layers 1.. compress first at ``budget + 64`` and then at ``budget + 65``, layer 0 always one step
   later at ``budget + 65`` (``test_hott_rkv``). A prompt longer than the budget is still cut to the budget at the
   prefill (``compress_prefilling``, not a defect: R-KV's own code compresses the prompt too).
Kept as the fork has them: the pooling along the cache's order (R-KV's code pools its ``topk``-ordered cache too),
the window padded with the maximum (it never drops a window token when ``budget + 64`` entries are cut to the
budget), ``topk``'s order for ties, softmax and redundancy over the non-window keys as the fork computes them.
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
from tests.reference.test_hott_rkv import INTERVAL, decoding_score, prefill_score
from tests.reference.test_hott_snapkv_d import append, bf16, compress, fork_cache_step, is_prefill


def reference(forwards, budget, interval=INTERVAL, sign=-1.0):
    """kept[t][layer][head]: the fork's caches under the fixed rule and schedule (``sign=+1``: the fork's sign)."""
    layers = forwards[0].layers
    history = [torch.cat([f.queries[i] for f in forwards], dim=1) for i in range(layers)]
    assert torch.equal(torch.cat([f.positions for f in forwards]), torch.arange(history[0].shape[1]))
    caches, kept = [None] * layers, []
    for forward in forwards:
        for layer in range(layers):
            if is_prefill(forward):  # scorer_press.py:47-73, the prompt cut to the budget if longer
                score = lambda keys, positions, prefill, f=forward, i=layer: prefill_score(f, i, keys, sign)  # noqa: E731
                caches[layer] = fork_cache_step(None, forward, layer, budget, score)
                continue
            keys, positions = caches[layer] = append(caches[layer], forward, layer)
            if keys.shape[2] >= budget + interval:  # fix 3: every layer, holding budget + 64
                scores = decoding_score(history, forward, layer, keys, positions, q_len=keys.shape[2],
                                        sign=sign)  # fixes 1 and 2
                caches[layer] = compress(keys, positions, budget, scores)
        kept.append([[set(c[1][0, h].tolist()) for h in range(c[1].shape[1])] for c in caches])
    return kept


PRESS = "hott-rkv-fixed"


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize(("budget", "prompt"), [(16, 24), (40, 24)])
def test_seeded(group, budget, prompt):
    forwards = synthetic_forwards(group, group=group, prompt=prompt, steps=160, layers=3)
    assert_identical(run_cache(make_press(PRESS), budget, forwards), reference(forwards, budget), forwards, PRESS,
                     f"seeded group {group} budget {budget} prompt {prompt}", min_compressions=2)


@pytest.mark.parametrize("group", GROUPS)
def test_seeded_copies(group):
    """Repeated keys: exact cosine ties in the redundancy."""
    forwards = synthetic_forwards(group + 20, group=group, prompt=24, steps=140, layers=2, copies=0.4)
    assert_identical(run_cache(make_press(PRESS), 16, forwards), reference(forwards, 16), forwards, PRESS,
                     f"seeded copies group {group} budget 16", min_compressions=2)


@pytest.mark.parametrize("group", GROUPS)
def test_seeded_bf16(group):
    """bfloat16, the paper's models' dtype: every op of the fork's score rounds, so near ties fall by its rounding."""
    forwards = bf16(synthetic_forwards(group, group=group, prompt=24, steps=160, layers=3))
    assert_identical(run_cache(make_press(PRESS), 16, forwards), reference(forwards, 16), forwards, PRESS,
                     f"seeded bf16 group {group} budget 16", min_compressions=2)


@pytest.mark.parametrize("group", GROUPS)
def test_in_situ(group):
    model, tokenizer = tiny_model(group)
    prompt = tokenizer("Tom has 12 apples. He buys 7 more. How many?")["input_ids"]
    forwards, kept = trace_model(model, prompt, make_press(PRESS), 16, max_new_tokens=150)
    assert_identical(kept, reference(forwards, 16), forwards, PRESS, f"tiny-llama group {group} budget 16",
                     min_compressions=2)


def test_the_fixes_change_what_is_kept():
    """The sign is not a no-op on these inputs: the fork's sign keeps other tokens (so the comparison can fail)."""
    forwards = synthetic_forwards(5, group=2, prompt=24, steps=140, layers=2)
    assert compare(reference(forwards, 16), reference(forwards, 16, sign=1.0), forwards).first_difference
