"""pyramidkv:P against PyramidKV's per-layer budget allocation.

Source: Zefan-Cai/KVCache-Factory @ c97f9d7, ``pyramidkv/pyramidkv_utils.py`` lines 323-470
(``PyramidKVCluster.update_kv``, and ``_update_kv_kv_head`` for unrepeated GQA tensors, the same schedule): with
``C = max_capacity_prompt``, ``w = window_size``, ``L = num_hidden_layers``, ``beta = 20`` (line 324) and the
cache's length ``q_len``: ``min_num = (C - w) // beta``, ``max_num = 2 (C - w) - min_num``, clamped to
``q_len - w`` (``min_num`` then ``2 (C - w) - max_num``) when the cache is short (360-366); ``steps = (max_num -
min_num) // (L - 1)`` and layer ``l`` keeps ``max_num - l * steps`` scored entries (369-370) plus the window; but
only when ``q_len >= 2 (C - w)``: a cache of ``C <= q_len < 2 (C - w)`` entries keeps ``C - w`` + window in every
layer (375, 393), and one shorter than ``C`` is not compressed (373). The entries are chosen as SnapKV's
``update_kv`` chooses them (376-406, 408-438); ``init_pyramidkv`` (1238-1263): w=32, k=5, avgpool. PyramidKV
compresses the prompt only; here its ``update_kv`` runs at every compression of kvbench's cadence (the sequence
has ``budget + 1`` entries: the prefill of a longer prompt, then every step), on each layer's own cache.

kvbench's ``pyramidkv:snapkv-d`` gives layer ``l`` a budget ``B_l`` from ``PyramidKVPress.layer_budgets`` and lets
``snapkv-d`` choose ``B_l`` entries. Agreement: with kvbench's layer budgets in the reference the kept sets are
identical at every compression (seeded: groups 1, 2, 7, budgets 16 and 20, window 4, four layers; in situ: tiny
llama, three layers, groups 1, 2, 7), with snapkv-d's own choices set to kvbench's (group mean, token-order
pooling, ties newest first: ``tests/reference/test_snapkv_d.py`` names and measures those). The allocation itself
differs from PyramidKV's by design, in three named ways (``kvbench/presses/pyramidkv.py`` documents them):

1. Window inside the layer share: kvbench's ``B_l`` counts the inner press's protected window; PyramidKV shares
   ``C - w`` over the layers and adds ``w`` to each. At B=128, 28 layers, w=32 (R1-Distill-Qwen-7B): PyramidKV
   keeps 220 in the first layer down to 58 in the last; kvbench 249 down to 7, so its last three layers
   (25, 16 and 7 entries) keep fewer than snapkv-d's 32 protected recent tokens: pure recency windows
   (``test_allocation``).
2. Always pyramidal: PyramidKV's pyramid needs a cache of ``2 (C - w)`` entries; a shorter one is uniform, so its
   own rule applied at a decoding compression (``C + 1`` entries, ``C > 2w - 1``) is SnapKV's: with a prompt
   shorter than ``C`` the literal reference is identical to kvbench's ``snapkv-d``, not to ``pyramidkv:snapkv-d``
   (``test_short_prompt_is_uniform``); after a long prompt's pyramidal prefill the literal rule keeps the pyramid
   only in the layers still holding ``2 (C - w)`` entries, the others return to ``C``.
3. Integer rounding: PyramidKV floors ``(C - w) / beta`` and the step, so its layers do not add up to ``L x C``
   (at B=128, L=28, w=32: 3892 entries, not 3584; the floored step flattens the pyramid); kvbench's budgets follow
   the exact linear shape from ``(2 - 1/beta) B`` to ``B / beta`` and add up to exactly ``L x B`` (one entry each,
   the rest in proportion, largest remainders: each within two entries of the shape).
"""

import pytest

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
from tests.reference.test_snapkv_d import KVBENCH, PROMPT
from tests.reference.test_snapkv_d import reference as snapkv_reference


def pyramid_keep(layer, num_hidden_layers, max_capacity_prompt, window_size, q_len, beta=20):
    """``PyramidKVCluster.update_kv`` lines 360-375, 393, 425: the entries layer ``layer`` keeps (scored +
    window) of a cache of ``q_len``; None: not compressed."""
    min_num = (max_capacity_prompt - window_size) // beta  # line 360
    max_num = (max_capacity_prompt - window_size) * 2 - min_num
    if max_num >= q_len - window_size:  # line 364
        max_num = q_len - window_size
        min_num = (max_capacity_prompt - window_size) * 2 - max_num
    steps = (max_num - min_num) // (num_hidden_layers - 1)  # line 369
    max_capacity = max_num - layer * steps
    if q_len < max_capacity_prompt:  # line 373
        return None
    if q_len < (max_capacity_prompt - window_size) * 2:  # line 375: uniform, topk(C - w) at line 393
        return max_capacity_prompt
    return max_capacity + window_size  # topk(max_capacity_prompt) at line 425, window appended


