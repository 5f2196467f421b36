"""hott-rkv against the paper's harness: the fork's R-KV press (``press_name="rkv"`` in ``reason/evaluate.py``).

Source: minghui-liu/kvpress @ 43d9e37 (the paper's kvpress fork).
- ``reason/evaluate.py`` lines 101-109, 296-305, 317-327: ``RKVPress()`` with its defaults (``compress_interval=64``,
  ``window_size=8``, ``kernel_size=5``), ``cache_budget`` set from the command line; flash-attention-2 (or the
  default attention) for every press but H2O, so the hook's ``attentions`` is ``None`` and the window's attention
  is recomputed by ``compute_window_attention``.
- ``kvpress/presses/base_press.py`` lines 188-281 (``forward_hook``): prefill (``cache_position[-1] <= q_len``)
  -> ``compress_prefilling``; every decoding step -> ``compress_decoding``, after the layer's attention.
- ``kvpress/presses/scorer_press.py`` lines 47-73 (``compress_prefilling``, not overridden): a prompt longer than
  ``cache_budget`` is cut to ``topk(cache_budget)`` of ``score`` at the prefill, in every layer.
- ``kvpress/presses/rkv_press.py`` lines 187-237 (``compress_decoding``): the schedule. ``accumulated_tokens`` is ONE
  attribute of the press, shared by every layer: a layer returns early while ``cache_budget >= kv_len`` (200);
  otherwise, while ``accumulated_tokens < compress_interval`` it returns, and only layer 0 increments the counter
  (203-211); else it compresses (``topk(cache_budget)``, gather, 215-226) and only layer 0 resets the counter to 0
  (228-229). So layer 0 increments before the other layers check: layers 1.. compress the first time when they hold
  ``budget + 64`` and layer 0 one step later (``budget + 65``); layer 0's reset then leaves the others one step
  behind, and from then on every layer compresses every 65 steps, layer 0 one step after the others.
- ``kvpress/presses/rkv_press.py`` lines 38-73 and 126-184 (``compute_window_attention``, ``score``): the window's
  queries' softmax in float32 under the mask ``triu(-inf, diagonal=q_len - window + 1)`` with ``q_len`` the rows of
  the hidden states passed in, the non-window columns kept (``[..., :-window]``); importance = mean over the window
  rows, max over the GQA group, ``max_pool1d(kernel 5, padding 2)`` along the cache's physical order; redundancy =
  keys normalised (``norm + 1e-8``), cosine similarity among the non-window keys with the diagonal zeroed, mean over
  the last dim, softmax; ``scores = 0.1 * importance + 0.9 * redundancy`` (keeps the MOST redundant keys: R-KV's own
  code subtracts); the last ``window`` cache indices padded with ``scores.max()`` over every head of the layer.

At the prefill the hidden states are the prompt's, so the window is the last 8 prompt queries at their own positions
and ``q_len`` is the prompt length: the mask is the true causal mask. In decoding ``score`` is called with
``self.acc_hidden_states[:, -window:]`` (215), so ``q_len = window`` and the mask is ``triu(diagonal=1)``: window row
``i`` attends only to cache indices ``0..i`` (so the importance is zero beyond cache index 7 before the pooling, 9
after it). That mask is transcribed as the fork runs it: it depends on the rows passed in, not on the buffer's width,
so it applies to any 8 queries (``reference(..., fork_mask=False)`` replaces it by the causal mask by position, only
to measure how far the rest agrees). Every op runs in the inputs' dtype as the fork's ran in its model's (bf16 in the
paper; ``test_seeded_bf16``), the logits divided by ``math.sqrt(head_dim)`` as ``compute_window_attention`` divides.

Named difference (the one this reference cannot avoid on a working model): the fork rebuilds the decoding window's
queries from ``acc_hidden_states``, a ``(1, 64, 5120)`` bfloat16 CUDA buffer (hard-coded for a 5120-wide model; it
does not fit any other width) shared by all layers and overwritten by each, projected by each layer's ``q_proj`` and
all rotated with the current token's angle. This reference uses instead the layer's own recorded queries of the 8
newest tokens (the last 8 cache indices at a decoding compression, since more than 8 tokens were appended after the
last one), each at its own position, as kvbench does.

Not reproduced by any batch-invariant benchmark and not exercised here: the fork keeps one press instance for a
whole dataset and never resets ``accumulated_tokens`` between examples, so each example after the first starts with
the previous one's count.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from kvbench.presses import make_press
from tests.reference.harness import GROUPS, assert_identical, run_cache, synthetic_forwards, tiny_model, trace_model
from tests.reference.test_hott_snapkv_d import append, bf16, compress, fork_cache_step, is_prefill

WINDOW, KERNEL, INTERVAL, LAMBDA = 8, 5, 64, 0.1  # rkv_press.py:24-27, 178


def window_attention(queries, keys, q_len, window=WINDOW):
    """``compute_window_attention`` (rkv_press.py:56-71) from post-RoPE ``queries`` [1, Hq, window, D] over the
    cache's keys [1, H, S, D] in physical order, with the fork's mask built from ``q_len`` (the rows of the hidden
    states it was given): [1, Hq, window, S - window]."""
    group = queries.shape[1] // keys.shape[1]
    attn_weights = torch.matmul(queries, keys.repeat_interleave(group, dim=1).transpose(2, 3))  # :64-66
    attn_weights = attn_weights / math.sqrt(keys.shape[-1])
    attention_mask = torch.ones_like(attn_weights) * float("-inf")  # :67
    attention_mask = torch.triu(attention_mask, diagonal=q_len - window + 1)  # :68
    attn_weights = torch.softmax(attn_weights + attention_mask, dim=-1, dtype=torch.float32).to(queries.dtype)
    return attn_weights[..., :-window]  # :71


def rkv_score(attn_weights, keys, group, sign=1.0, window=WINDOW, kernel=KERNEL, lam=LAMBDA):
    """``RKVPress.score`` (rkv_press.py:137-184) from the window's attention [1, Hq, window, S - window] and the keys
    [1, H, S, D] in physical order: [1, H, S]. ``sign=-1`` subtracts the redundancy (R-KV's rule)."""
    bsz, heads, kv_len, _ = keys.shape
    scores = attn_weights.mean(dim=-2)  # :152
    scores = scores.view(bsz, heads, group, kv_len - window).max(dim=-2).values  # :154-155
    scores = F.max_pool1d(scores, kernel_size=kernel, padding=kernel // 2, stride=1)  # :158
    keys = keys / (keys.norm(dim=-1, keepdim=True) + 1e-8)  # :163-165
    keys_flat = keys[:, :, :-window, :]  # :168-169
    similarity = torch.einsum("bhqd,bhkd->bhqk", keys_flat, keys_flat)  # :170
    mask = torch.eye(similarity.shape[-1]).unsqueeze(0).unsqueeze(0)  # :172
    similarity = similarity * (1 - mask)  # :173
    redundancy = F.softmax(similarity.mean(dim=-1), dim=-1, dtype=torch.float32).to(scores.dtype)  # :175-176
    scores = lam * scores + sign * (1 - lam) * redundancy  # :178-179
    return F.pad(scores, (0, window), value=scores.max().item())  # :182


def prefill_score(forward, layer, keys, sign=1.0):
    """``compress_prefilling`` -> ``score`` with the prompt's hidden states: the last 8 prompt queries at their own
    positions, ``q_len`` = the prompt length (so the mask is the causal mask)."""
    queries = forward.queries[layer][None, :, -WINDOW:]
    attn = window_attention(queries, keys, forward.positions.numel())
    return rkv_score(attn, keys, forward.group, sign)


def decoding_score(history, forward, layer, keys, positions, q_len=WINDOW, sign=1.0):
    """``compress_decoding``'s ``score`` (rkv_press.py:215) with the named difference: the queries are the layer's own
    recorded queries of the tokens at the last 8 cache indices (the 8 newest), each at its own position.
    ``history[layer]`` [Hq, T, D] holds the layer's queries by position."""
    queries = history[layer][None][:, :, positions[0, 0, -WINDOW:]]
    return rkv_score(window_attention(queries, keys, q_len), keys, forward.group, sign)


class Fork:
    """The fork's per-layer caches and its ONE ``accumulated_tokens`` (rkv_press.py:30-35, 187-237)."""

    def __init__(self, forwards, budget, interval=INTERVAL, fork_mask=True):
        self.budget, self.interval, self.fork_mask = budget, interval, fork_mask
        self.caches = [None] * forwards[0].layers
        self.history = [torch.cat([f.queries[i] for f in forwards], dim=1) for i in range(len(self.caches))]
        self.accumulated_tokens = 0
        self.compressions = {layer: [] for layer in range(len(self.caches))}

    def prefill(self, forward, layer):
        """scorer_press.py:47-73: a prompt longer than the budget is cut to ``topk(cache_budget)``."""
        score = lambda keys, positions, prefill: prefill_score(forward, layer, keys)  # noqa: E731
        self.caches[layer] = fork_cache_step(None, forward, layer, self.budget, score)

    def decode(self, t, forward, layer):
        """``RKVPress.compress_decoding`` (rkv_press.py:196-237) for one layer at forward ``t``."""
        keys, positions = self.caches[layer] = append(self.caches[layer], forward, layer)
        if self.budget >= keys.shape[2]:  # :199-201
            return
        if self.accumulated_tokens < self.interval:  # :203
            if layer == 0:
                self.accumulated_tokens += 1  # :204-205
            return
        q_len = WINDOW if self.fork_mask else keys.shape[2]  # :215, the 8 buffer rows make q_len 8
        scores = decoding_score(self.history, forward, layer, keys, positions, q_len)
        self.caches[layer] = compress(keys, positions, self.budget, scores)  # :218-226
        self.compressions[layer].append(t)
        if layer == 0:
            self.accumulated_tokens = 0  # :228-229

    def kept(self):
        return [[set(cache[1][0, h].tolist()) for h in range(cache[1].shape[1])] for cache in self.caches]


def run(fork, forwards):
    """Every forward through every layer's hook, layer 0 first; kept[t][layer][head]."""
    kept = []
    for t, forward in enumerate(forwards):
        for layer in range(forward.layers):
            if is_prefill(forward):
                fork.prefill(forward, layer)
            else:
                fork.decode(t, forward, layer)
        kept.append(fork.kept())
    return kept


def reference(forwards, budget, interval=INTERVAL, fork_mask=True):
    """kept[t][layer][head] of the fork's R-KV (with the named difference in the decoding window's queries).
    ``fork_mask=False`` (not the fork's rule) masks the decoding window causally by position instead of with the
    fork's ``triu(diagonal=1)``, for measuring how far the rest of the rule agrees."""
    return run(Fork(forwards, budget, interval, fork_mask), forwards)


PRESS = "hott-rkv"


def test_fork_schedule():
    """The fork's schedule as an independent run of the fork found it on a 30-layer model with a 96-token prompt."""
    forwards = synthetic_forwards(0, group=1, prompt=96, steps=230, layers=30, kv_heads=1, head_dim=4)
    fork = Fork(forwards, 128)
    run(fork, forwards)
    assert fork.compressions[0] == [97, 162, 227]
    assert all(fork.compressions[i] == [96, 161, 226] for i in range(1, 30))
    fork = Fork(forwards, 64)
    kept = run(fork, forwards)
    assert fork.compressions[0] == [65, 130, 195]
    assert all(fork.compressions[i] == [64, 129, 194] for i in range(1, 30))
    assert all(len(kept[0][i][0]) == 64 for i in range(30))  # the 96-token prompt cut to 64 at the prefill


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize(("budget", "prompt"), [(16, 24), (40, 24)])
def test_seeded(group, budget, prompt):
    forwards = synthetic_forwards(group, group=group, prompt=prompt, steps=160, layers=3)
    assert_identical(run_cache(make_press(PRESS), budget, forwards), reference(forwards, budget), forwards, PRESS,
                     f"seeded group {group} budget {budget} prompt {prompt}", min_compressions=2)


@pytest.mark.parametrize("group", GROUPS)
def test_seeded_bf16(group):
    """bfloat16, the paper's models' dtype: every op of the fork's score rounds, so near ties fall by its rounding."""
    forwards = bf16(synthetic_forwards(group, group=group, prompt=24, steps=160, layers=3))
    assert_identical(run_cache(make_press(PRESS), 16, forwards), reference(forwards, 16), forwards, PRESS,
                     f"seeded bf16 group {group} budget 16", min_compressions=2)


@pytest.mark.parametrize("group", GROUPS)
def test_in_situ(group):
    model, tokenizer = tiny_model(group)
    prompt = tokenizer("Tom has 12 apples. He buys 7 more. How many?")["input_ids"]
    forwards, kept = trace_model(model, prompt, make_press(PRESS), 16, max_new_tokens=150)
    assert_identical(kept, reference(forwards, 16), forwards, PRESS, f"tiny-llama group {group} budget 16",
                     min_compressions=2)
