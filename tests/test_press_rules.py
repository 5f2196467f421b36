"""Each press's kept set on a small hand-made example of its rule (slots deliberately out of position order)."""

import math

import pytest
import torch

from kvbench.engine.view import QueryWindow, SlotView
from kvbench.presses import make_press
from kvbench.presses.ranking import lowest_slots, rank_slots

POSITIONS = [5, 0, 7, 2, 1, 6, 3, 4]  # physical slot -> token position


def view_of(keys=None, attention=None, state=None, budget=5, seed=0):
    s = len(POSITIONS)
    keys = torch.ones(1, 1, s, 2) if keys is None else torch.tensor(keys, dtype=torch.float32).view(1, 1, s, -1)
    attn = None if attention is None else torch.tensor(attention, dtype=torch.float32).view(1, 1, s)
    return SlotView(
        attention_override=lambda gqa: attn, keys=keys, values=torch.zeros_like(keys),
        positions=torch.tensor(POSITIONS).view(1, 1, s), valid=torch.ones(1, 1, s, dtype=torch.bool),
        state={k: torch.tensor(v, dtype=torch.float32).view(1, 1, s) for k, v in (state or {}).items()},
        query_position=torch.tensor([7]), budget=budget,
        seeds=torch.tensor([seed]),
        # a query window whose one (zero) query attends uniformly, for presses that compute their own logits
        window=QueryWindow(torch.zeros(1, 1, 1, keys.shape[-1]), torch.tensor([[7]]), torch.ones(1, 1, dtype=bool),
                           1.0),
    )


def kept(press, view, budget=5) -> set[int]:
    order = rank_slots(press.score(view).float(), view.positions)[0, 0, :budget]
    return {POSITIONS[i] for i in order.tolist()}


def by_position(values_by_pos):
    """Per-slot list from a {position: value} dict."""
    return [values_by_pos[p] for p in POSITIONS]


def test_streaming_llm_keeps_sinks_and_most_recent():
    assert kept(make_press("streaming_llm", {"n_sink": "2"}), view_of()) == {0, 1, 5, 6, 7}


def test_knorm_keeps_lowest_key_norms():
    norms = {0: 9, 1: 1, 2: 8, 3: 2, 4: 7, 5: 3, 6: 6, 7: 4}
    keys = by_position({p: [n, 0.0] for p, n in norms.items()})
    assert kept(make_press("knorm"), view_of(keys=keys)) == {1, 3, 5, 7, 6}
    # with protection, the sink and the newest two are kept first
    assert kept(make_press("knorm", {"n_sink": "1", "recent_window": "2"}), view_of(keys=keys)) == {0, 6, 7, 1, 3}


def test_knorm_rounding_is_relative_so_small_norms_stay_apart():
    norms = {0: 3e-4, 1: 1e-4, 2: 2e-4, 3: 5.0, 4: 5.0 * (1 + 2**-20), 5: 6.0, 6: 7.0, 7: 8.0}
    keys = by_position({p: [n, 0.0] for p, n in norms.items()})
    # 1e-4 and 2e-4 both round to 0 at an absolute 2^-12; 5 and 5(1 + 2^-20) are float noise: a tie, newest kept
    assert kept(make_press("knorm"), view_of(keys=keys), budget=4) == {1, 2, 0, 4}


def test_h2o_keeps_heavy_hitters_and_recent_window():
    acc = by_position({0: 5.0, 1: 0.1, 2: 4.0, 3: 0.2, 4: 3.0, 5: 0.3, 6: 0.0, 7: 0.0})
    # budget 5, recent_ratio 0.4 -> the 2 newest (6, 7) protected, then the 3 largest accumulations
    press = make_press("h2o", {"recent_ratio": "0.4"})
    assert kept(press, view_of(state={"accumulated": acc})) == {6, 7, 0, 2, 4}


def test_h2o_paper_variant_normalises_by_age():
    # age = 7 - position + 1: position 0 has age 8, position 6 age 2
    acc = by_position({0: 8.0, 1: 7.0, 2: 0.6, 3: 0.5, 4: 0.4, 5: 0.3, 6: 1.8, 7: 0.1})
    press = make_press("h2o", {"recent_ratio": "0", "normalize": "true"})
    # normalised: 0->1.0, 1->1.0, 2->0.1, 3->0.1, 4->0.1, 5->0.1, 6->0.9, 7->0.1
    assert kept(press, view_of(state={"accumulated": acc}), budget=3) == {0, 1, 6}
    plain = make_press("h2o", {"recent_ratio": "0"})
    assert kept(plain, view_of(state={"accumulated": acc}), budget=3) == {0, 1, 6}
    assert kept(press, view_of(state={"accumulated": acc}), budget=4) - {0, 1, 6} == {7}  # tie at 0.1: newest


