"""The paper's harness's rules and parameters with its defects fixed: what its code meant to compute.

Each is a kvbench press with the fork's parameters as defaults (kvpress fork of arXiv 2512.12008 at 43d9e37,
``kvpress/presses/*`` and ``reason/evaluate.py``); the ``hott-*`` presses reproduce what the code did instead.
"""

from dataclasses import dataclass

from kvbench.presses.h2o import H2OPress
from kvbench.presses.rkv import RKVPress
from kvbench.presses.snapkv_d import SnapKVDecodingPress


@dataclass
class HottH2OFixedPress(H2OPress):
    """The fork's H2O rule, per layer and in float32: mean attention received (accumulated attention divided by
    the queries that saw each token), no recent window, no sinks, GQA mean. A token-for-token comparison with the
    fork given per-layer accumulators matched it exactly (paper-harness audit, addendum)."""

    name = "hott-h2o-fixed"
    summary = "the fork's H2O with its defects fixed: mean attention received per layer, no recent window"
    source = "the kvpress fork of arXiv 2512.12008 (h2o_press.py), per-layer float32 state"

    #: No recent window (the fork's H2O has none).
    recent_ratio: float = 0.0
    #: Accumulated attention over the token's age: the fork's ``acc_attn / n_tokens_in_sum``.
    normalize: bool = True


@dataclass
class HottSnapKVDFixedPress(SnapKVDecodingPress):
    """The fork's SnapKV parameters applied at every decoding step as SnapKV-D means it: the mean attention of
    the last 64 queries, each at its own position (the fork's decoding path saw one query), avg-pooled with
    kernel 5 over the scored prefix in token order (the fork pooled in its reordered cache order), the 64 newest
    tokens protected (the fork protected its last 64 cache entries)."""

    name = "hott-snapkv-d-fixed"
    summary = "SnapKV-D with the fork's parameters (window 64, kernel 5, avg), every window query at its position"
    source = "the kvpress fork of arXiv 2512.12008 (snapkv_press.py: window_size=64, kernel_size=5)"

    #: The fork's observation window and protected entries (64).
    window_size: int = 64


@dataclass
class HottRKVFixedPress(RKVPress):
    """R-KV with the fork's parameters and its defects fixed: the least redundant keys kept (the fork's sign keeps
    the most redundant), importance from the 8 newest queries at their own positions (the fork rebuilt them from
    a hidden-state buffer that every layer overwrites), compressions every 64 tokens (the fork's
    ``compress_interval``), max-pool kernel 5, lambda 0.1, the 8 newest protected."""

    name = "hott-rkv-fixed"
    summary = "R-KV with the fork's parameters (interval 64, kernel 5, lambda 0.1) and the right sign"
    source = "the kvpress fork of arXiv 2512.12008 (rkv_press.py: compress_interval=64, kernel_size=5)"

    #: Tokens between two compressions (the fork's ``compress_interval``).
    buffer: int = 64
    #: Max-pooling kernel (5 in the fork; R-KV's code uses 7).
    kernel_size: int = 5
