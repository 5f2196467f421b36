"""shadowkv against ShadowKV's chunk selection.

Source: ByteDance-Seed/ShadowKV @ e51904c, ``models/kv_cache.py``, class ``ShadowKVCache`` (the accuracy one):

- ``prefill_kv_cache`` lines 225-281: ``chunks = incoming // chunk_size - local_chunk`` (237, ``local_chunk = 4``,
  136); the tokens after them stay exact (243-245); landmarks = the mean post-RoPE key of each chunk (247-248);
  per KV head the ``outlier_chunk`` (48, line 136) chunks whose least similar key has the lowest cosine similarity
  to the landmark stay exact (251-266); the other chunks' landmarks and indices are registered (271-277).
- ``get_retrieval_position_ids`` lines 283-304: per decoding step and KV head, ``softmax(q . landmark /
  sqrt(128))`` over those chunks for each query head (289-290), summed over the step's queries (291), the maximum
  over the GQA group (292-293), ``topk(sparse_budget // chunk_size)`` chunks (294, 238) rebuilt from the low-rank
  keys and host values (306-334); ``update_kv_cache`` (336-348) appends every generated token exactly, attended
  at every step.
- ``models/base.py`` line 129: only a forward of more than 4096 tokens takes the prefill path (a shorter prompt
  goes down the decoding path, with no shadow store); ``kv_cache.py`` line 280 asserts ``sparse_budget <
  incoming``; ``topk(48)`` (254) needs 48 chunks besides the 4 local ones.

kvbench's ``shadowkv`` evicts nothing (``kvbench/engine/shadow.py``), so no kept sets: this module drives
kvbench's ``ShadowCache`` with seeded and traced tensors and compares what ShadowKV decides: the landmarks, the
outlier chunks, and the chunks chosen per step and KV head. kvbench at ``local_window = 4 x chunk_size``,
``outlier_chunks = n`` and ``--budget = (S / chunk_size + n) x chunk_size + the prompt's tail`` (S = ShadowKV's
``sparse_budget``) with ``chunk_scores=softmax-max`` chooses ShadowKV's chunks: identical below, at every GQA
group. Named differences (the press's docstring names them too):

1. ``chunk_scores``: kvbench's default ``mean-logit`` ranks the chunks by the group's mean logit; ShadowKV by the
   maximum over the group of each query head's softmax. The same chunks at GQA group 1; different at groups 2
   and 7 (asserted below). ``softmax-max`` divides by sqrt(128) whatever the head size, as ShadowKV (line 289).
2. ``outlier_chunks``: 2 by default, ShadowKV 48 (reasoning prompts are far shorter than ShadowKV's > 4096).
3. Budget: kvbench's ``--budget`` counts every prompt token attended (selected chunks, outliers, the prompt's
   tail); ShadowKV's ``sparse_budget`` counts the selected chunks only.
4. ``generated=projected`` (not the default) is kvbench's extension: generated tokens join the chunks on the
   prompt's basis. The default, ``exact``, is ShadowKV's.
5. Any prompt length: ShadowKV's code handles prompts over 4096 tokens with a sparse budget below their length
   only (above); kvbench chunks what it can of any prompt.
6. Numerics: ShadowKV's landmarks and chunk probabilities are bfloat16 (ties broken by ``topk``); kvbench's are
   float32. The low-rank keys (rank 160) are not compared here.
"""

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from kvbench.engine.generate import GenerationSettings, generate
from kvbench.engine.shadow import ShadowCache, ShadowLayer
from kvbench.presses import make_press
from tests.reference.harness import GROUPS, Agreement, Forward, log, synthetic_forwards, tiny_model

LOCAL_CHUNK = 4  # kv_cache.py 135


def prefill(keys, chunk_size, outlier_chunk):
    """``ShadowKVCache.prefill_kv_cache`` on one layer, keys [H, incoming, d] post-RoPE: (landmark candidates
    [H, chunks, d], outlier chunk indices [H, outlier_chunk], registered landmarks, their chunk indices)."""
    heads, incoming, d = keys.shape
    chunks = incoming // chunk_size - LOCAL_CHUNK  # 237
    ctx = keys[:, :chunks * chunk_size].view(heads, chunks, chunk_size, d)  # 247
    candidates = ctx.mean(dim=-2)  # 248
    cos_sim = F.cosine_similarity(candidates.unsqueeze(2).expand(-1, -1, chunk_size, -1), ctx, dim=-1)  # 251
    outliers = cos_sim.min(dim=-1).values.topk(outlier_chunk, largest=False).indices  # 254
    all_idx = torch.arange(chunks).expand(heads, -1)  # 271
    mask = torch.ones_like(all_idx, dtype=torch.bool)
    mask.scatter_(dim=-1, index=outliers, value=False)  # 272-273
    rest_idx = all_idx.masked_select(mask).view(heads, -1)  # 274
    landmarks = candidates.gather(1, rest_idx.unsqueeze(-1).expand(-1, -1, d))  # 277
    return candidates, outliers, landmarks, rest_idx


