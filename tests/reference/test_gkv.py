"""gkv against G-KV's ``ScoreBasedKV`` in its inference configuration, as its own cache runs it.

Source: microsoft/G-KV @ 6db3b2e (read with line numbers; transcribed without kvbench's press or its docs).

- ``gkv/model/compression/score_based.py``, ``ScoreBasedKV.update_kv`` (71-256): ``compress_mode="budget"``
  (92-93); a cache of ``kv_cache_len <= budget`` entries is returned as it is, score cache included (102-103).
  Otherwise ``compute_attention_scores`` of the query cache (108-110), the mean over its queries (115), divided by
  its maximum per KV head (``enable_score_cache`` and not ``disable_norm``, 121-125); with a score cache and
  ``alpha > 0`` (127-156), ``old = cat(score_cache, final[:, :, cached_len:])`` -- aligned by index with the cache's
  first entries, the entries after it scored fresh -- and ``final = max(old * alpha, final)`` (``smooth_method``
  "max", 150-151); no pooling (165-166); ``cal_similarity_triton`` on the whole cache, sliced to all but the last
  ``window_size`` entries (169-174), divided by its maximum (181-186); ``final * mix_lambda - sim * (1 -
  mix_lambda)`` (188-190); the padding fill (192-199) is a no-op without padding. ``topk(budget - window_size)``
  (202) then ``sort`` (205): the kept entries stay in cache order, then the last ``window_size`` entries (244-255),
  so G-KV's physical order is token order. The new score cache is the smoothed ``final`` (before the similarity
  term) gathered at the kept indices (207-221): ``budget - window_size`` entries, the window's not among them.
- ``gkv/utils/compression_score.py``: ``compute_attention_scores`` (270-346): logits ``q . (k / sqrt(head_dim))``
  (293-295), without padding a causal mask among the last ``q_len`` keys only (325-331), softmax over the whole
  cache (333-335), *then* the maximum over each GQA group's query heads (339-340), the last ``q_len`` columns
  removed (343-344). ``similarity_score_kernel`` (74-199) in plain torch: keys divided by ``norm + 1e-6``
  (129, 161), the cosine of every pair with the diagonal zeroed (163-168); for each column (key) ``j``, the last
  row ``i`` in cache order with ``cos > threshold`` -- rows are visited from the last block of 16 backwards (107),
  within a block the largest row (181-190), and a column once zeroed is flagged (170-195) -- has ``cos(i, j)``
  zeroed (191); each row's sum is its score (197-198). ``cal_similarity_triton`` (204-266): ``threshold=0.5``,
  divided by the unpadded length (260-261), softmax over the cache (266).
- ``gkv/model/modeling_llama.py`` (Qwen2's is the same): the cache appends the forward's keys (136-138); the query
  cache holds the prefill's last ``window_size`` queries, then each forward's query appended and the last
  ``window_size`` kept (139-180); when ``enable_compress`` ``update_kv`` runs on the whole cache with the query
  cache and the layer's score cache (186-212); the forward's attention uses the uncompressed local ``key_states``
  (245-254), so the eviction takes effect from the next forward. ``gkv/model/gen_patch.py``: score caches start
  None (162-164); ``enable_compress = output_length % divide_length == 0`` with ``output_length`` the forwards
  done (167, 178, 217): the prefill is forward 0, so a prompt over the budget is compressed at once.
- ``scripts/inference.sh`` 16-21, 53-62 and ``gkv/inference_main.py`` 151-173, 292-325: ``--suppressing_redundancy
  --mix_lambda 0.5 --enable_score_cache --alpha 0.8``, window 16, ``divide_length`` 128; ``smooth_method`` max,
  pooling off, ``disable_norm`` off, ``compress_mode`` budget; ``triton_similarity`` is not passed (default True).

Claim: ``make_press("gkv", {"buffer": N, "window_size": W, ...})`` at ``--budget B`` is that rule with
``divide_length=N``. Found: identical kept sets at every forward, layer and KV head -- seeded (groups 1, 2, 7;
B/N/W/prompt 12/4/2/24 over the budget, 24/4/3/24 equal to it (no compression and no score cache at the prefill),
30/6/4/24 and 10/5/4/3 under it, the last with fewer prompt queries than W; alpha 0.8 and 0: 24 runs, 306 of 306
compressions identical; seeds 0-5: 72 runs, 918 of 918), N 1, W 1, threshold 0.3, mix_lambda 0.2 (4 runs, 109 of
109) and in situ (tiny llama, a 55-token prompt, groups 1, 2, 7, B/N/W 16/6/4, 24/5/2, 64/8/3, and 16/6/4 at
alpha 0: 12 runs, 114 of 114). A wider sweep while writing this (seeds 0-59, 900 runs, 10,440 compressions):
all identical. Named differences, each asserted below, the first three options of ``reference`` with which the
kept sets are identical:

1. Exact ties (``test_exact_ties``, ``ties="newest"``): kvbench keeps the newest of equal scores; G-KV keeps
   ``topk``'s choice (202; CPU ``topk`` here: the older). With ``mix_lambda=1`` (attention only) and repeated keys
   11 of 12 runs differ, every first difference between exact copies with kvbench holding the newer; with
   ``ties="newest"`` 12 of 12 runs, 192 compressions, identical.
2. Logit scale (``test_scaling``, ``scale="model"``): G-KV divides keys by ``sqrt(head_dim)`` (293) whatever the
   model; kvbench uses the model's attention scaling. Equal for Llama and Qwen2; forwards scaled by 0.3 differ
   from forward 0 and are identical with the model's scaling.
3. Dtype (``test_dtype``, ``upcast=True``): G-KV scores in the model's dtype (bf16, ``inference_main.py`` 195;
   the kernel's bf16 dot and row sums stored in bf16, 163, 199); kvbench in float32. On bf16 inputs (3 seeds)
   kvbench equals the rule computed in float32 and differs from it computed in bf16 (torch's bf16 ops standing in
   for the kernel's own rounding, which is not reproduced).
4. Copies of one key with ``mix_lambda < 1`` (``test_copies``): their similarity row sums are equal in exact
   arithmetic but each implementation rounds them by its summation order (the kernel: blocks of 64 columns;
   kvbench: its own; the reference sums a row in ascending order, so copies stay equal), so which copies survive
   is rounding, not the rule. With repeated keys every difference is between exact copies: here 1 of 24 runs
   (seed 1, group 2, 30/6/4/24, forward 12, layer 0, head 1: kvbench alone keeps 1, the reference 6, one key);
   58 of 900 in the sweep.

Not reproduced (batch 1, no padding): G-KV's batched runs (``eval_batch_size`` 128, left padding,
``inference_main.py`` 117-122) count pads toward ``budget`` (102), mask them out of both scores (297-322, kernel
105/141, 260-264) and evict them first (192-199), on one ``output_length`` schedule for the batch; finished rows
keep their old score cache and positions (209-242, bookkeeping only). The training path (sparse masks) is not
inference.
"""

