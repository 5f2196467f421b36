"""random against its own stated rule: a splitmix64 hash per (sequence seed and layer, step, KV head, position).

Source: none in the literature (a floor every policy should beat). The rule is kvbench's, stated in
``kvbench/presses/random.py``'s comment and the README: each slot's draw is a function of the row's seed
(``seed * 1_000_003 + layer``, ``BudgetCache.row_seeds``), the decoding step, the KV head and the token's
position, so that a sequence evicts alike in any batch. The hash is splitmix64's finaliser (S. Vigna,
https://prng.di.unimi.it/splitmix64.c, ``next()`` after the increment), computed here on Python's unbounded
integers reduced modulo 2^64, independently of the press's signed-int64 tensor arithmetic; the top 53 bits make
a double in [0, 1). The lowest draws are evicted.
"""

import pytest

from kvbench.presses import make_press
from tests.reference.harness import GROUPS, assert_identical, run_cache, synthetic_forwards, tiny_model, trace_model

MASK = (1 << 64) - 1


def splitmix64(z: int) -> int:
    """splitmix64.c's finaliser (its ``next()`` after ``x += 0x9e3779b97f4a7c15``)."""
    z &= MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def draw(row_seed: int, step: int, head: int, position: int) -> float:
    x = splitmix64(splitmix64(row_seed * 1_000_003 + step) ^ head)
    return (splitmix64(x ^ position) >> 11) / 2.0**53


def reference(forwards, budget, seed=0):
    """Every layer and head: take in the forward's tokens; holding more than the budget, keep the ``budget``
    highest draws (ties, which a 53-bit draw makes vanishingly rare, to the newest)."""
    heads = forwards[0].keys.shape[1]
    caches = [[[] for _ in range(heads)] for _ in range(forwards[0].layers)]
    kept = []
    for step, forward in enumerate(forwards):
        for layer, layer_caches in enumerate(caches):
            for head, cache in enumerate(layer_caches):
                cache.extend(forward.positions.tolist())
                if len(cache) > budget:
                    ranked = sorted(cache, key=lambda p: (draw(seed * 1_000_003 + layer, step, head, p), p))
                    cache[:] = sorted(ranked[-budget:])
        kept.append([[set(cache) for cache in layer_caches] for layer_caches in caches])
    return kept


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("budget", [8, 30])
def test_seeded(group, budget):
    forwards = synthetic_forwards(group, group=group)
    assert_identical(run_cache(make_press("random"), budget, forwards, seed=3), reference(forwards, budget, seed=3),
                     forwards, "random", f"seeded group {group} budget {budget}")


@pytest.mark.parametrize("group", GROUPS)
def test_in_situ(group):
    model, tokenizer = tiny_model(group)
    prompt = tokenizer("Tom has 12 apples. He buys 7 more. How many?")["input_ids"]
    forwards, kept = trace_model(model, prompt, make_press("random"), 24, max_new_tokens=60)
    assert_identical(kept, reference(forwards, 24), forwards, "random", f"tiny-llama group {group}")
