"""keydiff against kvpress's ``DecodingPress(KeyDiffPress)``, as its own cache runs it.

Source: NVIDIA/kvpress @ 8bb29b9 (read with line numbers; transcribed without kvbench's press or its docs).

- ``kvpress/presses/keydiff_press.py`` lines 45-46 (``KeyDiffPress.score``): per layer and KV head, the anchor is
  the mean over every cached entry of the L2-normalised keys (``F.normalize(keys, p=2, dim=-1).mean(dim=2)``);
  an entry's score is minus the cosine similarity of its key to the anchor, so the keys *least* similar to the
  mean key direction are kept. It reads keys only: queries, values, attention and the GQA group do not enter.
- ``kvpress/presses/scorer_press.py`` lines 86-100 (``ScorerPress.compress``): ratio 0 leaves the cache as it is
  (86-87); ``n_kept = int(k_len * (1 - compression_ratio))`` (94), ``scores.topk(n_kept).indices`` (95), keys and
  values gathered in ``topk``'s order (96-100): after a compression the cache's physical order is by score.
- ``kvpress/presses/decoding_press.py`` lines 113-179 (``DecodingPress.forward_hook``), run after each layer's
  attention, the layer's cache already holding the forward's tokens: at the prefill nothing (line 129,
  ``is_prefilling``: ``cache_position[-1] + 1 == q_len``, ``base_press.py`` lines 37-40); at every other forward
  the layer's step counter goes up (137), and when it reaches ``compression_interval`` or the forward has
  ``q_len >= target_size`` tokens (141) the layer's whole cache, prompt included, is compressed (147-166, through
  ``compress``, 102-111) and the counter reset (169), also when that compression removed nothing.
  ``_find_target_compression_ratio`` (194-236) returns 0 when ``k_len <= target_size`` and otherwise a ratio
  with ``int(k_len * (1 - ratio)) == target_size``; its binary search reaches the target for every
  ``target_size`` < 300 and ``k_len`` < 3000 (checked; ``test_ratio_search`` up to 128 and 1024), so a
  compression keeps exactly ``target_size``.
  Defaults: ``compression_interval=512`` (46), ``target_size=2048`` (47). The hidden-states buffer (134, 153,
  172-178) becomes the scorer's ``hidden_states``, which KeyDiff does not read.

``reference`` is that rule in plain torch: each layer's cache of keys and positions in kvpress's physical order
(``topk`` order after a compression, new tokens appended), nothing at the prefill, each layer's counter of decoding
forwards, and at every ``interval``-th one the whole cache cut to ``budget`` if it holds more, by the score above.

kvbench's ``keydiff`` at ``--budget B`` with ``buffer=N`` is claimed as ``target_size=B``,
``compression_interval=N`` (``buffer`` defaults to 512, line 46's default: ``test_default_interval``). Agreement:
identical kept sets at every forward whenever the prompt has at most ``B + N`` tokens -- seeded (groups 1, 2, 7;
B/N/prompt 8/4/10: a prompt longer than the budget, held whole until decoding forward 4; 30/5/24: shorter, the
5th forward's compression a no-op; 30/5/35; 12/1/6) and in situ (tiny llama, a 44-token prompt, groups 1, 2, 7,
B/N 40/8 and 56/6) -- and on 300 further seeded runs (seeds 0-99 at 8/4/10, 30/5/24 and 128/16/100, 3,200
compressions): no float-noise disagreement on continuous keys. Named differences, each asserted exactly and,
put into the reference one at a time, the only one (the kept sets then identical at every forward):

1. Prefill cut (``test_prefill_cut``, ``test_prefill_cut_threshold``, ``test_in_situ`` at B/N 24/8): with a prompt
   longer than ``B + N`` kvbench compresses the prompt at the prefill to its best ``B`` by the same score (anchor
   over the prompt); kvpress does nothing at the prefill (line 129) and first compresses at decoding forward
   ``N``, then choosing ``B`` of ``prompt + N`` entries where kvbench chooses from ``B + N``. The kept sets differ
   from forward 0 (kvbench holds ``B`` entries, a subset of the prompt kvpress holds whole) and stay different
   (seeded group 2, 8/4/24: 4 to 6 of 8 entries in common at forward 4, 1 to 4 at forward 60). Cause, kvbench's
   engine: its cache preallocates ``B + 2N`` slots per KV head (``BudgetCache.capacity``: 16 at 8/4, 40 at
   30/5), enough for the longest stretch kvpress holds when the prompt has at most ``B + N`` tokens; for a
   longer prompt the press's schedule (``row_cadence`` before any compression) triggers at the prompt's length
   and the engine keeps the press's best ``B`` at the prefill (``kvbench/engine/cache.py``, "prefill
   compression"). From decoding forward ``N`` on its compressions fall at the same forwards as kvpress's.
2. Exact score ties (``test_exact_ties``): kvbench ranks equal scores newest first (the engine's ranking); kvpress
   keeps what CPU ``topk`` returns (line 95), here the older of two equal keys. With repeated keys (``copies``)
   the first difference is always between exact copies (seed 0, group 2, 8/4/10: forward 8, layer 1, head 0,
   kvbench keeps 17 where kvpress keeps 16, the same key). Continuous keys had no ties.
3. ``q_len >= target_size`` (``test_target_size_one``): line 141 also compresses at any decoding forward of at
   least ``target_size`` tokens. kvbench's decoding forwards have one token, so this differs only at ``B = 1``:
   kvpress then compresses at every decoding forward, kvbench every ``N`` (prompt 3, N 4: forward 1, layer 0,
   head 0, kvpress holds {2}, kvbench all of {0, 1, 2, 3}). In kvpress's pipeline (``kvpress/pipeline.py`` lines
   215-246, 289-299) the question is one multi-token forward after an uncompressed prefill, so there it counts as
   decoding forward 1 and is compressed at once when it has ``target_size`` tokens or more; kvbench has no such
   forward (its whole prompt is one prefill, every later forward one token).
"""

