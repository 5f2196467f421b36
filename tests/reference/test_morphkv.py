"""morphkv against MorphKV's own cache.

Source: ghadiaravi13/MorphKV @ 8903d2a (read with line numbers; transcribed without kvbench's press or its docs),
``morph_type`` ``max_fused`` / ``sum_fused``, ``evict_after`` 1 (``LongBench/pred_single.py`` line 37's default).

- ``morphkv/models/patch_llama.py`` lines 572-615 (``LlamaFlashAttention2Morph.forward``, the prefill): nothing is
  evicted (584-598); the last ``WIN_SIZE`` queries' raw logits ``q·kᵀ / sqrt(head_dim)`` over every prompt key,
  keys repeated to the query heads (522-524), no causal mask (581), are stored per query head as ``attn_cache``
  [QH, W, P + 1]: a prompt shorter than W gets -inf rows below (613-614), and a -inf column for the next token (615).
- lines 329-392 (``LlamaAttentionMorph.forward``, a one-token forward): the token is appended (329; ``morph_cache.py``
  419-422), its logits over the whole cache computed (332-335); if the cache now holds ``MAX_CAPACITY + 1`` or more
  (338) ``morphkv_mask`` runs *before* this forward's attention. Then the stored logits move up a row and the new
  row goes last (381-382, 388-390; while fewer than W queries were seen it fills the next row, 385-386), and a -inf
  column is added (392).
- lines 216-263 (``morphkv_mask``): the stored rows and the new row (225); the score of every entry but the last
  W + 1 is ``softmax`` over those candidates of each stored row (the new row excluded), fused over the W rows by
  ``max`` (235-237, 247-249) or ``sum`` (238-240, 250-252); ``topk(MAX_CAPACITY - WIN_SIZE)`` kept with the last
  W + 1 (241, 256). Per query head for the stored logits (247-256); under GQA (230-241) the KV heads' choice is
  made on the group's logits *summed* before the softmax (``scores.view(1, kv_heads, -1, ...).sum(dim=2)``), and
  ``cleanup`` gets the per-KV-head mask for the keys and values and the per-query-head mask for the stored logits
  (258-261). ``morph_cache.py`` lines 88-127 (``cleanup``): each selection keeps the cache's order (``nonzero``),
  so the cache stays in position order.

The source holds C + 1 entries after each such forward (C - W chosen, the W before it and itself); the entry
forward t + 1 drops is chosen with the W queries before it (t - W + 1 .. t), and its own key and query do not
enter (``test_new_token_does_not_choose``). ``source`` is that cache as the source runs it; ``reference`` is what
it holds after forward t + 1, less forward t + 1's token, as kvbench's kept set after forward t (a zero token stands
in after the last forward).

Claim: kvbench's ``morphkv`` (``window_size=W``, ``fusion=max|sum``) at ``--budget C`` evicts at the end of forward
t what MorphKV (``max_capacity=C``) evicts at the start of forward t + 1; a prompt longer than C is cut at the
prefill with the prompt's last W queries, as MorphKV cuts it at its first decoding forward. Found:

- MHA (group 1): identical kept sets at every forward with the source as written, both fusions, seeded
  (budget/window/prompt 16/4/10 and 16/4/24: shorter and longer than the budget; 20/8/5: shorter than the window;
  12/3/13: budget + 1; 16/4/16: the budget) and in situ (tiny llama, a 55-token prompt, 24/8: cut at the prefill;
  64/8): 12 runs, 674 compressions identical.
- GQA (groups 2, 7): difference 1 below; with it put in, 24 runs, 1,348 compressions identical.
- Further (not run here): seeds 0-39 x groups 1, 2, 7 x both fusions x 16/8/5, 16/4/16, 16/4/17, 24/6/12, 10/2/40
  (difference 1 put in): 1,199 of 1,200 runs identical at every forward (66,900 compressions); the other is
  difference 3. With repeated keys (``copies=0.3``, seeds 0-9, groups 1, 2, 7, both fusions, the five cases
  above) all 300 runs differ by difference 2; with it put in 267 are identical, and the other 33 (all group 7)
  first differ between copies of one key (difference 3) and are identical with ``dtype=float64`` as well.

Named differences, each asserted exactly and, put into the reference as an option, the only one:

1. GQA (``test_seeded``, ``test_in_situ``, groups 2 and 7): the source prunes the stored logits per *query* head
   (lines 247-256, 260; ``cleanup`` 120-127) and the keys per *KV* head (237-241). Both keep C + 1 columns, so
   nothing fails, but once some query head's own top-(C - W) differs from its group's, its stored rows' column j
   no longer holds the logit of the cache's entry j: the next choice sums and softmaxes misaligned logits (225,
   237). The first compression that drops agrees; the second differs in 23 of the 24 GQA cases here, the third
   in seeded 12/3/13 group 2 sum (``test_gqa_first_difference``: seeded 16/4/10 group 2 max, forward 8, layer 0,
   head 0, kvbench alone keeps [1], the source [4]; ``test_stored_logits``: the cause). kvbench scores the held
   entries' true logits; with ``gqa_attn="kv"`` (the stored logits pruned by the KV heads' choice, line 382 too)
   the kept sets are identical at every forward. MorphKV's own runs (Llama-3.1-8B, group 4) are in this case.
2. Exact ties (``test_exact_ties``): with repeated keys, kvbench keeps the newest of equal scores; CPU ``topk``
   (237, 249) here keeps the older (seed 0, group 1, max, 16/4/16: forward 2, layer 1, head 0, kvbench alone
   keeps [1], the source [0], the same key). With ``ties="newest"`` identical.
3. Float rounding at a near tie (``test_float_near_tie``): seed 39, group 1, sum, 16/4/16, forward 1, layer 0,
   head 0: positions 9 and 11 score 0.1603657305 both in the source's float32 order, 0.1603657555 and
   0.1603657528 in float64; kvbench keeps 9, the source's ``topk`` keeps 11. With ``dtype=float64`` identical.
   Under GQA the source's float32 logits of two copies of one key can differ in the last bit (the same q·k at
   another place of the matmul), so its choice among copies follows that rounding and not difference 2's order
   (``test_copies_rounding``: seed 2, group 7, max, 12/3/13, with ``ties="newest"``: forward 14, layer 0, head 0,
   kvbench alone keeps [19], the source [9], the same key); with ``dtype=float64`` too, identical.

Not shown by these float32 cases: the source scores in the model's dtype (bf16/fp16: ``softmax`` without a dtype,
237-252), kvbench in float32; the source divides by ``sqrt(head_dim)`` (335, 581), kvbench scales by the model's
attention scaling (the same for Llama).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from kvbench.presses import make_press
from tests.reference.harness import (
    GROUPS,
    Forward,
    assert_identical,
    compare,
    log,
    run_cache,
    synthetic_forwards,
    tiny_model,
    trace_model,
)

PROMPT = "Tom has 12 apples. He buys 7 more and eats 3. How many?"
INF = float("inf")


def logits(queries, keys, dtype):
    """Lines 332-335 / 522-524, 581: keys repeated to the query heads, ``q·kᵀ / sqrt(head_dim)``."""
    keys = keys.repeat_interleave(queries.shape[0] // keys.shape[0], dim=0)  # repeat_kv
    return torch.matmul(queries.to(dtype), keys.to(dtype).transpose(1, 2)) / math.sqrt(keys.shape[-1])


def keep_mask(scores, budget, window, fusion, ties):
    """``morphkv_mask`` lines 235-241 / 247-256 on scores [heads, W + 1, n]: which of the n entries stay."""
    probs = F.softmax(scores[:, -(window + 1):-1, :-(window + 1)], dim=-1)
    fused = probs.max(dim=1).values if fusion == "max" else probs.sum(dim=1)
    if ties == "topk":
        chosen = fused.topk(budget - window, dim=-1).indices
    else:  # not the source: equal scores ranked newest first (the cache is in position order)
        newest_first = fused.flip(-1).argsort(dim=-1, descending=True, stable=True)
        chosen = fused.shape[-1] - 1 - newest_first[:, :budget - window]
    keep = torch.zeros(scores.shape[0], scores.shape[-1], dtype=torch.bool).scatter_(-1, chosen, True)
    keep[:, -(window + 1):] = True  # lines 241, 256
    return keep


def prefill(keys, queries, window, dtype):
    """Lines 581, 612-615: the stored logits [QH, W, P + 1] after the prompt."""
    stored = logits(queries[:, -window:], keys, dtype)
    heads, _, p = stored.shape
    if p < window:  # 613-614: -inf rows below
        stored = torch.cat([stored, torch.full((heads, window - p, p), -INF, dtype=dtype)], dim=1)
    return torch.cat([stored[:, -window:], torch.full((heads, window, 1), -INF, dtype=dtype)], dim=-1)


def decode(state, forward, layer, budget, window, fusion, opts):
    """``LlamaAttentionMorph.forward`` (lines 329-392) with ``morphkv_mask`` and ``cleanup`` on one layer."""
    keys, positions, stored = state  # [H, L, D], [H, L], [QH, W, L + 1]
    assert forward.positions.numel() == 1
    kv_heads, dim = keys.shape[0], keys.shape[-1]
    keys = torch.cat([keys, forward.keys[layer]], dim=1)  # 329
    positions = torch.cat([positions, forward.positions.expand(kv_heads, 1)], dim=1)
    n, q_heads = keys.shape[1], stored.shape[0]
    row = logits(forward.queries[layer], keys, opts["dtype"])[:, 0]  # [QH, n]
    if n >= budget + 1:  # 338
        scores = torch.cat([stored, row[:, None]], dim=1)  # 225
        keep_attn = keep_mask(scores, budget, window, fusion, opts["ties"])  # 247-256
        keep_kv = keep_attn  # 261
        if q_heads != kv_heads:  # 230-241: the group's logits summed
            grouped = scores.view(kv_heads, -1, window + 1, n).sum(dim=1)
            keep_kv = keep_mask(grouped, budget, window, fusion, opts["ties"])
            if opts["gqa_attn"] == "kv":  # not the source: the stored logits pruned as the keys
                keep_attn = keep_kv.repeat_interleave(q_heads // kv_heads, dim=0)
        keys, positions = keys[keep_kv].view(kv_heads, -1, dim), positions[keep_kv].view(kv_heads, -1)  # 111-112
        stored = stored[keep_attn[:, None].expand_as(stored)].view(q_heads, window, -1)  # 125-127
        stored = torch.roll(stored, shifts=-1, dims=1)  # 381
        stored[:, -1] = row[keep_attn].view(q_heads, -1)  # 382
    elif n <= window:  # 385-386
        stored[:, n - 1] = row
    else:  # 388-390
        stored = torch.roll(stored, shifts=-1, dims=1)
        stored[:, -1] = row
    stored = torch.cat([stored, torch.full((q_heads, window, 1), -INF, dtype=stored.dtype)], dim=-1)  # 392
    return keys, positions, stored


def source(forwards, budget, window, fusion, gqa_attn="query", ties="topk", dtype=torch.float32):
    """kept[t][layer][head]: MorphKV's cache after forward t, as the source runs it. Not the source, for naming
    kvbench's differences: ``gqa_attn="kv"`` (difference 1), ``ties="newest"`` (2), ``dtype=float64`` (3)."""
    opts = {"gqa_attn": gqa_attn, "ties": ties, "dtype": dtype}
    states = [None] * forwards[0].layers
    kept = []
    for forward in forwards:
        for i, state in enumerate(states):
            if state is None:  # the prefill (LlamaFlashAttention2Morph.forward): nothing evicted
                keys = forward.keys[i]
                states[i] = (keys, forward.positions.expand(keys.shape[0], -1),
                             prefill(keys, forward.queries[i], window, dtype))
            else:
                states[i] = decode(state, forward, i, budget, window, fusion, opts)
        kept.append([[set(row.tolist()) for row in state[1]] for state in states])
    return kept