def test_snapkv_d_keeps_window_and_attended_tokens():
    attention = by_position({0: 0.30, 1: 0.01, 2: 0.02, 3: 0.25, 4: 0.01, 5: 0.05, 6: 0.2, 7: 0.16})
    press = make_press("snapkv-d", {"window_size": "2", "kernel_size": "1"})
    assert kept(press, view_of(attention=attention)) == {6, 7, 0, 3, 5}


def test_snapkv_d_pooling_spreads_attention_to_neighbours():
    attention = by_position({0: 0.0, 1: 0.0, 2: 0.0, 3: 0.9, 4: 0.0, 5: 0.0, 6: 0.05, 7: 0.05})
    press = make_press("snapkv-d", {"window_size": "1", "kernel_size": "3", "pooling": "max"})
    # max-pooling with kernel 3 over token order gives positions 2, 3, 4 the peak
    assert kept(press, view_of(attention=attention), budget=4) == {7, 2, 3, 4}


def test_snapkv_d_pools_the_scored_prefix_only():
    """As SnapKV's code: the window's attention does not leak into its neighbours through the pooling."""
    attention = by_position({0: 0.1, 1: 0.0, 2: 0.05, 3: 0.0, 4: 0.0, 5: 0.9, 6: 0.0, 7: 0.0})
    press = make_press("snapkv-d", {"window_size": "3", "kernel_size": "3"})
    # prefix 0-4 pooled with zero padding counted: 0 -> .1/3, 1 -> .15/3, 2 -> .05/3, 3 -> .05/3, 4 -> 0
    assert kept(press, view_of(attention=attention)) == {5, 6, 7, 1, 0}


def test_rkv_importance_follows_rkvs_code():
    """Group-max logits of each window query, softmax over the keys before the window, mean over the window."""
    from kvbench.presses.base import window_softmax

    generator = torch.Generator().manual_seed(3)
    keys, queries = torch.randn(1, 2, 8, 4, generator=generator), torch.randn(1, 4, 3, 4, generator=generator)
    positions = torch.tensor(POSITIONS).expand(1, 2, 8)
    view = SlotView(keys=keys, values=keys, positions=positions, valid=torch.ones(1, 2, 8, dtype=torch.bool),
                    state={}, query_position=torch.tensor([7]), budget=5,
                    window=QueryWindow(queries, torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.bool), 0.5))
    prefix = positions < 5
    ours = window_softmax(view, prefix, "max")
    for head in range(2):
        older = [s for s in range(8) if POSITIONS[s] < 5]
        logits = torch.stack([queries[0, g] @ keys[0, head, older].T * 0.5 for g in (2 * head, 2 * head + 1)])
        expected = torch.softmax(logits.amax(dim=0), dim=-1).mean(dim=0)  # [window, older] -> [older]
        torch.testing.assert_close(ours[0, head, older], expected)
        assert float(ours[0, head, [s for s in range(8) if s not in older]].abs().sum()) == 0.0


def test_scope_slide_ranks_generated_tokens_by_the_current_query():
    """scoring=current (SCOPE's code): the reasoning is re-selected by the current query's attention, whatever
    was accumulated; the pinned prompt stays and the rest of the prompt goes first."""
    view = view_of(attention=by_position({0: 0, 1: 0, 2: 0, 3: .5, 4: .1, 5: .3, 6: .2, 7: .0}),
                   state={"accumulated": by_position({0: 9, 1: 9, 2: 9, 3: 0, 4: 9, 5: 0, 6: 9, 7: 9}),
                          "pinned": by_position({0: 1, 1: 0, 2: 1, 3: 0, 4: 0, 5: 0, 6: 0, 7: 0})})
    view.prompt_length, view.step = torch.tensor([3]), 5
    args = {"prefill_budget": "2", "recent_ratio": "0"}
    assert kept(make_press("scope", {**args, "scoring": "current"}), view) == {0, 2, 3, 5, 6}
    assert kept(make_press("scope", args), view) == {0, 2, 4, 6, 7}


def test_tova_keeps_most_attended_by_current_query():
    attention = by_position({0: 0.4, 1: 0.0, 2: 0.1, 3: 0.0, 4: 0.2, 5: 0.0, 6: 0.0, 7: 0.3})
    assert kept(make_press("tova"), view_of(attention=attention), budget=3) == {0, 7, 4}


