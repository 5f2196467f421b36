"""hott-h2o-fixed against the paper's harness (the HOTT kvpress fork) with its H2O state made per layer.

Source: minghui-liu/kvpress @ 43d9e37, ``kvpress/presses/h2o_press.py`` lines 17-140 (``H2OPress``: score
``acc_attn / n_tokens_in_sum``, the eager attention summed over queries and averaged over each KV head's query
heads, no sinks, no recent window, ``topk(cache_budget)`` at prefill when the prompt exceeds the budget and on
every decoding step once a layer holds ``cache_budget + 1``), with ``base_press.py`` lines 188-281
(``forward_hook``) and ``scorer_press.py`` lines 47-102 (``topk`` then ``gather``: the cache's slot order is
``topk``'s order). The fork keeps ``acc_attn`` and ``n_tokens_in_sum`` as one attribute shared by every layer,
in the attention dtype (see ``test_hott_h2o``); what it meant is one accumulator per layer, and a later version
of the file (@12200d6, ``acc_attn_by_layer``) does that.

The reference is the fork's code (``ForkH2O`` of ``test_hott_h2o``) with one accumulator per layer, aligned with
that layer's slots, in float32. kvbench's ``hott-h2o-fixed`` keeps the same rule: identical kept sets. Named
differences: kvbench orders ties in its own way where the fork's ``topk`` order would decide (exact ties of
accumulated attention over distinct keys did not arise here); kvbench's attention probabilities come from its
own kernels (float noise).
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
from tests.reference.test_hott_h2o import ForkH2O
from tests.reference.test_hott_h2o import reference as shared_reference
from tests.reference.test_hott_streaming_llm import fork_run


def reference(forwards, budget):
    """The fork's H2O with ``acc_attn``/``n_tokens_in_sum`` per layer, in float32."""
    return fork_run(forwards, ForkH2O(budget, shared=False, state_dtype=torch.float32))


NAME = "hott-h2o-fixed"


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("budget", [8, 30, 40])
def test_seeded(group, budget):
    forwards = synthetic_forwards(group, group=group, prompt=36, steps=60, layers=3)
    assert_identical(run_cache(make_press(NAME), budget, forwards), reference(forwards, budget), forwards, NAME,
                     f"seeded group {group} budget {budget}")


@pytest.mark.parametrize("group", GROUPS)
def test_in_situ(group):
    model, tokenizer = tiny_model(group)
    prompt = tokenizer("Tom has 12 apples. He buys 7 more. How many?")["input_ids"]
    forwards, kept = trace_model(model, prompt, make_press(NAME), 24, max_new_tokens=60)
    assert_identical(kept, reference(forwards, 24), forwards, NAME, f"tiny-llama group {group}")


def test_differs_from_the_forks_shared_state():
    """The fix is visible: the fork's shared state keeps other tokens on the same inputs."""
    forwards = synthetic_forwards(0, group=2, prompt=36, steps=60, layers=3)
    agreement = compare(run_cache(make_press(NAME), 30, forwards), shared_reference(forwards, 30), forwards)
    assert agreement.first_difference is not None, str(agreement)