def reference(forwards, budget, window, fusion, **options):
    """kept[t]: the source's cache after forward t + 1, less forward t + 1's token (kvbench's forward t)."""
    last = forwards[-1]
    after = Forward(last.positions[-1:] + 1, torch.zeros_like(last.keys[:, :, -1:]),
                    torch.zeros_like(last.values[:, :, -1:]), torch.zeros_like(last.queries[:, :, -1:]), last.scaling)
    shifted = [*forwards[1:], after]
    history = source([*forwards, after], budget, window, fusion, **options)[1:]
    return [[[held - {int(f.positions[-1])} for held in layer] for layer in kept]
            for f, kept in zip(shifted, history, strict=True)]


def press(window, fusion):
    return make_press("morphkv", {"window_size": str(window), "fusion": fusion})


def check(kvbench, forwards, budget, window, fusion, prompt, case):
    """MHA: identical with the source. GQA: the source agrees at the first compression and differs at a later one
    (difference 1); with the stored logits pruned as the keys, identical."""
    expected = min(61, 60 + prompt - budget)  # compressions: every forward once kvbench holds more than C
    if forwards[0].group == 1:
        assert_identical(kvbench, reference(forwards, budget, window, fusion), forwards, "morphkv", case, expected)
        return
    agreement = compare(kvbench, reference(forwards, budget, window, fusion), forwards)
    log("morphkv", case, agreement)
    assert agreement.first_difference and agreement.identical >= 1, str(agreement)  # the first one agrees
    assert_identical(kvbench, reference(forwards, budget, window, fusion, gqa_attn="kv"), forwards,
                     min_compressions=expected)


