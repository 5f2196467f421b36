"""The paper's harness's presses: each bug-compatible ``hott-*`` press reproduces its defect on a hand-made
example or against a list-based simulation of the fork's code; the ``-fixed`` presses are the fork's parameters."""

import pytest
import torch

from kvbench.engine.generate import GenerationSettings, generate
from kvbench.engine.view import QueryWindow, SlotView
from kvbench.presses import make_press
from kvbench.presses.source_order import STATE
from tests.conftest import prompt_ids


def view_of(positions, keys=None, state=None, budget=3, step=1, layers=1, window=None, attention=None):
    """A hand-made view: rows = layers (batch 1), one KV head, every slot valid."""
    positions = torch.tensor(positions).view(layers, 1, -1)
    n, _, s = positions.shape
    keys = torch.randn(n, 1, s, 4) if keys is None else keys
    return SlotView(
        keys=keys, values=torch.zeros_like(keys), positions=positions, valid=torch.ones(n, 1, s, dtype=torch.bool),
        state={k: v.view(n, 1, s).clone().float() for k, v in (state or {}).items()},
        query_position=positions.amax(dim=(1, 2)), budget=budget, step=step, layers=layers,
        prompt_length=torch.full((n,), 3), window=window,
        attention_override=None if attention is None else (lambda gqa: attention.view(n, 1, s)),
    )


# --- StreamingLLM: the index rule over topk's tie order ------------------------------------------------------------


def fork_streaming_llm(prompt_length, steps, budget, n_sink=4):
    """The fork's cache as a list of positions: its scores by index, its topk, its gather (float32 on the CPU)."""
    cache, history = list(range(prompt_length)), []
    if prompt_length > budget:
        scores = torch.ones(prompt_length)
        scores[n_sink:n_sink + prompt_length - budget] = 0
        cache = [cache[i] for i in scores.topk(budget).indices.tolist()]
    history.append(set(cache))
    for t in range(1, steps):
        cache.append(prompt_length + t - 1)
        if len(cache) > budget:
            scores = torch.zeros(len(cache))
            scores[:n_sink] = 1
            scores[-(budget - n_sink):] = 1
            cache = [cache[i] for i in scores.topk(budget).indices.tolist()]
        history.append(set(cache))
    return history


@pytest.mark.parametrize("budget", [12, 40])
def test_hott_streaming_llm_keeps_what_the_forks_list_keeps(tiny_llama, budget):
    model, tokenizer = tiny_llama
    prompt = prompt_ids(tokenizer)[:30]
    kept = []
    generate(model, [prompt], make_press("hott-streaming_llm"), budget, GenerationSettings(max_new_tokens=60),
             on_step=lambda cache, t: kept.append(cache.kept_positions(0)))
    fork = fork_streaming_llm(len(prompt), len(kept), budget)
    for step, layers in enumerate(kept):
        assert all(head == fork[step] for layer in layers for head in layer), step
    # the defect: on the CPU the kept set stops being the sinks and the most recent tokens
    streaming = [set(range(4)) | set(range(len(prompt) + t - budget + 4, len(prompt) + t)) for t in range(len(kept))]
    assert any(fork[t] != streaming[t] for t in range(len(kept)) if len(prompt) + t > budget)


# --- H2O: one accumulator for every layer, in bf16 -------------------------------------------------------------


