"""hott-snapkv-d against the paper's harness: the fork's SnapKV press run through decoding with eager attentions.

Source: minghui-liu/kvpress @ 43d9e37 (the paper's kvpress fork).
- ``kvpress/presses/base_press.py`` lines 188-281 (``forward_hook``): after each attention layer's forward,
  ``is_prefilling = cache_position[-1] <= q_len`` (215); the prefill calls ``compress_prefilling``, every decoding
  step ``compress_decoding`` (232-235), with ``output[1]`` (the eager attention weights) as ``attentions``.
- ``kvpress/presses/scorer_press.py`` lines 47-102: prefill compresses when ``q_len > cache_budget`` (61),
  decoding when the cache (new token appended at its end by ``DynamicCache.update``) holds more than
  ``cache_budget`` (89-91); both keep ``scores.topk(cache_budget).indices`` and ``gather`` keys and values by them
  (67-72, 96-101), so the cache's physical order after a compression is topk's order (descending score, ties as
  topk leaves them).
- ``kvpress/presses/snapkv_press.py`` lines 66-99 (``SnapKVPress.score``, ``window_size=64``, ``kernel_size=5``):
  ``attentions[..., -window:, :-window]`` (83): at the prefill the last ``window`` prompt queries' causal attention,
  in decoding the ONE row of the current query (eager attention returns ``[b, heads, 1, kv_len]``) over the cache's
  physical slots minus the last ``window`` cache indices; mean over the rows (89), ``avg_pool1d(kernel 5, padding 2,
  count_include_pad)`` along the physical order (90), mean over the GQA group (93-94), the last ``window`` cache
  indices padded with ``scores.max()``, the maximum over every head of the layer (97).
- SnapKV is not in ``reason/evaluate.py``'s ``PRESS_DICT`` at 43d9e37; run by hand, its decoding path works only with
  ``attn_implementation="eager"`` (the hook's ``output[1]`` is then the weights; without them
  ``compute_window_attention`` views the one decoding token's query as 64 rows and raises), so that is the path
  transcribed here.

The attention weights are the eager attention's (transformers ``eager_attention_forward``: ``matmul(q, repeat_kv(k))
* scaling`` plus the causal mask, softmax in float32, cast back to the query dtype); every op here runs in the
inputs' dtype, as the fork's ran in its model's (bf16 in the paper): ``test_seeded_bf16`` replays bfloat16 inputs,
where rounding makes equal scores frequent, and ``test_seeded_ties`` repeated keys (exact ties in float32). At
``window = budget = 64`` the decoding prefix is one entry, so all 65 scores are equal and ``topk``'s tie order alone
decides which entry goes.

kvbench's ``hott-snapkv-d`` (the fork's SnapKV decoding path, simulated in the fork's physical order, ``topk`` run on
scores laid out in that order) is compared with its defaults (window 64, kernel 5) and with a smaller window (8) so
that small budgets are exercised: the fork's rule needs ``kv_len > window`` (snapkv_press.py:80), i.e. ``budget >=
window`` (kvbench refuses a smaller budget). Identical kept sets everywhere. Named differences, none in the kept
sets: kvbench's own attention output is SDPA's, the fork's eager (the same probabilities up to rounding, so a real
generation can drift by a token); the fork ran one sequence at a time (its ``scores.max()`` pad is over the layer's
heads; kvbench's is over each sequence's); ``topk``'s tie order is the device's own, on either side.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from kvbench.presses import make_press
from tests.reference.harness import GROUPS, assert_identical, run_cache, synthetic_forwards, tiny_model, trace_model


def eager_attention(queries, keys, scaling, positions_q=None, positions_k=None):
    """transformers' eager attention weights [1, Hq, n, S]: ``queries`` [1, Hq, n, D] over ``keys`` [1, H, S, D]
    (``repeat_kv``), masked causally by positions when given (the prefill's causal mask), softmax in float32."""
    group = queries.shape[1] // keys.shape[1]
    logits = torch.matmul(queries, keys.repeat_interleave(group, dim=1).transpose(2, 3)) * scaling
    if positions_q is not None:
        future = positions_k.repeat_interleave(group, dim=1)[:, :, None, :] > positions_q[None, None, :, None]
        logits = logits.masked_fill(future, torch.finfo(logits.dtype).min)
    return torch.softmax(logits, dim=-1, dtype=torch.float32).to(queries.dtype)


def snapkv_score(attentions, window, kernel, group):
    """``SnapKVPress.score`` (snapkv_press.py:77-97) given eager ``attentions`` [1, Hq, rows, S] laid out in the
    cache's physical order: [1, H, S] scores in that order."""
    bsz, heads_q, _, kv_len = attentions.shape
    assert kv_len > window, "Query length should be greater than the window size"  # :80
    attn_weights = attentions[..., -window:, :-window]  # :83
    scores = attn_weights.mean(dim=-2)  # :89
    scores = F.avg_pool1d(scores, kernel_size=kernel, padding=kernel // 2, stride=1)  # :90
    scores = scores.view(bsz, heads_q // group, group, kv_len - window).mean(2)  # :93-94
    return F.pad(scores, (0, window), value=scores.max().item())  # :97


def append(cache, forward, layer):
    """``DynamicCache.update``: the forward's keys appended at the end of the layer's cache, per KV head (the
    positions are carried beside the keys)."""
    keys = forward.keys[layer][None]
    positions = forward.positions[None, None].expand(1, keys.shape[1], -1)
    if cache is None:
        return keys, positions
    return torch.cat([cache[0], keys], dim=2), torch.cat([cache[1], positions], dim=2)


def is_prefill(forward):
    """base_press.py:213-215: ``cache_position[-1] <= q_len``."""
    return int(forward.positions[-1]) <= forward.positions.numel()


def compress(keys, positions, budget, scores, ties="topk"):
    """scorer_press.py:67-72 / 96-101: ``topk(cache_budget)`` indices, keys (and positions) gathered by them: the
    cache's new physical order is topk's. ``ties="newest"`` (not the fork's: kvbench's engine's rule, for naming
    that difference) ranks exactly equal scores newest first instead of in topk's order."""
    if ties == "newest":
        newest_first = positions.argsort(dim=-1, descending=True, stable=True)
        by_score = scores.gather(-1, newest_first).argsort(dim=-1, descending=True, stable=True)
        indices = newest_first.gather(-1, by_score)[..., :budget]
    else:
        indices = scores.topk(budget, dim=-1).indices
    keys = keys.gather(2, indices[..., None].expand(-1, -1, -1, keys.shape[-1])).contiguous()
    return keys, positions.gather(2, indices)


def fork_cache_step(cache, forward, layer, budget, score_fn, ties="topk"):
    """One layer's hook for one forward of a ``ScorerPress``: append, then ``compress_prefilling`` (when the prompt
    is longer than the budget, scorer_press.py:60-62) or ``compress_decoding`` (when the cache is, :89-91)."""
    keys, positions = append(cache, forward, layer)
    prefill = is_prefill(forward)
    length = forward.positions.numel() if prefill else keys.shape[2]
    if budget >= length:
        return keys, positions
    return compress(keys, positions, budget, score_fn(keys, positions, prefill), ties)


def run_fork(forwards, budget, make_score, ties="topk"):
    """The fork's caches over ``forwards``: ``make_score(forward, layer)`` returns the layer's score function."""
    caches = [None] * forwards[0].layers
    kept = []
    for forward in forwards:
        for layer in range(forward.layers):
            caches[layer] = fork_cache_step(caches[layer], forward, layer, budget, make_score(forward, layer), ties)
        kept.append([[set(cache[1][0, h].tolist()) for h in range(cache[1].shape[1])] for cache in caches])
    return kept


def bf16(forwards):
    """The same forwards in bfloat16, the paper's models' dtype: the fork's scores are rounded at every op, so
    equal scores (and topk's order among them) are frequent."""
    return [dataclasses.replace(f, keys=f.keys.bfloat16(), values=f.values.bfloat16(), queries=f.queries.bfloat16())
            for f in forwards]


def reference(forwards, budget, window=64, kernel=5):
    """The fork's SnapKV with eager attentions: the hook's ``output[1]`` is the layer's attention of this forward's
    queries over the cache just updated (causal at the prefill; one row, nothing masked, in decoding)."""

    def make_score(forward, layer):
        def score(keys, positions, prefill):
            queries = forward.queries[layer][None]
            mask = (forward.positions, positions) if prefill else (None, None)
            attentions = eager_attention(queries, keys, forward.scaling, *mask)
            return snapkv_score(attentions, window, kernel, forward.group)

        return score

    return run_fork(forwards, budget, make_score)


PRESS = "hott-snapkv-d"
#: (window, budget) pairs: the small window exercises small budgets; (64, 64) and (64, 80) the fork's own window.
SEEDED = [(8, 12), (8, 30), (64, 64), (64, 80)]


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize(("window", "budget"), SEEDED)
def test_seeded(group, window, budget):
    prompt = 24 if window == 8 else 72
    forwards = synthetic_forwards(group, group=group, prompt=prompt, steps=60)
    press = make_press(PRESS, {"window_size": window})
    assert_identical(run_cache(press, budget, forwards), reference(forwards, budget, window), forwards, PRESS,
                     f"seeded group {group} window {window} budget {budget}")


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize(("window", "budget"), [(8, 12), (64, 80)])
def test_seeded_bf16(group, window, budget):
    forwards = bf16(synthetic_forwards(group, group=group, prompt=24 if window == 8 else 72, steps=60))
    press = make_press(PRESS, {"window_size": window})
    assert_identical(run_cache(press, budget, forwards), reference(forwards, budget, window), forwards, PRESS,
                     f"seeded bf16 group {group} window {window} budget {budget}")


@pytest.mark.parametrize("group", GROUPS)
def test_seeded_ties(group):
    """Repeated keys: exact ties in the scores, so topk's tie order on the fork's layout is exercised."""
    forwards = synthetic_forwards(group + 10, group=group, prompt=24, steps=60, copies=0.5)
    press = make_press(PRESS, {"window_size": 8})
    assert_identical(run_cache(press, 16, forwards), reference(forwards, 16, 8), forwards, PRESS,
                     f"seeded copies group {group} window 8 budget 16")


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize(("window", "budget"), [(8, 20), (64, 64)])
def test_in_situ(group, window, budget):
    model, tokenizer = tiny_model(group)
    prompt = tokenizer("Tom has 12 apples. He buys 7 more. How many? " * (1 if window == 8 else 5))["input_ids"]
    press = make_press(PRESS, {"window_size": window})
    forwards, kept = trace_model(model, prompt, press, budget, max_new_tokens=60)
    assert_identical(kept, reference(forwards, budget, window), forwards, PRESS,
                     f"tiny-llama group {group} window {window} budget {budget}")
