from dataclasses import dataclass

import torch

from kvbench.errors import KvbenchError
from kvbench.presses.base import INF, Press, pool_by_position, protect


@dataclass
class RPCPress(Press):
    """Reasoning Path Compression: the prompt stays; the reasoning so far is periodically re-selected.

    Every ``buffer`` generated tokens, the generated tokens are scored by the attention of the last
    ``window_size`` queries (each kept post-RoPE with its own position), pooled along the sequence; the
    prompt and the window's own tokens are kept. Unlike the other presses the cache is bounded by the budget
    itself: a compression keeps ``budget - buffer`` entries, so the cache never holds more than ``budget``.
    The attention is a softmax over every visible slot (RPC's code normalises over the selectable tokens only).
    """

    name = "rpc"
    summary = "prompt kept; every `buffer` tokens the reasoning is re-selected by a recent query window"
    source = "Song et al. 2025, arXiv 2505.13866"

    #: Generated tokens between two compressions (RPC's P); 0 = a quarter of the budget, so a compression
    #: keeps three quarters of it.
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

    def __post_init__(self) -> None:
        if self.buffer < 0:
            raise ValueError(f"rpc: buffer must be >= 0 (0 = a quarter of the budget), got {self.buffer}")
        if self.window_size < 1:
            raise ValueError(f"rpc: window_size must be >= 1, got {self.window_size}")
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"rpc: pooling must be 'avg' or 'max', got {self.pooling!r}")
        if self.aggregation not in ("all", "group"):
            raise ValueError(f"rpc: aggregation must be 'all' or 'group', got {self.aggregation!r}")

    def cadence(self, budget: int) -> tuple[int, int]:
        interval = self.buffer or max(1, budget // 4)
        if interval >= budget:
            raise KvbenchError(f"rpc: buffer {interval} must be below the budget {budget} (the cache holds at most "
                               "the budget; a compression keeps budget - buffer)")
        return budget - interval, budget

    @property
    def query_window(self) -> int:
        return self.window_size

    def score(self, view) -> torch.Tensor:
        attention = view.attention(gqa="mean")
        if self.aggregation == "all":
            attention = attention.mean(dim=1, keepdim=True).expand_as(attention)
        scores = protect(pool_by_position(attention, view, self.kernel_size, self.pooling), view,
                         recent=self.window_size)
        if view.step == 0:  # a prompt longer than the budget is compressed like SnapKV
            return scores
        return scores.masked_fill(view.positions < view.prompt_length[:, None, None], INF)
