from dataclasses import dataclass

import torch

from kvbench.errors import KvbenchError
from kvbench.presses.base import (
    INF,
    Press,
    View,
    at_prefill,
    pool_by_position,
    protect,
    recent_positions,
    window_logits,
)

_UNBOUNDED = 2**62


@dataclass
class RPCPress(Press):
    """Reasoning Path Compression: the prompt stays; the reasoning so far is periodically re-selected.

    The reasoning tokens (after the prompt, before the last ``window_size``) are scored as RPC's code does
    (``RPCCluster.compress_kv``): the selector queries (post-RoPE, each at its own position) softmaxed over those
    tokens only, summed over the selectors, averaged over all query heads (``aggregation=all``: one selection for
    every KV head) or over each KV head's group (``group``), then average-pooled along the sequence
    (``kernel_size``, zero padding counted). The prompt and the window's own tokens are kept.

    ``query_weights=rpc`` (RPC's code): the selectors are the last ``window_size - 1`` queries with the newest
    counted twice: RPC caches a query only while ``target_length > P - R`` (``qwen2_custom.py`` 95-97), which
    holds for the last R - 1 forwards before a compression, the compressing one included, and ``compress_kv``
    then appends the current query again (``rpc_utils.py`` 96-97). ``query_weights=uniform`` (kvbench's revision
    2, a variant): each of the last ``window_size`` queries once.

    ``schedule=growth`` (RPC's published schedule; its code's ``P``, ``R``, ``c``): ``--budget`` is the period
    ``P``. No compression until ``P + R`` tokens have been generated; then every ``P`` tokens the reasoning is
    re-selected down to ``(k + 1) * P / ratio`` tokens at the ``k``-th compression (k = 0, 1, ...): the kept
    reasoning grows with the length, the cache is not bounded by a budget, and the prompt is never compressed.
    ``schedule=budget`` (a kvbench variant, not RPC's): the cache holds at most ``budget`` entries, prompt
    included; every ``buffer`` tokens (0 = a quarter of the budget) a compression keeps ``budget - buffer``; a
    prompt longer than the budget is compressed like SnapKV at the prefill.

    Differences from RPC's code that remain: scores are computed in float32 (RPC: its softmax in float32, the
    sums, means and pooling in the model's dtype, bf16 in its runs), and equal scores are kept newest first
    (RPC: ``topk``'s order), so near-ties can fall differently; logits are scaled by the model's attention
    scaling (RPC: ``1/sqrt(head_dim)``, the same for Qwen and Llama); RPC's scripts decode batches of 8
    left-padded prompts whose ``prompt_len`` and schedule are the padded batch's, kvbench each sequence's own.
    """

    name = "rpc"
    summary = "prompt kept; every P tokens the reasoning is re-selected by the last R queries, growing at ratio 1/c"
    source = "Song et al. 2025, arXiv 2505.13866"
    reference = "jiwonsong-dev/ReasoningPathCompression@00e64b7 rpc/rpc_utils.py (RPCCluster.compress_kv)"
    # 3: RPC's selectors (the last R - 1 queries, the newest twice); 2: growth schedule, softmax over the reasoning
    revision = 3
    reads_whole_window = False

    #: growth: RPC's schedule (--budget = its period P); budget: bounded by the budget (a kvbench variant).
    schedule: str = "growth"
    #: growth: each compression keeps P / ratio more reasoning tokens than the last (RPC's c = 4).
    ratio: int = 4
    #: budget schedule: tokens between two compressions (0 = a quarter of the budget).
    buffer: int = 0
    #: Recent queries that score, and recent tokens kept (RPC's R = 32).
    window_size: int = 32
    #: Pooling kernel over token order (7 in RPC's code).
    kernel_size: int = 7
    #: Pooling: avg (RPC's default) or max.
    pooling: str = "avg"
    #: all: one selection for every KV head, from the mean over all query heads (RPC's default aggregation);
    #: group: each KV head by its own GQA group's mean.
    aggregation: str = "all"
    #: rpc: the last window_size - 1 queries select, the newest counted twice (RPC's code); uniform: each of the
    #: last window_size once (kvbench's revision 2).
    query_weights: str = "rpc"

    def __post_init__(self) -> None:
        if self.schedule not in ("growth", "budget"):
            raise ValueError(f"rpc: schedule must be 'growth' or 'budget', got {self.schedule!r}")
        if self.buffer < 0 or self.ratio < 1:
            raise ValueError(f"rpc: buffer must be >= 0 and ratio >= 1, got {self.buffer}, {self.ratio}")
        if self.window_size < 1 or self.kernel_size < 1:
            raise ValueError(f"rpc: window_size and kernel_size must be >= 1, got {self.window_size}, "
                             f"{self.kernel_size}")
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"rpc: pooling must be 'avg' or 'max', got {self.pooling!r}")
        if self.aggregation not in ("all", "group"):
            raise ValueError(f"rpc: aggregation must be 'all' or 'group', got {self.aggregation!r}")
        if self.query_weights not in ("rpc", "uniform"):
            raise ValueError(f"rpc: query_weights must be 'rpc' or 'uniform', got {self.query_weights!r}")

    @property
    def grows(self) -> bool:
        return self.schedule == "growth"

    def cadence(self, budget: int) -> tuple[int, int]:
        if self.grows:
            if budget < self.ratio:
                raise KvbenchError(f"rpc: the period {budget} (--budget) must be at least the ratio {self.ratio}")
            return budget // self.ratio, budget  # nominal: each sequence follows ``row_cadence``
        interval = self.buffer or max(1, budget // 4)
        if interval >= budget:
            raise KvbenchError(f"rpc: buffer {interval} must be below the budget {budget} (the cache holds at most "
                               "the budget; a compression keeps budget - buffer)")
        return budget - interval, budget

    def row_cadence(self, budget: int, prompt_length: int, compressions: int) -> tuple[int, int]:
        """RPC's code: the ``k``-th compression comes when the cache holds prompt + k P/c + R + P entries and keeps
        prompt + (k + 1) P/c + R."""
        if not self.grows:
            return self.cadence(budget)
        kept = budget // self.ratio
        base = prompt_length + compressions * kept + self.window_size
        return base + kept, base + budget

    def capacity(self, budget: int, n_layers: int, n_heads: int) -> int:
        return _UNBOUNDED if self.grows else super().capacity(budget, n_layers, n_heads)

    @property
    def query_window(self) -> int:
        return self.window_size

    def score(self, view: View) -> torch.Tensor:
        recent = recent_positions(view, self.window_size)
        prompt = view.positions < view.prompt_length[:, None, None]
        if at_prefill(view):  # budget schedule, a prompt longer than the budget: compressed like SnapKV
            prompt = torch.zeros_like(prompt)
        reasoning = view.valid & ~prompt & ~recent
        attention = self._selector_attention(view, reasoning)
        if self.aggregation == "all":
            attention = attention.mean(dim=1, keepdim=True).expand_as(attention)
        scores = pool_by_position(attention, view, self.kernel_size, self.pooling, among=reasoning,
                                  count_padding=True)
        return protect(scores, view, recent=self.window_size).masked_fill(prompt, INF)

    def _selector_attention(self, view, reasoning: torch.Tensor) -> torch.Tensor:
        """[N, H, S]: each selector query's softmax over the ``reasoning`` slots, summed over the selectors with
        their weights, averaged over each KV head's query heads (``rpc_utils.py`` 109-113, 125-131)."""
        window = view.window
        probs = torch.softmax(window_logits(view).masked_fill(~reasoning[:, :, None, None, :], -torch.inf), dim=-1)
        weights = window.valid.float()
        if self.query_weights == "rpc":  # the oldest query out, the newest twice
            stamp = window.positions.masked_fill(~window.valid, -1)
            newest = stamp.argmax(dim=-1, keepdim=True)
            oldest = window.positions.masked_fill(~window.valid, torch.iinfo(torch.long).max).argmin(-1, keepdim=True)
            weights = weights.scatter(-1, oldest, 0.0).scatter_add(-1, newest, torch.ones_like(weights[:, :1]))
        summed = (probs.nan_to_num(0.0) * weights[:, None, None, :, None]).sum(dim=3)
        return summed.mean(dim=2)