def test_hott_h2o_layer_scores_carry_the_previous_layers_attention_to_other_tokens():
    press = make_press("hott-h2o", {"state_dtype": "float32"})
    # after the prefill (3 tokens) each layer holds its own accumulator; a 4th token arrives
    state = {STATE: torch.zeros(2, 4), "accumulated": torch.tensor([[.5, .3, .2, 0], [.1, .6, .3, 0]]),
             "count": torch.tensor([[3., 2, 1, 0], [3, 2, 1, 0]]), "keep": torch.zeros(2, 4)}
    attention = torch.tensor([[.1, .2, .3, .4], [.4, .3, .2, .1]]).view(2, 1, 4)
    view = view_of([[0, 1, 2, 3], [0, 1, 2, 3]], state=state, layers=2)
    press.observe(view, attention)
    layer0 = view.state["accumulated"][0, 0]
    # layer 0 adds its attention to what the LAST layer left, index by index
    torch.testing.assert_close(layer0, torch.tensor([.2, .8, .6, .4]))
    # layer 0: scores .2/4, .8/3, .6/2, .4/1 -> keeps by topk order: pos 3 (.4), 2 (.3), 1 (.27); evicts pos 0
    assert press.score(view)[0, 0].tolist()[0] == -torch.inf
    order0 = view.state[STATE][0, 0].tolist()  # fork index + 1 of each slot after layer 0's compression
    assert order0[1:] == [3.0, 2.0, 1.0]
    # layer 1 adds to layer 0's reordered accumulator: its index 0 (token 0) gets layer 0's index 0 (token 3)
    layer1 = view.state["accumulated"][1, 0]
    torch.testing.assert_close(layer1, torch.tensor([.4 + .4, .3 + .6, .2 + .8, .1]))
    # per-layer H2O (what the fork meant) would give token 0 of layer 1 only its own .1 + .4
    assert float(layer1[0]) != pytest.approx(.5)


def test_hott_h2o_bf16_state_stops_counting_and_accumulating():
    press = make_press("hott-h2o")  # bf16, as under torch_dtype="auto" for the paper's models
    state = {STATE: torch.zeros(2, 3), "accumulated": torch.tensor([[1., 1, 0], [1., 1, 0]]),
             "count": torch.tensor([[256., 300, 0], [256, 300, 0]]), "keep": torch.zeros(2, 3)}
    attention = torch.full((2, 1, 3), 0.002)
    view = view_of([[0, 1, 2], [0, 1, 2]], state=state, layers=2, budget=5)
    press.observe(view, attention)
    assert view.state["count"][0, 0, :2].tolist() == [256.0, 300.0]  # 257 and 301 are not bf16 numbers
    assert view.state["accumulated"][0, 0, :2].tolist() == [1.0, 1.0]  # 1 + 0.002 rounds back to 1
    float32 = make_press("hott-h2o", {"state_dtype": "float32"})
    view = view_of([[0, 1, 2], [0, 1, 2]], state=state, layers=2, budget=5)
    float32.observe(view, attention)
    assert view.state["count"][0, 0, 0] == 257 and view.state["accumulated"][0, 0, 0] > 1.0


# --- SnapKV-D: the current query, and a window of cache indices ------------------------------------------------


def window_view(fork_state, queries):
    """6 slots (positions 0-5, slot 5 just written), budget 5, a 2-query window at positions 4 and 5."""
    keys = torch.randn(1, 1, 6, 4, generator=torch.Generator().manual_seed(1))
    window = QueryWindow(queries=queries, positions=torch.tensor([[4, 5]]), valid=torch.ones(1, 2, dtype=torch.bool),
                         scaling=0.5)
    return view_of([0, 1, 2, 3, 4, 5], keys=keys, state={STATE: torch.tensor(fork_state)}, budget=5, window=window)


def test_hott_snapkv_d_decodes_with_the_current_query_and_protects_the_last_cache_indices():
    press = make_press("hott-snapkv-d", {"window_size": "2", "kernel_size": "1"})
    queries = torch.randn(1, 1, 2, 4, generator=torch.Generator().manual_seed(2))
    # the fork's cache order after earlier compressions: positions 3, 0, 4, 1, 2 (state = index + 1), then 5
    fork_state = [2.0, 4, 5, 1, 3, 0]
    scores = press.score(window_view(fork_state, queries))
    other = queries.clone()
    other[0, 0, 0] += 5.0  # the older window query: the fork's decoding path never sees it
    assert torch.equal(press.score(window_view(fork_state, other)), scores)
    # the "window" is the last 2 cache indices (positions 2 and 5), not the 2 newest positions (4 and 5)
    view = window_view(fork_state, queries)
    attention = torch.softmax(view.keys[0, 0] @ queries[0, 0, 1] * 0.5, dim=-1)
    prefix = [3, 0, 4, 1]  # positions at cache indices 0-3
    evicted = min(prefix, key=lambda p: float(attention[p]))
    assert scores[0, 0].tolist()[evicted] == -torch.inf
    assert all(scores[0, 0, p] > 0 for p in (2, 5))