def select(query, landmarks, rest_idx, select_sets, *, mean_logit=False):
    """``get_retrieval_position_ids`` lines 286-297 on one layer: query [Hq, q_len, d] post-RoPE; the chosen chunk
    indices [H, select_sets]. ``mean_logit``: kvbench's default score instead (named difference 1)."""
    heads = landmarks.shape[0]
    hq, q_len, d = query.shape
    group = hq // heads
    logits = torch.einsum("hgqd,hdc->hgqc", query.view(heads, group, q_len, d), landmarks.transpose(1, 2))
    if mean_logit:
        chunk_attn = logits.sum(dim=-2).mean(dim=1)
    else:
        chunk_attn = torch.softmax(logits / math.sqrt(128), dim=-1, dtype=torch.float32).to(query.dtype)  # 289-290
        chunk_attn = chunk_attn.sum(dim=-2)  # 291: [H, group, chunks]
        chunk_attn = chunk_attn.max(dim=-2).values if group > 1 else chunk_attn[:, 0]  # 292-293 (289's squeeze)
    merged = torch.topk(chunk_attn, k=select_sets, dim=-1).indices  # 294
    return rest_idx.gather(-1, merged)  # 297


def reference(forwards, chunk_size, outlier_chunk, select_sets, **kw):
    """Per layer the prefill's (candidates, outlier sets), and chosen[t][layer][head] for each decoding forward."""
    first = forwards[0]
    layers = [prefill(first.keys[i], chunk_size, outlier_chunk) for i in range(first.layers)]
    chosen = [[[set(h.tolist()) for h in select(f.queries[i], landmarks, rest, select_sets, **kw)]
               for i, (_, _, landmarks, rest) in enumerate(layers)] for f in forwards[1:]]
    return [(candidates, [set(h.tolist()) for h in outliers]) for candidates, outliers, _, _ in layers], chosen


def _rope(head_dim):
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)

    def rope(positions):
        freqs = positions.float()[:, None] * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    return rope