def test_rkv_evicts_the_older_copies_of_redundant_keys():
    # positions 0, 1, 2 hold (almost) the same key; 3 and 5..7 are mutually orthogonal-ish, 4 is the newest copy
    c = math.cos(0.05)
    s = math.sin(0.05)
    keys = by_position({0: [1, 0, 0, 0], 1: [c, s, 0, 0], 2: [c, -s, 0, 0], 3: [0, 0, 1, 0],
                        4: [c, 0, s, 0], 5: [0, 0, 0, 1], 6: [0, 0, -1, 0], 7: [0, 0, 0, -1]})
    attention = [0.125] * 8  # uniform: importance does not discriminate
    press = make_press("rkv", {"window_size": "1", "kernel_size": "1", "mix_lambda": "0"})
    kept_set = kept(press, view_of(keys=keys, attention=attention), budget=6)
    # the four copies {0, 1, 2, 4}: the oldest two are the most redundant and go; the newest copy stays
    assert kept_set == {2, 3, 4, 5, 6, 7}


def test_random_is_seeded_and_uniform_over_slots():
    press = make_press("random")
    assert kept(press, view_of(seed=1)) == kept(press, view_of(seed=1))
    seen = set()
    for seed in range(40):
        seen |= kept(press, view_of(seed=seed), budget=1)
    assert seen == set(range(8))


def test_ties_are_broken_by_recency_not_slot_order():
    scores = torch.zeros(1, 1, 8)
    order = rank_slots(scores, torch.tensor(POSITIONS).view(1, 1, 8))[0, 0].tolist()
    assert [POSITIONS[i] for i in order] == [7, 6, 5, 4, 3, 2, 1, 0]


@pytest.mark.parametrize("n", [1, 3])
def test_lowest_slots_are_the_last_of_the_ranking(n):
    """The one-slot shortcut (no sort) evicts exactly what the full ranking evicts, ties and -inf included."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (64, 4, 24), generator=generator).float()
    scores[scores == 3] = -torch.inf
    positions = torch.stack([torch.randperm(100, generator=generator)[:24] for _ in range(64 * 4)]).view(64, 4, 24)
    expected = rank_slots(scores, positions)[..., -n:]
    assert torch.equal(lowest_slots(scores, positions, n), expected)


def test_pyramidkv_layer_budgets_fall_with_depth_and_add_up_to_the_total():
    press = make_press("pyramidkv:snapkv-d")
    for budget, n_layers in [(128, 32), (16, 3), (64, 7), (5, 4)]:
        budgets = press.layer_budgets(budget, n_layers)
        assert sum(budgets) == budget * n_layers and min(budgets) >= 1
        assert budgets == sorted(budgets, reverse=True)
    assert press.layer_budgets(128, 32)[0] == pytest.approx(128 * 1.95, abs=1)
    assert press.layer_budgets(128, 32)[-1] == pytest.approx(128 / 20, abs=1)
    assert make_press("pyramidkv:snapkv-d", {"beta": "1"}).layer_budgets(64, 7) == [64] * 7


def test_adakv_shares_a_layers_budget_among_its_heads_by_score():
    """Two heads, three entries each on average: six kept jointly, each head guaranteed its best alpha x 3."""
    scores = torch.tensor([[[9.0, 8, 7, 6, 5, 4], [0.1, 0.2, 0.3, 0.4, 0.5, 10]]])
    positions = torch.arange(6).expand(1, 2, 6)
    keep = torch.tensor([3])
    free = make_press("adakv:snapkv-d", {"alpha": "0"}).head_counts(scores, positions, keep)
    assert free.tolist() == [[5, 1]]  # 10 (head 1), then 9, 8, 7, 6, 5 (head 0)
    guarded = make_press("adakv:snapkv-d", {"alpha": "0.67"}).head_counts(scores, positions, keep)
    assert guarded.tolist() == [[4, 2]]  # head 1's best two (10, 0.5) are guaranteed
    scores[0, 0, 4:] = -math.inf  # invalid slots are never guaranteed nor chosen
    assert make_press("adakv:snapkv-d", {"alpha": "0.67"}).head_counts(scores, positions, keep).tolist() == [[4, 2]]
    # A row that is not compressing keeps every slot.
    assert make_press("adakv:snapkv-d").head_counts(scores, positions, torch.tensor([6])).sum() == 12
