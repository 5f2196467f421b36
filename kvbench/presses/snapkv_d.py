from dataclasses import dataclass

import torch

from kvbench.presses.base import Press, pool_by_position, protect


@dataclass
class SnapKVDecodingPress(Press):
    """SnapKV applied at every compression during decoding (the paper's SnapKV-D).

    Scores are the mean attention of the last ``window_size`` queries (each kept post-RoPE with its own
    position), pooled along the sequence; the last ``window_size`` tokens are protected.
    """

    name = "snapkv-d"
    summary = "attention of a window of recent queries, pooled; window protected"
    source = "Li et al. 2024, arXiv 2404.14469; decoding variant: the paper, arXiv 2512.12008"

    #: Observation window (recent queries) and protected recent tokens. SnapKV's code and kvpress use 64;
    #: 32 keeps the window a minority of small budgets. Set 64 to match the paper's harness.
    window_size: int = 32
    #: Pooling kernel over token order (5 in SnapKV's code and kvpress).
    kernel_size: int = 5
    #: Pooling: avg (SnapKV's code default) or max.
    pooling: str = "avg"
    #: How the query heads of a GQA group are combined: mean (SnapKV issue #22, kvpress) or max.
    gqa: str = "mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window_size < 1:
            raise ValueError(f"snapkv-d: window_size must be >= 1, got {self.window_size}")

    @property
    def query_window(self) -> int:
        return self.window_size

    def score(self, view) -> torch.Tensor:
        scores = pool_by_position(view.attention(gqa=self.gqa), view, self.kernel_size, self.pooling)
        return protect(scores, view, recent=self.window_size)