import dataclasses
import math

import pytest
import torch

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

PROMPT = "Tom has 12 apples. He buys 7 more and eats 3. How many?"


@dataclasses.dataclass(frozen=True)
class GKV:
    """G-KV's configuration; ``ties``, ``scale`` and ``upcast`` are not the source (named differences 1-3),
    ``smooth`` "sum" (H2O's smoothing, 152-154) only shows the comparison can fail."""

    budget: int
    divide_length: int
    window_size: int
    mix_lambda: float = 0.5
    alpha: float = 0.8
    threshold: float = 0.5
    smooth: str = "max"
    ties: str = "topk"  # "newest": equal scores ranked newest first (kvbench)
    scale: str = "source"  # "model": the forward's scaling (kvbench)
    upcast: bool = False  # True: score in float32 (kvbench)


def attention_scores(queries, keys, scaling=None):
    """``compute_attention_scores`` (270-346), no padding: [KV heads, q_len, cache - q_len]."""
    heads, _, dim = keys.shape
    q_len = queries.shape[1]
    keys = keys / math.sqrt(dim) if scaling is None else keys * scaling  # 293
    logits = queries.view(heads, -1, q_len, dim) @ keys.unsqueeze(1).transpose(-1, -2)  # 285-295
    causal = torch.triu(torch.ones(q_len, q_len), diagonal=1).bool()  # 328-331
    logits[..., -q_len:].masked_fill_(causal, -float("inf"))
    probs = torch.softmax(logits - logits.max(dim=-1, keepdim=True).values, dim=-1)  # 333-335
    return probs.max(dim=1).values[..., :-q_len]  # 339-344