#: budget, window, prompt: shorter than the budget, longer, shorter than the window, budget + 1, the budget.
CASES = [(16, 4, 10), (16, 4, 24), (20, 8, 5), (12, 3, 13), (16, 4, 16)]


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("fusion", ["max", "sum"])
@pytest.mark.parametrize(("budget", "window", "prompt"), CASES)
def test_seeded(group, fusion, budget, window, prompt):
    forwards = synthetic_forwards(group, group=group, prompt=prompt)
    kvbench = run_cache(press(window, fusion), budget, forwards)
    check(kvbench, forwards, budget, window, fusion, prompt,
          f"seeded group {group} {fusion} budget {budget} window {window} prompt {prompt}")


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize(("fusion", "budget", "window"), [("max", 24, 8), ("sum", 64, 8)])
def test_in_situ(group, fusion, budget, window):
    """A 55-token prompt: longer than 24 (cut at the prefill), shorter than 64."""
    model, tokenizer = tiny_model(group)
    prompt = tokenizer(PROMPT)["input_ids"]
    forwards, kept = trace_model(model, prompt, press(window, fusion), budget, max_new_tokens=61)
    assert len(prompt) == 55 and len(forwards) == 61
    check(kept, forwards, budget, window, fusion, len(prompt),
          f"tiny-llama group {group} {fusion} budget {budget} window {window}")


