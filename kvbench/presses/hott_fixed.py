"""The paper's harness's rules and parameters with its defects fixed: what its code meant to compute.

Each is a kvbench press with the fork's parameters as defaults (kvpress fork of arXiv 2512.12008 at 43d9e37,
``kvpress/presses/*`` and ``reason/evaluate.py``); the ``hott-*`` presses reproduce what the code did instead.
"""

from dataclasses import dataclass

import torch

from kvbench.presses.base import Press, View
from kvbench.presses.h2o import H2OPress
from kvbench.presses.hott_rkv import fork_rkv_score, window_queries
from kvbench.presses.snapkv_d import SnapKVDecodingPress
from kvbench.presses.source_order import (
    COMPILE_REFUSAL,
    STATE,
    compress,
    fork_index,
    fork_topk,
    reorder,
    valid_lengths,
    window_padded,
)


@dataclass
class HottH2OFixedPress(H2OPress):
    """The fork's H2O rule, per layer and in float32: mean attention received (accumulated attention divided by
    the queries that saw each token), no recent window, no sinks, GQA mean, prompt cut to the budget at the
    prefill and ``budget`` kept at every decoding step. This is the fork's code given one accumulator per layer
    (what a later version of its file does) in float32 instead of one bf16 accumulator shared by all layers
    (``hott-h2o``); the kept sets match that code's exactly (``tests/reference/test_hott_h2o_fixed.py``). One
    difference remains by design: of entries whose scores tie exactly kvbench keeps the newest, the fork whichever
    its ``topk`` returned first over its cache order (float32 mean attentions practically never tie)."""

    name = "hott-h2o-fixed"
    summary = "the fork's H2O with its defects fixed: mean attention received per layer, no recent window"
    source = "the kvpress fork of arXiv 2512.12008 (h2o_press.py), per-layer float32 state"
    reference = ("minghui-liu/kvpress@43d9e37 kvpress/presses/h2o_press.py (H2OPress.score, compress_prefilling, "
                 "compress_decoding), one accumulator per layer")

    #: No recent window (the fork's H2O has none).
    recent_ratio: float = 0.0
    #: Accumulated attention over the token's age: the fork's ``acc_attn / n_tokens_in_sum``.
    normalize: bool = True


@dataclass
class HottSnapKVDFixedPress(SnapKVDecodingPress):
    """The fork's SnapKV (``snapkv_press.py``: window 64, kernel 5, avg-pooling, the GQA group's mean) applied at
    every decoding step as SnapKV-D means it, with the fork's decoding defects fixed: the mean attention of the 64
    newest queries, each at its own position and seeing the cache up to it (the fork's decoding path saw the
    current query alone), avg-pooled with kernel 5 (zero padding counted) over the tokens before the window in
    token order (the fork pooled along its cache, reordered by ``topk`` at every step), the 64 newest tokens
    protected outright (the fork protected its last 64 cache entries, padded with the layer's maximum score,
    which ties with the best scored token). The prompt, when longer than the budget, is cut at the prefill by the
    same rule, as the fork's ``compress_prefilling`` cuts it. Exactly equal scores are ranked newest first, where
    the fork keeps ``topk``'s order (``tests/reference/test_hott_snapkv_d_fixed.py``)."""

    name = "hott-snapkv-d-fixed"
    summary = "SnapKV-D with the fork's parameters (window 64, kernel 5, avg), every window query at its position"
    source = "the kvpress fork of arXiv 2512.12008 (snapkv_press.py: window_size=64, kernel_size=5)"
    reference = ("minghui-liu/kvpress@43d9e37 kvpress/presses/snapkv_press.py (SnapKVPress.score), decoding with the "
                 "64 newest queries at their own positions")

    #: The fork's observation window and protected entries (64).
    window_size: int = 64


