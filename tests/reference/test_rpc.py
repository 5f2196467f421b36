"""rpc against Reasoning Path Compression's own cache.

Source: jiwonsong-dev/ReasoningPathCompression @ 00e64b7.

- ``rpc/qwen2_custom.py`` lines 89-128, ``Qwen2RPCAttention.forward``: the prefill (``q_len > 1``) keeps the whole
  prompt and sets ``prompt_len`` and ``num_comp = 0`` (123-128). At every decoding forward, before appending,
  ``target_length = cache length - prompt_len - num_comp * T - R`` (93); the query is cached as a selector when
  ``target_length > P - R`` (95-97); when ``target_length == P - 1`` the token is appended, ``compress_kv`` runs
  and ``num_comp`` grows by one (99-114); otherwise the token is appended (116-121). ``T = int(P / c)``
  (``rpc_utils.py`` 29, 70).
- ``rpc/rpc_utils.py`` lines 94-171, ``RPCCluster.compress_kv``: the selectors are the cached queries *and the
  current query again* (96-98; the current query was already cached at 95-97, so the last ``R - 1`` queries select,
  the newest counted twice); ``softmax(q·k / sqrt(d))`` in float32 over the keys between the prompt and the last
  ``R`` (109-112), summed over the selectors (113); ``aggregation="all"``: the mean over *every* query head of the
  layer, one score row for all KV heads (115-123); ``"group"``: the mean over each KV head's group (125-133);
  ``avg_pool1d(kernel_size=7, padding=3)`` (zero padding counted, 135-136); ``topk((num_comp + 1) * T)`` sorted by
  index (142); the new cache is the prompt, the kept entries in token order, then the last ``R`` (147-168).
- ``scripts/run_aime24.sh``: ``P=1024, R=32, c=4, selectors=recent, aggregation=all`` (and P=4096); the pooling
  defaults (``avgpool``, 7) come from ``eval/generate_answers/infer_hf.py`` 31-32.

Source behaviour outside what is transcribed (noted, not reproduced): ``rpc/llama_custom.py`` 81 reads
``self.kv_cluster.num_residual_tokens``, which ``RPCCluster`` never defines, so RPC's Llama path fails at the first
decoding step; only the Qwen2 path runs. ``run_aime24.sh`` decodes batches of 8 left-padded prompts, so
``prompt_len`` there is the padded length, the same for the whole batch.

kvbench's ``rpc`` at its defaults (``schedule=growth`` with ``--budget`` = P, ``ratio`` = c = 4,
``query_weights=rpc``, ``aggregation=all``, avg pooling, kernel 7) and ``window_size`` = R is RPC's rule: identical
kept sets in every case below (small P and R so that several compressions fall within a short run). Named
variants, asserted to differ from the source: ``query_weights=uniform`` (kvbench's revision 2: each of the last R
queries once) and ``schedule=budget`` (bounded by the budget, prompt included). Differences the float32 cases here
cannot show, named in the press's docstring: RPC sums and pools in the model's dtype (bf16), kvbench in float32,
and equal scores are kept newest first where RPC takes ``topk``'s order; the logit scaling is the model's (RPC:
``1/sqrt(head_dim)``).
"""

import math

import pytest
import torch
import torch.nn.functional as F

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