def _chunks_chosen(cache):
    """Per layer and KV head: the chunks the last decoding step rebuilt (attended chunked tokens, not outliers)."""
    c, end = cache.press.chunk_size, cache.chunk_end[0]
    out = []
    for layer in cache.layers:
        positions, visible = layer.last_attended
        outliers = [{p // c for p in h.tolist() if p >= 0} for h in layer.outlier_positions[0]]
        out.append([{p // c for p, v in zip(ph.tolist(), vh.tolist()) if v and 0 <= p < end} - o
                    for ph, vh, o in zip(positions[0], visible[0], outliers)])
    return out


def _decisions(cache):
    """Per layer: kvbench's landmarks [H, chunks, d] and outlier chunk sets, after the prefill."""
    c, end = cache.press.chunk_size, cache.chunk_end[0]
    return [(layer.landmarks[0, :, : end // c], [{p // c for p in h.tolist() if p >= 0}
                                                  for h in layer.outlier_positions[0]]) for layer in cache.layers]


def run_shadow(press, budget, forwards):
    """kvbench's ShadowCache fed ``forwards`` as the decode loop feeds it: its prefill decisions, and the chunks
    chosen at every decoding forward."""
    first = forwards[0]
    n_tokens = sum(f.positions.numel() for f in forwards)
    cache = ShadowCache(press, budget, first.layers, n_tokens, _rope(first.keys.shape[-1]), 1)
    chosen, decisions = [], None
    with torch.inference_mode():
        for step, forward in enumerate(forwards):
            n = forward.positions.numel()
            cache.begin_step(forward.positions[None], torch.ones(1, n, dtype=torch.bool), [n], step)
            for i, layer in enumerate(cache.layers):
                key, value = layer.update(forward.keys[i][None], forward.values[i][None])
                layer.attend(forward.queries[i][None], key, value, forward.scaling)
            cache.end_step()
            if step == 0:
                decisions = _decisions(cache)
            else:
                chosen.append(_chunks_chosen(cache))
    return decisions, chosen


def compare_chosen(kvbench, reference_chosen):
    """Selections compared (one per decoding forward), identical, and the first difference."""
    for t, (mine, theirs) in enumerate(zip(kvbench, reference_chosen, strict=True)):
        for layer, (heads_k, heads_r) in enumerate(zip(mine, theirs, strict=True)):
            for head, (a, b) in enumerate(zip(heads_k, heads_r, strict=True)):
                if a != b:
                    return Agreement(t + 1, t + 1, t, f"decoding forward {t + 1}, layer {layer}, head {head}: "
                                     f"kvbench {sorted(a)}, ShadowKV {sorted(b)}")
    return Agreement(len(kvbench), len(kvbench), len(kvbench), None)


def check(forwards, params, case, chunk_scores):
    """The prefill's decisions equal; the chunks chosen identical (``softmax-max``, or group 1), else they differ."""
    chunk_size, outliers, select_sets = params
    prompt = forwards[0].positions.numel()
    tail = prompt - (prompt // chunk_size - LOCAL_CHUNK) * chunk_size  # kv_cache.py 243
    budget = (select_sets + outliers) * chunk_size + tail
    press = make_press("shadowkv", {"chunk_size": str(chunk_size), "local_window": str(LOCAL_CHUNK * chunk_size),
                                    "outlier_chunks": str(outliers), "chunk_scores": chunk_scores})
    decisions, chosen = run_shadow(press, budget, forwards)
    expected, theirs = reference(forwards, chunk_size, outliers, select_sets)
    for (landmarks, outlier_sets), (candidates, their_outliers) in zip(decisions, expected, strict=True):
        torch.testing.assert_close(landmarks, candidates, rtol=1e-5, atol=1e-6)
        assert outlier_sets == their_outliers
    agreement = compare_chosen(chosen, theirs)
    log("shadowkv", f"{case} chunk_scores={chunk_scores}", agreement)
    if chunk_scores == "softmax-max" or forwards[0].group == 1:
        assert agreement.first_difference is None, str(agreement)
    else:  # named difference 1, and only it: kvbench's default is the mean-logit rule
        assert agreement.first_difference is not None, "the named difference did not show"
        mean_logit = compare_chosen(chosen, reference(forwards, chunk_size, outliers, select_sets, mean_logit=True)[1])
        assert mean_logit.first_difference is None, str(mean_logit)
    assert agreement.forwards > 10 or agreement.first_difference is not None


#: (chunk_size, outlier chunks, chunks selected): ShadowKV's 8, 48 and sparse_budget / 8 scaled to short prompts.
SEEDED = {"chunk 4": (4, 1, 3), "chunk 2": (2, 2, 5)}


@pytest.mark.parametrize("chunk_scores", ["softmax-max", "mean-logit"])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize(("case", "prompt"), [("chunk 4", 40), ("chunk 4", 43), ("chunk 2", 40)])
def test_seeded(case, prompt, group, chunk_scores):
    forwards = synthetic_forwards(group, group=group, prompt=prompt, steps=40, kv_heads=2, head_dim=8)
    check(forwards, SEEDED[case], f"seeded {case} prompt {prompt} group {group}", chunk_scores)


def trace_shadow(model, prompt, press, budget, max_new_tokens):
    """A greedy generation under ``press``: each forward's per-layer keys, values and queries (post-RoPE)."""
    forwards, seen = [], {}
    update, attend = ShadowLayer.update, ShadowLayer.attend

    def recording_update(layer, key_states, value_states, *args, **kwargs):
        seen[layer.layer_idx] = {"keys": key_states[0].clone(), "values": value_states[0].clone()}
        return update(layer, key_states, value_states, *args, **kwargs)

    def recording_attend(layer, query, keys, values, scaling):
        seen[layer.layer_idx]["queries"] = query[0].clone()
        return attend(layer, query, keys, values, scaling)

    def on_step(cache, step):
        layers = [seen[i] for i in range(len(seen))]
        forwards.append(Forward(cache.step.positions[0].clone(), *(torch.stack([s[k] for s in layers])
                                                                   for k in ("keys", "values", "queries")), 1.0))
        seen.clear()

    with mock.patch.object(ShadowLayer, "update", recording_update), \
            mock.patch.object(ShadowLayer, "attend", recording_attend):
        generate(model, [list(prompt)], press, budget, GenerationSettings(max_new_tokens=max_new_tokens),
                 on_step=on_step)
    return forwards


@pytest.mark.parametrize("chunk_scores", ["softmax-max", "mean-logit"])
@pytest.mark.parametrize("group", GROUPS)
def test_in_situ(group, chunk_scores):
    """The tiny model's own keys and queries, replayed into kvbench's cache and into ShadowKV's rule."""
    model, tokenizer = tiny_model(group)
    prompt = tokenizer("Tom has 12 apples. He buys 7 more. How many?")["input_ids"]
    chunk_size, outliers, select_sets = 4, 1, 3
    press = make_press("shadowkv", {"chunk_size": "4", "local_window": "16", "outlier_chunks": "1"})
    forwards = trace_shadow(model, prompt, press, 32, max_new_tokens=40)
    check(forwards, (chunk_size, outliers, select_sets), f"tiny-llama group {group}", chunk_scores)