# --- R-KV: the sign, and the cadence ----------------------------------------------------------------------------


def test_hott_rkv_keeps_the_most_redundant_keys_where_rkv_keeps_the_least():
    copy, unique, window = [1., 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]
    keys = torch.tensor([copy, copy, copy, unique, window]).view(1, 1, 5, 4)
    args = {"window_size": "1", "buffer": "2"}
    # a zero query attends uniformly: importance ties, redundancy decides
    zero_query = QueryWindow(torch.zeros(1, 1, 1, 4), torch.tensor([[4]]), torch.ones(1, 1, dtype=torch.bool), 1.0)
    fork = make_press("hott-rkv", args).score(view_of([0, 1, 2, 3, 4], keys=keys, state={STATE: torch.zeros(5)},
                                                      window=zero_query))
    kept = {p for p in range(5) if fork[0, 0, p] > -torch.inf}
    assert 3 not in kept and 4 in kept and len(kept) == 3  # the unique key goes, two copies stay
    fixed = make_press("hott-rkv-fixed", args).score(view_of([0, 1, 2, 3, 4], keys=keys, window=zero_query))[0, 0]
    # R-KV's sign: the unique key outranks the copies
    assert fixed[3] > fixed[0] and fixed[3] > fixed[1] and fixed[3] >= fixed[2]


def test_hott_presses_hold_their_cadence(tiny_llama):
    model, tokenizer = tiny_llama
    for name, budget, most in (("hott-rkv", 20, 20 + 65 - 1), ("hott-h2o", 20, 20), ("hott-rkv-fixed", 20, 20 + 63)):
        held = []
        generate(model, [prompt_ids(tokenizer)[:15]], make_press(name), budget,
                 GenerationSettings(max_new_tokens=150),
                 on_step=lambda cache, t, held=held: held.append(int(cache.valid[0, 0, 0].sum())))
        assert max(held) == most and held[-1] <= most, name


def test_fixed_variants_are_the_forks_parameters():
    assert make_press("hott-h2o-fixed").params() == {**make_press("h2o").params(), "recent_ratio": 0.0,
                                                     "normalize": True}
    assert make_press("hott-snapkv-d-fixed").window_size == 64
    rkv = make_press("hott-rkv-fixed")
    assert (rkv.buffer, rkv.kernel_size, rkv.window_size, rkv.mix_lambda) == (64, 5, 8, 0.1)


# --- KNorm: exact norms in the keys' dtype, topk's order ----------------------------------------------------------


def test_hott_knorm_ranks_exact_norms_where_knorm_rounds_them_to_a_tie():
    # two norms 2 float32 steps apart (seen on the embedded model's layer 0) and a small one; budget 2 at the prefill
    keys = torch.zeros(1, 1, 3, 4)
    keys[0, 0, :, 0] = torch.tensor([14.9573946, 14.9573965, 1.0])
    state = {STATE: torch.zeros(1, 3)}
    scores = make_press("hott-knorm").score(view_of([0, 1, 2], keys=keys, state=state, budget=2, step=0))[0, 0]
    assert scores[1] == -torch.inf and scores[0] > -torch.inf and scores[2] > -torch.inf  # the larger norm goes
    rounded = make_press("knorm").score(view_of([0, 1, 2], keys=keys, budget=2, step=0))[0, 0]
    assert rounded[0] == rounded[1]  # knorm: a tie, which its engine gives to the newest (position 1)
    # in bfloat16 keys the fork's norms are bfloat16: these two tie, and topk's order decides
    bf16 = make_press("hott-knorm").score(view_of([0, 1, 2], keys=keys.bfloat16(), state=state, budget=2, step=0))
    fork = (-keys.bfloat16().norm(dim=-1))[0, 0].topk(2).indices.tolist()
    assert sorted(i for i in range(3) if bf16[0, 0, i] > -torch.inf) == sorted(fork)