def similarity(keys, threshold):
    """``cal_similarity_triton`` and its kernel (74-266), no padding: [KV heads, cache]."""
    n = keys.shape[1]
    unit = keys / (keys.norm(dim=-1, keepdim=True) + 1e-6)  # 129, 161, 226
    cos = unit @ unit.transpose(-1, -2)  # 163
    cos.diagonal(dim1=-2, dim2=-1).zero_()  # 165-168
    similar = cos > threshold  # 179
    rows = torch.arange(n)[:, None]
    last = torch.where(similar, rows, -1).max(dim=-2, keepdim=True).values  # per column, its last similar row
    cos = cos.masked_fill(similar & (rows == last), 0.0)  # 181-191
    row_sum = cos.sort(dim=-1).values.sum(dim=-1)  # 197-198, summed in ascending order (difference 4)
    return torch.softmax(row_sum / n, dim=-1)  # 260-266


def rank(score, keep, ties):
    """``topk`` then ``sort`` (202-205); ``ties="newest"`` ranks equal scores newest first (the cache is in token
    order, so newest is last)."""
    if ties == "topk":
        indices = score.topk(keep, dim=-1).indices
    else:
        indices = score.shape[-1] - 1 - score.flip(-1).argsort(dim=-1, descending=True, stable=True)[..., :keep]
    return indices.sort(dim=-1).values


def update_kv(keys, positions, queries, score_cache, cfg, scaling):
    """``ScoreBasedKV.update_kv`` (71-256) on one layer (batch 1): keys [H, n, d], positions [H, n] standing in
    for the values. Returns the new keys, positions and score cache."""
    assert bool((positions.diff(dim=-1) > 0).all())  # G-KV's cache is in token order (205, 254)
    w = cfg.window_size
    if keys.shape[1] <= cfg.budget:  # 102-103
        return keys, positions, score_cache
    final = attention_scores(queries, keys, scaling).mean(dim=1)  # 108-115
    final = final / final.max(dim=-1, keepdim=True).values  # 121-125
    if score_cache is not None and cfg.alpha > 0:  # 127-156
        fresh = final[:, score_cache.shape[-1]:]
        if cfg.smooth == "max":
            final = torch.max(torch.cat([score_cache, fresh], dim=-1) * cfg.alpha, final)
        else:  # "sum" (135-144, 152-154): not the configuration, for the control
            final = torch.cat([score_cache, torch.zeros_like(fresh)], dim=-1) * cfg.alpha + final
    sim = similarity(keys, cfg.threshold)[:, :-w]  # 169-174
    sim = sim / sim.max(dim=-1, keepdim=True).values  # 181-186
    score = final * cfg.mix_lambda - sim * (1 - cfg.mix_lambda)  # 188-190
    indices = rank(score, cfg.budget - w, cfg.ties)  # 202-205
    kept = keys[:, :-w].gather(1, indices[..., None].expand(-1, -1, keys.shape[-1]))
    return (torch.cat([kept, keys[:, -w:]], dim=1), torch.cat([positions[:, :-w].gather(1, indices),
            positions[:, -w:]], dim=1), final.gather(1, indices))  # 207-255


