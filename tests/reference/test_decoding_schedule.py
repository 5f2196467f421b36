"""``DecodingPressSchedule`` (``kvbench/presses/decoding_schedule.py``) against kvpress's ``DecodingPress`` schedule.

Source: NVIDIA/kvpress @ 8bb29b9, ``kvpress/presses/decoding_press.py`` lines 113-179 (``forward_hook``: nothing at
the prefill, line 129; each layer counts its decoding forwards, 137, and at ``compression_interval`` of them, or a
forward of ``q_len >= target_size`` tokens, 141, compresses its whole cache to ``target_size``, 147-166, and resets
the count, 169), lines 194-236 (``_find_target_compression_ratio``) and ``scorer_press.py`` lines 86-100
(``ScorerPress.compress``), transcribed in ``tests/reference/decoding_press.py``.

The schedule is kvbench's for every press it transcribes under ``DecodingPress`` (``keydiff``,
``expected-attention``), whose own modules compare it with their scores. Here it runs alone, with the simplest
scorer kvpress has, ``KnormPress.score`` (``knorm_press.py`` line 38: ``-keys.norm(dim=-1)``), so that what is
compared is when compressions happen and what a compression keeps. Claimed: at ``--budget B`` with ``buffer=N``
the schedule is ``DecodingPress(compression_interval=N, target_size=B)``, with kept sets identical at every
forward whenever the prompt has at most ``B + N`` tokens (seeded, groups 1, 2, 7: prompts under, at and over the
budget, at ``B + N``, interval 1). Named differences, each asserted (and with the reference's option, the kept sets
identical):

1. A prompt over ``B + N`` is cut to ``B`` at the prefill (``prefill_over``): kvpress holds it whole until its first
   interval; kvbench's cache preallocates ``B + 2N`` slots (``capacity``), enough for what kvpress holds whenever
   the prompt has at most ``B + N`` tokens.
2. ``q_len >= target_size`` (line 141) compresses at any forward of at least ``B`` tokens: kvbench's decoding
   forwards have one token, so this differs only at ``B = 1`` (``q_len_trigger``; see ``test_keydiff.py``).
"""

from dataclasses import dataclass

import pytest
import torch

from kvbench.presses import make_press
from kvbench.presses.decoding_schedule import DecodingPressSchedule
from tests.reference.decoding_press import decoding_press
from tests.reference.harness import GROUPS, assert_identical, compare, run_cache, synthetic_forwards


@dataclass
class KnormUnderDecodingPress(DecodingPressSchedule):
    """kvpress's ``DecodingPress(KnormPress())``: the schedule under test with the lowest-key-norm score."""

    name = "knorm-decoding-schedule-test"
    reference = "NVIDIA/kvpress@8bb29b9 kvpress/presses/decoding_press.py (DecodingPress.forward_hook)"

    def score(self, view):
        return -view.keys.float().norm(dim=-1)


def knorm_score(keys):
    """``KnormPress.score`` (knorm_press.py line 38) on keys [1, H, n, d]."""
    return -keys.norm(dim=-1)


#: budget, interval, prompt: over the budget, under it (the first compression a no-op), exactly B + N, interval 1.
CASES = [(8, 4, 10), (30, 5, 24), (30, 5, 35), (12, 1, 6), (16, 3, 16)]


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize(("budget", "interval", "prompt"), CASES)
def test_schedule_is_decoding_press(group, budget, interval, prompt):
    forwards = synthetic_forwards(group, group=group, prompt=prompt)
    kvbench = run_cache(KnormUnderDecodingPress(buffer=interval), budget, forwards)
    assert_identical(kvbench, decoding_press(forwards, budget, interval, knorm_score), forwards,
                     "decoding-schedule", f"seeded group {group} {budget}/{interval}/{prompt}",
                     min_compressions=(60 - max(0, budget + 1 - prompt)) // interval)


@pytest.mark.parametrize(("budget", "interval", "prompt"), [(8, 4, 13), (30, 5, 40)])
def test_prompt_over_budget_and_interval_is_cut_at_the_prefill(budget, interval, prompt):
    """Difference 1: from the prefill on kvbench holds the budget's best of the prompt; kvpress the whole prompt."""
    forwards = synthetic_forwards(1, group=2, prompt=prompt)
    kvbench = run_cache(KnormUnderDecodingPress(buffer=interval), budget, forwards)
    agreement = compare(kvbench, decoding_press(forwards, budget, interval, knorm_score), forwards)
    assert agreement.forwards == 1 and agreement.first_difference
    assert_identical(kvbench, decoding_press(forwards, budget, interval, knorm_score, prefill_over=budget + interval),
                     forwards, min_compressions=60 // interval)


def test_the_cache_never_holds_more_than_its_capacity():
    """``capacity`` = B + 2N: a prompt of B + N tokens grows N more before its first compression, which happens in
    the forward whose token fills the last slot (held after forwards 0 to N - 1: B + N to B + 2N - 1; after N: B)."""
    budget, interval = 8, 4
    press = KnormUnderDecodingPress(buffer=interval)
    assert press.capacity(budget, 2, 2) == budget + 2 * interval
    forwards = synthetic_forwards(0, group=2, prompt=budget + interval)
    held = [max(len(head) for layer in step for head in layer) for step in run_cache(press, budget, forwards)]
    assert held[:interval + 1] == [budget + interval + t for t in range(interval)] + [budget]
    assert max(held) == budget + 2 * interval - 1


def test_control_an_interval_off_by_one_fails():
    forwards = synthetic_forwards(0, group=2, prompt=10)
    kvbench = run_cache(KnormUnderDecodingPress(buffer=4), 8, forwards)
    assert compare(kvbench, decoding_press(forwards, 8, 5, knorm_score), forwards).first_difference


def test_the_presses_under_decoding_press_use_this_schedule():
    for name in ("keydiff", "expected-attention"):
        press = make_press(name)
        assert isinstance(press, DecodingPressSchedule) and press.buffer == 512  # compression_interval, line 46
        assert type(press).row_cadence is DecodingPressSchedule.row_cadence
        assert type(press).capacity is DecodingPressSchedule.capacity
    assert torch.equal(knorm_score(torch.ones(1, 1, 2, 4)), torch.full((1, 1, 2), -2.0))