import pytest
import torch
import torch.nn.functional as F

from kvbench.presses import make_press
from tests.reference.decoding_press import decoding_press, find_target_compression_ratio
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

PROMPT = "Tom has 12 apples. He buys 7 more. How many?"


def keydiff_score(keys):
    """``KeyDiffPress.score`` (keydiff_press.py lines 45-46) on keys [1, H, n, d]."""
    anchor = F.normalize(keys, p=2, dim=-1).mean(dim=2, keepdim=True)
    return -F.cosine_similarity(keys, anchor, dim=-1)


def reference(forwards, budget, interval, similar=False, **differences):
    """kept[t][layer][head] of kvpress's cache under ``DecodingPress(KeyDiffPress(), compression_interval=interval,
    target_size=budget)`` (``tests/reference/decoding_press.py``, the cache in kvpress's own physical order).

    ``differences`` name kvbench's, one at a time (``decoding_press``'s options): ``prefill_over=n`` (difference 1),
    ``ties="newest"`` (difference 2), ``q_len_trigger=False`` (difference 3). ``similar=True`` (keeps the keys
    *most* similar to the anchor) only shows the comparison can fail.
    """
    return decoding_press(forwards, budget, interval, (lambda k: keydiff_score(k).neg()) if similar else keydiff_score,
                          **differences)


def press(interval):
    return make_press("keydiff", {"buffer": str(interval)})


def first_difference(kvbench, theirs):
    """(forward, layer, head, kvbench alone, reference alone) at the first differing kept set, or None."""
    for t, (mine_t, theirs_t) in enumerate(zip(kvbench, theirs, strict=True)):
        for layer, (mine_l, theirs_l) in enumerate(zip(mine_t, theirs_t, strict=True)):
            for head, (a, b) in enumerate(zip(mine_l, theirs_l, strict=True)):
                if a != b:
                    return t, layer, head, a - b, b - a
    return None