def test_gqa_first_difference():
    """Difference 1, one case exactly."""
    forwards = synthetic_forwards(2, group=2, prompt=10)
    agreement = compare(run_cache(press(4, "max"), 16, forwards), reference(forwards, 16, 4, "max"), forwards)
    assert agreement.first_difference == ("forward 8, layer 0, head 0: kvbench alone keeps [1], the reference "
                                          "alone [4] (of 16 and 16)")


@pytest.mark.parametrize(("group", "gqa_attn", "aligned"), [(1, "query", True), (2, "query", False), (2, "kv", True)])
def test_stored_logits(group, gqa_attn, aligned):
    """The cause of difference 1: after compressions that dropped, a stored logit at column j is the logit of the
    cache's entry j (-inf where the entry is newer than the row's query) under MHA, not under the source's GQA."""
    forwards = synthetic_forwards(4, group=group, prompt=10, steps=20)
    opts = {"gqa_attn": gqa_attn, "ties": "topk", "dtype": torch.float32}
    first = forwards[0]
    state = (first.keys[0], first.positions.expand(2, -1), prefill(first.keys[0], first.queries[0], 4, torch.float32))
    for forward in forwards[1:]:
        state = decode(state, forward, 0, 12, 4, "max", opts)
    keys, positions, stored = state
    rows = forwards[-4:]  # the W queries whose logits are stored, oldest first
    expected = logits(torch.cat([f.queries[0] for f in rows], dim=1), keys, torch.float32)
    seen = positions.repeat_interleave(group, dim=0)[:, None, :] <= torch.cat([f.positions for f in rows])[:, None]
    assert torch.isinf(stored[:, :, :-1][~seen]).all()
    assert torch.allclose(stored[:, :, :-1][seen], expected[seen]) == aligned


