"""full against the full cache: every token seen stays.

Source: no eviction (transformers' ``DynamicCache``: every forward's keys and values are appended, none removed).
kvbench's ``full`` preallocates the whole sequence and never evicts, whatever the budget.
"""

import pytest

from kvbench.presses import make_press
from tests.reference.harness import GROUPS, assert_identical, run_cache, synthetic_forwards, tiny_model, trace_model


def reference(forwards):
    """Every position every forward brought, in every layer and head."""
    seen: set[int] = set()
    kept = []
    for forward in forwards:
        seen |= set(forward.positions.tolist())
        kept.append([[set(seen) for _ in range(forward.keys.shape[1])] for _ in range(forward.layers)])
    return kept


@pytest.mark.parametrize("group", GROUPS)
def test_seeded(group):
    forwards = synthetic_forwards(group, group=group)
    assert_identical(run_cache(make_press("full"), 8, forwards), reference(forwards), forwards, "full",
                     f"seeded group {group}", min_compressions=0)


@pytest.mark.parametrize("group", GROUPS)
def test_in_situ(group):
    model, tokenizer = tiny_model(group)
    prompt = tokenizer("Tom has 12 apples. He buys 7 more. How many?")["input_ids"]
    forwards, kept = trace_model(model, prompt, make_press("full"), 8, max_new_tokens=40)
    assert_identical(kept, reference(forwards), forwards, "full", f"tiny-llama group {group}", min_compressions=0)


def test_an_eviction_would_show():
    forwards = synthetic_forwards(0)
    kept = run_cache(make_press("streaming_llm"), 8, forwards)
    with pytest.raises(AssertionError, match="first difference"):
        assert_identical(kept, reference(forwards), forwards)