def compress_kv(keys, positions, selectors, prompt_len, num_comp, T, R, aggregation, kernel_size):
    """``RPCCluster.compress_kv`` (rpc_utils.py 94-171) on one layer: ``keys`` [1, H, S, D], ``positions`` [1, H, S]
    standing in for the values, ``selectors`` [1, H_q, n, D]. Returns the new keys and positions."""
    groups = selectors.shape[1] // keys.shape[1]
    key_states = keys.repeat_interleave(groups, dim=1)  # repeat_kv, 38-48
    head_dim = selectors.shape[-1]
    attn_weights = torch.matmul(selectors, key_states.transpose(2, 3)) / math.sqrt(head_dim)  # 109
    attn_weights = F.softmax(attn_weights[:, :, :, prompt_len:-R], dim=-1, dtype=torch.float32).to(selectors.dtype)
    attn_weights_sum = attn_weights.sum(dim=-2)  # 113
    if aggregation == "all":  # 115-121: every query head of the layer, one row
        attn_weights_sum = attn_weights_sum.view(attn_weights_sum.shape[0], -1, 1, attn_weights_sum.shape[-1])
        attn_weights_sum = attn_weights_sum.mean(dim=-3)
    else:  # "group", 125-131
        attn_weights_sum = attn_weights_sum.view(attn_weights_sum.shape[0], -1, groups, attn_weights_sum.shape[-1])
        attn_weights_sum = attn_weights_sum.mean(dim=-2)
    attn_cache = F.avg_pool1d(attn_weights_sum, kernel_size=kernel_size, padding=kernel_size // 2, stride=1)
    indices = attn_cache.topk((num_comp + 1) * T, dim=-1, largest=True).indices.sort(dim=-1).values  # 142
    indices = indices.expand(-1, keys.shape[1], -1)  # 143: one row for every KV head under "all"
    new_keys = torch.cat([keys[:, :, :prompt_len], keys[:, :, prompt_len:-R].gather(
        2, indices[..., None].expand(-1, -1, -1, head_dim)), keys[:, :, -R:]], dim=2)  # 148-167
    new_positions = torch.cat([positions[:, :, :prompt_len], positions[:, :, prompt_len:-R].gather(2, indices),
                               positions[:, :, -R:]], dim=2)
    return new_keys, new_positions


def reference(forwards, P, R, c=4, aggregation="all", kernel_size=7):
    """RPC's cache over ``forwards`` (selectors ``recent``): each layer's positions after every forward."""
    T = int(P / c)
    n_layers, heads = forwards[0].layers, forwards[0].keys.shape[1]
    caches = [None] * n_layers
    state = [{"prompt_len": 0, "num_comp": 0, "cached_recent": None} for _ in range(n_layers)]
    kept = []
    for forward in forwards:
        for i in range(n_layers):
            keys = forward.keys[i][None]
            positions = forward.positions[None, None].expand(1, heads, -1)
            query = forward.queries[i][None]
            s = state[i]
            if keys.shape[2] > 1:  # the prefill, 123-128
                caches[i] = (keys, positions)
                s["prompt_len"], s["num_comp"] = keys.shape[2], 0
                continue
            old_keys, old_positions = caches[i]
            target_length = old_keys.shape[2] - s["prompt_len"] - s["num_comp"] * T - R  # 93
            if target_length > P - R:  # 95-97, cache_recent (rpc_utils.py 88-92)
                s["cached_recent"] = query if s["cached_recent"] is None else torch.cat(
                    [s["cached_recent"], query], dim=-2)
            keys, positions = torch.cat([old_keys, keys], dim=2), torch.cat([old_positions, positions], dim=2)
            if target_length == P - 1:  # 99-114
                if s["cached_recent"] is not None:  # rpc_utils.py 96-100: cached queries, then the current again
                    selectors, s["cached_recent"] = torch.cat([s["cached_recent"], query], dim=-2), None
                else:
                    selectors = query
                keys, positions = compress_kv(keys, positions, selectors, s["prompt_len"], s["num_comp"], T, R,
                                              aggregation, kernel_size)
                s["num_comp"] += 1
            caches[i] = (keys, positions)
        kept.append([[set(cache[1][0, h].tolist()) for h in range(heads)] for cache in caches])
    return kept


PROMPT = "Tom has 12 apples. He buys 7 more. How many?"


def press(R, **args):
    return make_press("rpc", {"window_size": str(R), **args})


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize(("P", "R"), [(16, 4), (12, 3)])  # --budget is RPC's period P
def test_seeded(group, P, R):
    forwards = synthetic_forwards(group, group=group, prompt=20, steps=70)
    assert_identical(run_cache(press(R), P, forwards), reference(forwards, P, R), forwards, "rpc",
                     f"seeded group {group} P {P} R {R}")


@pytest.mark.parametrize("group", [2, 7])
def test_seeded_group_aggregation(group):
    """``aggregation=group``: each KV head selects by its own group's mean."""
    forwards = synthetic_forwards(10 + group, group=group, prompt=20, steps=70)
    assert_identical(run_cache(press(4, aggregation="group"), 16, forwards),
                     reference(forwards, 16, 4, aggregation="group"), forwards, "rpc",
                     f"seeded group {group} P 16 R 4 aggregation group")


@pytest.mark.parametrize("group", GROUPS)
def test_in_situ(group):
    model, tokenizer = tiny_model(group)
    prompt = tokenizer(PROMPT)["input_ids"]
    forwards, kept = trace_model(model, prompt, press(4), 16, max_new_tokens=80)
    assert_identical(kept, reference(forwards, 16, 4), forwards, "rpc", f"tiny-llama group {group} P 16 R 4")


def test_named_variants_differ():
    """kvbench's variants are not RPC's rule: ``query_weights=uniform`` (each of the last R queries once) and
    ``schedule=budget`` (bounded by the budget) keep other tokens."""
    forwards = synthetic_forwards(3, group=2, prompt=20, steps=70)
    expected = reference(forwards, 16, 4)
    for variant in ({"query_weights": "uniform"}, {"schedule": "budget"}):
        agreement = compare(run_cache(press(4, **variant), 16, forwards), expected, forwards)
        assert agreement.first_difference is not None, (variant, agreement)