def reference(forwards, budget, window_size, kernel_size=5, pooling="avgpool", shares=None):
    """PyramidKV's cache: each layer's ``update_kv`` at every compression, keeping ``pyramid_keep`` of the entries
    it holds (``shares``: the fixed per-layer budgets to keep instead). snapkv-d's choices are kvbench's."""
    layers = forwards[0].layers
    gqa = "mean" if forwards[0].group > 1 else None
    keep = (lambda layer, held: shares[layer]) if shares is not None else \
        (lambda layer, held: pyramid_keep(layer, layers, budget, window_size, held))
    return snapkv_reference(forwards, budget, window_size, kernel_size, pooling, **dict(KVBENCH, gqa=gqa),
                            layer_keep=keep)


def counts(kept_step):
    """Entries each layer holds (the same in every head)."""
    return [len(heads[0]) for heads in kept_step]


@pytest.mark.parametrize(("budget", "layers", "window", "first", "last", "total"), [
    (128, 28, 32, (220, 249), (58, 7), (3892, 3584)),
    (256, 28, 32, (469, 498), (64, 14), (7462, 7168)),
    (512, 32, 32, (968, 997), (69, 27), (16592, 16384)),
])
def test_allocation(budget, layers, window, first, last, total):
    """A long prompt (the pyramid's regime): (PyramidKV, kvbench) for the first and last layers and in all."""
    source = [pyramid_keep(i, layers, budget, window, 100 * budget) for i in range(layers)]
    kvbench = make_press("pyramidkv:snapkv-d", {"window_size": str(window)}).layer_budgets(budget, layers)
    assert (source[0], kvbench[0]) == first and (source[-1], kvbench[-1]) == last
    assert (sum(source), sum(kvbench)) == total and sum(kvbench) == layers * budget
    assert min(source) >= window and min(kvbench) < window  # 1: the window inside the share
    low, high = budget / 20, budget * (2 - 1 / 20)  # 3: kvbench follows the exact shape over the whole budget
    assert all(abs(b - (high - (high - low) * i / (layers - 1))) < 2 for i, b in enumerate(kvbench))
    # 2: PyramidKV is uniform for a cache shorter than 2 (C - w), and leaves one shorter than C alone
    assert {pyramid_keep(i, layers, budget, window, 2 * (budget - window) - 1) for i in range(layers)} == {budget}
    assert pyramid_keep(0, layers, budget, window, budget - 1) is None


def check(kept, forwards, budget, window, case):
    """kvbench's shares: identical. PyramidKV's own allocation: differs from the first compression, where each side
    keeps its formula's counts."""
    layers = forwards[0].layers
    first = next(t for t, f in enumerate(forwards) if int(f.positions[-1]) + 1 > budget)
    held = int(forwards[first].positions[-1]) + 1
    shares = make_press("pyramidkv:snapkv-d", {"window_size": str(window)}).layer_budgets(budget, layers)
    agreement = assert_identical(kept, reference(forwards, budget, window, shares=shares), forwards,
                                 "pyramidkv:snapkv-d", f"{case} (kvbench's layer budgets)")
    literal = reference(forwards, budget, window)
    found = compare(kept, literal, forwards)
    log("pyramidkv:snapkv-d", f"{case} (PyramidKV's allocation)", found)
    assert counts(kept[first]) == [min(share, held) for share in shares]
    assert found.first_difference is not None and found.identical == 0
    assert counts(literal[first]) == [pyramid_keep(i, layers, budget, window, held) or held for i in range(layers)]
    return agreement


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("budget", [16, 20])
def test_seeded(group, budget):
    forwards = synthetic_forwards(group, group=group, prompt=40, steps=50, layers=4)
    kept = run_cache(make_press("pyramidkv:snapkv-d", {"window_size": "4"}), budget, forwards)
    check(kept, forwards, budget, 4, f"seeded group {group} budget {budget}")
    if budget == 16:  # the literal rule after the prefill: pyramidal only where 2 (C - w) = 24 entries remain
        assert counts(reference(forwards, budget, 4)[-1]) == [28, 16, 16, 16]


@pytest.mark.parametrize("group", GROUPS)
def test_short_prompt_is_uniform(group):
    """A prompt shorter than C: PyramidKV's rule never meets a cache of 2 (C - w) entries, so it is snapkv-d."""
    forwards = synthetic_forwards(group, group=group, prompt=12, steps=50, layers=4)
    uniform = run_cache(make_press("snapkv-d", {"window_size": "4"}), 16, forwards)
    assert_identical(uniform, reference(forwards, 16, 4), forwards, "pyramidkv:snapkv-d",
                     f"seeded group {group} budget 16 prompt 12 (PyramidKV's allocation = kvbench's snapkv-d)")
    pyramid = run_cache(make_press("pyramidkv:snapkv-d", {"window_size": "4"}), 16, forwards)
    check(pyramid, forwards, 16, 4, f"seeded group {group} budget 16 prompt 12")


@pytest.mark.parametrize("group", GROUPS)
def test_in_situ(group):
    model, tokenizer = tiny_model(group)
    prompt = tokenizer(PROMPT)["input_ids"]
    forwards, kept = trace_model(model, prompt, make_press("pyramidkv:snapkv-d", {"window_size": "4"}), 16,
                                 max_new_tokens=60)
    check(kept, forwards, 16, 4, f"tiny-llama group {group} budget 16")