def reference(forwards, cfg):
    """kept[t][layer][head] of G-KV's cache: each layer's keys, positions, query cache and score cache."""
    if cfg.upcast:
        forwards = [dataclasses.replace(f, keys=f.keys.float(), queries=f.queries.float()) for f in forwards]
    n_layers, heads = forwards[0].layers, forwards[0].keys.shape[1]
    caches = [None] * n_layers  # (keys [H, n, d], positions [H, n])
    query_cache = [None] * n_layers
    score_cache = [None] * n_layers  # gen_patch.py 162-164
    kept = []
    for t, forward in enumerate(forwards):  # t: gen_patch.py's output_length
        scaling = forward.scaling if cfg.scale == "model" else None
        for i in range(n_layers):
            keys, positions = forward.keys[i], forward.positions[None].expand(heads, -1)
            if caches[i] is not None:  # 136-138: DynamicCache.update appends
                keys, positions = torch.cat([caches[i][0], keys], 1), torch.cat([caches[i][1], positions], 1)
            queries = forward.queries[i]
            if query_cache[i] is None:  # 142-147: the prefill's last window_size queries
                query_cache[i] = queries[:, -cfg.window_size:]
            else:  # 162-179
                query_cache[i] = torch.cat([query_cache[i], queries], dim=1)[:, -cfg.window_size:]
            if t % cfg.divide_length == 0:  # gen_patch.py 178; modeling_llama.py 186-212
                keys, positions, score_cache[i] = update_kv(keys, positions, query_cache[i], score_cache[i], cfg,
                                                            scaling)
            caches[i] = (keys, positions)
        kept.append([[set(row.tolist()) for row in cache[1]] for cache in caches])
    return kept


def press(cfg):
    return make_press("gkv", {"buffer": str(cfg.divide_length), "window_size": str(cfg.window_size),
                              "mix_lambda": str(cfg.mix_lambda), "alpha": str(cfg.alpha),
                              "threshold": str(cfg.threshold)})


def copies_only(kvbench, theirs, forwards, t, newer=False):
    """At forward t every position one side alone holds is an exact copy (same key) of one the other alone holds;
    with ``newer``, kvbench's is the newer of the two."""
    keys = torch.cat([f.keys for f in forwards], dim=2)  # index = position
    for layer, (mine_l, theirs_l) in enumerate(zip(kvbench[t], theirs[t])):
        for head, (a, b) in enumerate(zip(mine_l, theirs_l)):
            for p in a - b:
                if not any(torch.equal(keys[layer, head, p], keys[layer, head, q]) and (q < p or not newer)
                           for q in b - a):
                    return False
    return True


#: budget, divide_length, window, prompt: over the budget, equal to it, under it, under the window.
CASES = [(12, 4, 2, 24), (24, 4, 3, 24), (30, 6, 4, 24), (10, 5, 4, 3)]


@pytest.mark.parametrize("alpha", [0.8, 0.0])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize(("budget", "n", "w", "prompt"), CASES)
def test_seeded(budget, n, w, prompt, group, alpha):
    cfg = GKV(budget, n, w, alpha=alpha)
    forwards = synthetic_forwards(group, group=group, prompt=prompt)
    assert_identical(run_cache(press(cfg), budget, forwards), reference(forwards, cfg), forwards, "gkv",
                     f"seeded group {group} B/N/W {budget}/{n}/{w} prompt {prompt} alpha {alpha}", min_compressions=5)


def test_seeded_seeds():
    """Seeds 0-5, every case and group, alpha 0.8 on even seeds and 0 on odd ones."""
    for seed in range(6):
        for budget, n, w, prompt in CASES:
            for group in GROUPS:
                cfg = GKV(budget, n, w, alpha=0.8 if seed % 2 == 0 else 0.0)
                forwards = synthetic_forwards(seed, group=group, prompt=prompt)
                assert_identical(run_cache(press(cfg), budget, forwards), reference(forwards, cfg), forwards, "gkv",
                                 f"seeded seed {seed} group {group} B/N/W {budget}/{n}/{w} prompt {prompt}")


@pytest.mark.parametrize("cfg", [GKV(12, 1, 2), GKV(12, 4, 1), GKV(12, 4, 2, threshold=0.3),
                                 GKV(12, 4, 2, mix_lambda=0.2)])
def test_parameters(cfg):
    """kvbench's buffer, window_size, threshold and mix_lambda are the source's."""
    forwards = synthetic_forwards(3, group=2)
    assert_identical(run_cache(press(cfg), cfg.budget, forwards), reference(forwards, cfg), forwards, "gkv",
                     f"seeded {cfg}", min_compressions=10)