def test_exact_ties():
    """Difference 2: repeated keys tie exactly; the first difference is between two copies of one key."""
    forwards = synthetic_forwards(0, group=1, prompt=16, copies=0.3)
    kvbench = run_cache(press(4, "max"), 16, forwards)
    agreement = compare(kvbench, reference(forwards, 16, 4, "max"), forwards)
    assert agreement.first_difference == ("forward 2, layer 1, head 0: kvbench alone keeps [1], the reference "
                                          "alone [0] (of 16 and 16)")
    keys = torch.cat([f.keys for f in forwards], dim=2)[1, 0]
    assert torch.equal(keys[0], keys[1])
    assert_identical(kvbench, reference(forwards, 16, 4, "max", ties="newest"), forwards, min_compressions=60)


def test_float_near_tie():
    """Difference 3: a tie in the source's float32 order that float64 breaks the way kvbench does."""
    forwards = synthetic_forwards(39, group=1, prompt=16)
    kvbench = run_cache(press(4, "sum"), 16, forwards)
    agreement = compare(kvbench, reference(forwards, 16, 4, "sum"), forwards)
    assert agreement.first_difference == ("forward 1, layer 0, head 0: kvbench alone keeps [9], the reference "
                                          "alone [11] (of 16 and 16)")
    keys, queries = (torch.cat([getattr(f, name) for f in forwards], dim=2)[0, 0].double()
                     for name in ("keys", "queries"))
    score = F.softmax(queries[13:17] @ keys[:13].T / math.sqrt(8), dim=-1).sum(dim=0)  # window 13..16
    assert 0 < (score[9] - score[11]) / score[9] < 2**-24 and score.argmin() == 11
    assert_identical(kvbench, reference(forwards, 16, 4, "sum", dtype=torch.float64), forwards, min_compressions=60)


def test_copies_rounding():
    """Difference 3 among copies of one key: the source's float32 rounding, not a tie order, picks the copy."""
    forwards = synthetic_forwards(2, group=7, prompt=13, copies=0.3)
    kvbench = run_cache(press(3, "max"), 12, forwards)
    agreement = compare(kvbench, reference(forwards, 12, 3, "max", gqa_attn="kv", ties="newest"), forwards)
    assert agreement.first_difference == ("forward 14, layer 0, head 0: kvbench alone keeps [19], the reference "
                                          "alone [9] (of 12 and 12)")
    keys = torch.cat([f.keys for f in forwards], dim=2)[0, 0]
    assert torch.equal(keys[9], keys[19])
    assert_identical(kvbench, reference(forwards, 12, 3, "max", gqa_attn="kv", ties="newest", dtype=torch.float64),
                     forwards, min_compressions=61)


def test_new_token_does_not_choose():
    """The source's choice at forward t + 1 holds C + 1 entries, itself and the W before it, and does not depend on
    forward t + 1's key and query (what ``reference``'s stand-in after the last forward relies on)."""
    forwards = synthetic_forwards(3, group=2, prompt=10, steps=20)
    kept = source(forwards, 12, 4, "sum")
    g = torch.Generator().manual_seed(1)
    for t in (3, 8, 20):
        f = forwards[t]
        other = Forward(f.positions, torch.randn(f.keys.shape, generator=g), f.values,
                        torch.randn(f.queries.shape, generator=g), f.scaling)
        assert source([*forwards[:t], other], 12, 4, "sum")[t] == kept[t]
        for heads in kept[t]:
            assert all(len(held) == 13 and set(range(t + 5, t + 10)) <= held for held in heads)


def test_control():
    """The comparison can fail: the other fusion, and the source's own (unshifted) history."""
    forwards = synthetic_forwards(1, group=1, prompt=10)
    kvbench = run_cache(press(4, "max"), 16, forwards)
    assert compare(kvbench, reference(forwards, 16, 4, "sum"), forwards).first_difference
    assert compare(kvbench, source(forwards, 16, 4, "max"), forwards).first_difference
    assert compare(kvbench, reference(forwards, 16, 4, "max"), forwards).first_difference is None