@dataclass
class HottRKVFixedPress(Press):
    """The fork's R-KV rule (``rkv_press.py``) with its parameters and its defects fixed: ``0.1 * importance -
    0.9 * redundancy`` (the fork adds, keeping the most redundant keys); importance = the 8 newest tokens' own
    queries at their own positions, each one's softmax over the keys up to its position (the fork rebuilt the
    decoding queries from a hidden-state buffer shared by all layers, all at the current position, and masked row
    ``i`` to cache indices ``0..i``), the columns before the last 8 cache entries, the mean over the window, the
    GQA group's maximum, max-pooled (kernel 5) along the cache's order; redundancy = the softmax of each non-window
    key's mean cosine similarity to the non-window keys (its own zeroed); the last 8 entries padded with the
    layer's maximum and ``topk(budget)`` gathered in topk's order (the cache order is the fork's, ``source_order``).

    Schedule: every layer compresses to the budget when it holds ``budget + 64`` (the fork's ``compress_interval``,
    "the buffer size"), all on the same step; the fork's one counter for all layers, advanced and reset by layer 0
    alone, made layers 1.. compress at ``budget + 64`` then ``+ 65`` and layer 0 a step later (``hott-rkv``). A
    prompt longer than the budget is cut to it at the prefill, as the fork's ``compress_prefilling`` does.
    Checked against a transcription of the fork's code with these fixes (``tests/reference/test_hott_rkv_fixed.py``).
    """

    name = "hott-rkv-fixed"
    compile_refusal = COMPILE_REFUSAL
    summary = "the fork's R-KV (interval 64, kernel 5, lambda 0.1) with the right sign, per-layer queries, every 64"
    source = "the kvpress fork of arXiv 2512.12008 (rkv_press.py: compress_interval=64, kernel_size=5)"
    reference = ("minghui-liu/kvpress@43d9e37 kvpress/presses/rkv_press.py (RKVPress.score, compress_decoding), "
                 "sign, window queries and schedule fixed")
    #: 3: the fork's own rule with its defects fixed, the prompt cut at the prefill when longer than the budget
    #: (up to 2 it was kvbench's ``rkv`` with the fork's parameters, revision inherited: R-KV's importance and
    #: redundancy rather than the fork's, a prompt up to ``budget + 64`` kept whole)
    revision = 3
    state_names = (STATE,)
    #: Importance is computed here from the window's queries, not from ``view.attention``.
    reads_whole_window = False

    #: Tokens added between two compressions: the cache holds at most ``budget + buffer`` (64, the fork's interval).
    buffer: int = 64
    #: Window queries and last cache entries padded with the maximum (8).
    window_size: int = 8
    #: Max-pooling kernel along the cache's order (5 in the fork; R-KV's code uses 7).
    kernel_size: int = 5
    #: Weight of importance against redundancy (0.1 in the fork).
    mix_lambda: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window_size < 1 or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"{self.name}: window_size >= 1 and an odd kernel_size are needed")
        if not 0.0 <= self.mix_lambda <= 1.0:
            raise ValueError(f"{self.name}: mix_lambda must be in [0, 1], got {self.mix_lambda}")

    @property
    def query_window(self) -> int:
        return self.window_size

    def row_cadence(self, budget: int, prompt_length: int, compressions: int) -> tuple[int, int]:
        keep, trigger = self.cadence(budget)
        if compressions == 0 and prompt_length > budget:  # scorer_press.py:61: the prompt cut at the prefill
            return keep, budget + 1
        return keep, trigger

    def score(self, view: View) -> torch.Tensor:
        if STATE not in view.state:  # a view made by hand, without the engine's state: a cache in token order
            view.state[STATE] = torch.zeros(view.valid.shape, device=view.valid.device)
        index, lengths = fork_index(view), valid_lengths(view)
        order = index.argsort(dim=-1)  # slots in the fork's cache order, the invalid ones last
        keys = view.keys.gather(2, order[..., None].expand(-1, -1, -1, view.keys.shape[-1]))
        key_positions = view.positions.gather(2, order)
        queries, query_positions = window_queries(view)

        def mixed(rows: list[int], prefix: int) -> torch.Tensor:
            length = prefix + self.window_size
            return fork_rkv_score(queries[rows], query_positions[rows], keys[rows, :, :length],
                                  key_positions[rows, :, :length], prefix, self.kernel_size,
                                  self.mix_lambda).float()  # exact: the topk below casts back to the model's dtype

        scores = window_padded(lengths, self.window_size, index.shape[:2], index.device, mixed)
        if view.compress_to is None:  # scored outside the engine: the nominal cadence
            return compress(self, view, index, lengths, scores)
        lengths = [n if n > keep else 0 for n, keep in zip(lengths, view.compress_to)]
        return reorder(view, index, fork_topk(scores.to(view.keys.dtype), lengths, view.budget, 1))