@pytest.mark.parametrize("group", GROUPS)
def test_in_situ(group):
    """A 55-token prompt: over budgets 16 and 24 (compressed at the prefill), under 64."""
    model, tokenizer = tiny_model(group)
    prompt = tokenizer(PROMPT)["input_ids"]
    for cfg in (GKV(16, 6, 4), GKV(24, 5, 2), GKV(64, 8, 3), GKV(16, 6, 4, alpha=0.0)):
        forwards, kept = trace_model(model, prompt, press(cfg), cfg.budget, max_new_tokens=60)
        assert_identical(kept, reference(forwards, cfg), forwards, "gkv", f"tiny-llama group {group} {cfg}",
                         min_compressions=5)


@pytest.mark.parametrize("variant", [{"smooth": "sum"}, {"alpha": 0.0}])
def test_control(variant):
    """H2O's sum in place of the max smoothing, or the score history dropped, does not pass the comparison."""
    cfg = GKV(12, 4, 2)
    forwards = synthetic_forwards(2, group=2)
    kvbench = run_cache(press(cfg), 12, forwards)
    assert compare(kvbench, reference(forwards, dataclasses.replace(cfg, **variant)), forwards).first_difference


def test_exact_ties():
    """Difference 1: with mix_lambda 1 copies of a key score equal exactly; kvbench keeps the newer, CPU topk
    the older. Ranking ties newest first, the kept sets are identical."""
    differing = 0
    for seed in range(4):
        for group in GROUPS:
            cfg = GKV(12, 4, 2, mix_lambda=1.0)
            forwards = synthetic_forwards(seed, group=group, copies=0.3)
            kvbench, theirs = run_cache(press(cfg), 12, forwards), reference(forwards, cfg)
            agreement = compare(kvbench, theirs, forwards)
            log("gkv", f"seeded copies mix 1 seed {seed} group {group} (topk ties)", agreement)
            if agreement.first_difference:
                differing += 1
                assert copies_only(kvbench, theirs, forwards, agreement.forwards - 1, newer=True), agreement
            assert_identical(kvbench, reference(forwards, dataclasses.replace(cfg, ties="newest")), forwards,
                             "gkv", f"seeded copies mix 1 seed {seed} group {group}")
    assert differing >= 10


def test_copies():
    """Difference 4: at mix_lambda 0.5 the copies' similarities are rounded apart; differences only between copies."""
    for seed in range(6):
        for budget, n, w, prompt in CASES:
            cfg = GKV(budget, n, w, ties="newest")
            forwards = synthetic_forwards(seed, group=2, prompt=prompt, copies=0.3)
            kvbench, theirs = run_cache(press(cfg), budget, forwards), reference(forwards, cfg)
            agreement = compare(kvbench, theirs, forwards)
            log("gkv", f"seeded copies seed {seed} B/N/W {budget}/{n}/{w} prompt {prompt}", agreement)
            if agreement.first_difference:
                assert copies_only(kvbench, theirs, forwards, agreement.forwards - 1), agreement


def test_scaling():
    """Difference 2: logits scaled by the model's scaling (here 0.3 / sqrt(head_dim)), not 1 / sqrt(head_dim)."""
    cfg = GKV(12, 4, 2)
    forwards = [dataclasses.replace(f, scaling=f.scaling * 0.3) for f in synthetic_forwards(3, group=2)]
    kvbench = run_cache(press(cfg), 12, forwards)
    agreement = compare(kvbench, reference(forwards, cfg), forwards)
    assert agreement.forwards == 1 and agreement.first_difference, agreement
    assert_identical(kvbench, reference(forwards, dataclasses.replace(cfg, scale="model")), forwards,
                     min_compressions=10)


def test_dtype():
    """Difference 3: on bf16 inputs kvbench is the rule computed in float32, not in bf16."""
    cfg = GKV(12, 4, 2)
    differing = 0
    for seed in range(3):
        forwards = [dataclasses.replace(f, keys=f.keys.bfloat16(), values=f.values.bfloat16(),
                                        queries=f.queries.bfloat16()) for f in synthetic_forwards(seed, group=2)]
        kvbench = run_cache(press(cfg), 12, forwards)
        differing += compare(kvbench, reference(forwards, cfg), forwards).first_difference is not None
        assert_identical(kvbench, reference(forwards, dataclasses.replace(cfg, upcast=True)), forwards,
                         min_compressions=10)
    assert differing == 3