#: budget, interval (kvbench's ``buffer``), prompt length: a prompt longer than the budget (held whole until the
#: first decoding compression), shorter (the first compression a no-op), of budget + interval, and interval 1.
CASES = [(8, 4, 10), (30, 5, 24), (30, 5, 35), (12, 1, 6)]


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize(("budget", "interval", "prompt"), CASES)
def test_seeded(group, budget, interval, prompt):
    forwards = synthetic_forwards(group, group=group, prompt=prompt)
    kvbench = run_cache(press(interval), budget, forwards)
    assert_identical(kvbench, reference(forwards, budget, interval), forwards, "keydiff",
                     f"seeded group {group} budget {budget} interval {interval} prompt {prompt}",
                     min_compressions=(60 - max(0, budget + 1 - prompt)) // interval)


@pytest.mark.parametrize(("budget", "interval"), [(8, 4), (30, 5)])
def test_control(budget, interval):
    """Keeping the keys most similar to the anchor (the opposite rule) does not pass the comparison."""
    forwards = synthetic_forwards(2, group=2)
    kvbench = run_cache(press(interval), budget, forwards)
    assert compare(kvbench, reference(forwards, budget, interval, similar=True), forwards).first_difference


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize(("budget", "interval", "prompt"), [(8, 4, 13), (8, 4, 24), (30, 5, 40)])
def test_prefill_cut(group, budget, interval, prompt):
    """Difference 1: a prompt longer than budget + interval. kvpress holds it whole after the prefill (line 129);
    kvbench keeps the budget's best of it at once. With that prefill compression the kept sets are identical."""
    forwards = synthetic_forwards(group, group=group, prompt=prompt)
    kvbench, theirs = run_cache(press(interval), budget, forwards), reference(forwards, budget, interval)
    agreement = compare(kvbench, theirs, forwards)
    log("keydiff", f"seeded group {group} budget {budget} interval {interval} prompt {prompt}", agreement)
    assert agreement.forwards == 1 and agreement.identical == 0  # they differ at the prefill
    for mine, source in zip(kvbench[0], theirs[0], strict=True):
        for a, b in zip(mine, source, strict=True):
            assert len(a) == budget and b == set(range(prompt)) and a < b
    cut = reference(forwards, budget, interval, prefill_over=budget + interval)
    assert_identical(kvbench, cut, forwards, min_compressions=60 // interval)


def test_prefill_cut_threshold():
    """The prefill is cut exactly when the prompt exceeds budget + interval."""
    for prompt in (11, 12, 13):
        forwards = synthetic_forwards(0, group=2, prompt=prompt, steps=0)
        held = {len(h) for layer in run_cache(press(4), 8, forwards)[0] for h in layer}
        assert held == {prompt if prompt <= 12 else 8}


@pytest.mark.parametrize(("budget", "interval", "prompt"), [(8, 4, 10), (30, 5, 24), (12, 1, 6)])
def test_exact_ties(budget, interval, prompt):
    """Difference 2: with repeated keys (``copies``: a token repeats an earlier token's key, so both have the same
    score exactly) kvbench keeps the newer of tied entries; kvpress keeps what CPU ``topk`` returns, here the
    older. The first difference is between exact copies; ranking ties newest first, the kept sets are identical."""
    forwards = synthetic_forwards(0, group=2, prompt=prompt, copies=0.4)
    kvbench, theirs = run_cache(press(interval), budget, forwards), reference(forwards, budget, interval)
    log("keydiff", f"seeded copies budget {budget} interval {interval} prompt {prompt}",
        compare(kvbench, theirs, forwards))
    t, layer, head, mine, source = first_difference(kvbench, theirs)
    keys = torch.cat([f.keys for f in forwards], dim=2)[layer, head]  # index = position
    assert len(mine) == len(source) > 0
    for p in mine:
        assert any(torch.equal(keys[p], keys[q]) and q < p for q in source), (t, layer, head, mine, source)
    assert_identical(kvbench, reference(forwards, budget, interval, ties="newest"), forwards)


def test_target_size_one():
    """Difference 3: at ``target_size`` 1 line 141's ``q_len >= target_size`` holds for every one-token forward,
    so kvpress compresses at each decoding forward; kvbench compresses every ``buffer`` forwards only."""
    forwards = synthetic_forwards(1, group=2, prompt=3, steps=20)
    kvbench, theirs = run_cache(press(4), 1, forwards), reference(forwards, 1, 4)
    assert [len(k[0][0]) for k in theirs] == [3] + [1] * 20
    assert [len(k[0][0]) for k in kvbench] == [3, 4, 5, 6] + [1, 2, 3, 4] * 4 + [1]
    assert_identical(kvbench, reference(forwards, 1, 4, q_len_trigger=False), forwards, min_compressions=5)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize(("budget", "interval"), [(40, 8), (56, 6), (24, 8)])
def test_in_situ(group, budget, interval):
    """The prompt has 44 tokens: longer than 40 (held whole until forward 8), shorter than 56; longer than
    24 + 8, where kvbench cuts it at the prefill (difference 1)."""
    model, tokenizer = tiny_model(group)
    prompt = tokenizer(PROMPT)["input_ids"]
    forwards, kept = trace_model(model, prompt, press(interval), budget, max_new_tokens=60)
    case = f"tiny-llama group {group} budget {budget} interval {interval}"
    if len(prompt) <= budget + interval:
        assert_identical(kept, reference(forwards, budget, interval), forwards, "keydiff", case,
                         min_compressions=(59 - max(0, budget + 1 - len(prompt))) // interval)
        return
    agreement = compare(kept, reference(forwards, budget, interval), forwards)
    log("keydiff", case, agreement)
    assert agreement.forwards == 1 and agreement.first_difference
    assert_identical(kept, reference(forwards, budget, interval, prefill_over=budget + interval), forwards,
                     min_compressions=60 // interval)


def test_ratio_search():
    """The source's ratio search keeps exactly ``target_size`` (no warning, line 231) at the sizes used here."""
    for target in range(1, 129):
        for k_len in range(target + 1, 1025):
            assert int(k_len * (1 - find_target_compression_ratio(k_len, target))) == target


def test_default_interval():
    """kvbench's ``buffer`` defaults to ``compression_interval``'s default (decoding_press.py line 46)."""
    assert make_press("keydiff").buffer == 512
