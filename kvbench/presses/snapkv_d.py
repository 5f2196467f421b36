from dataclasses import dataclass

import torch

from kvbench.presses.base import Press, View, pool_by_position, protect, recent_positions


@dataclass
class SnapKVDecodingPress(Press):
    """SnapKV applied at every compression during decoding (the paper's SnapKV-D).

    Scores are the mean attention of the last ``window_size`` queries (each kept post-RoPE with its own
    position), pooled along the sequence over the tokens before the window (zero padding counted, as SnapKV's
    ``avg_pool1d``); the last ``window_size`` tokens are protected. SnapKV's ``update_kv`` rule, which SnapKV runs
    on the prompt only, with these differences (``tests/reference/test_snapkv_d.py`` measures each): GQA: the
    group's mean (kvpress), where SnapKV's code selects per query head; pooling along token order, where SnapKV's
    own cache, re-applied during decoding, would be in ``topk``'s score order and pool over score-order neighbours;
    equal scores (max pooling makes them) ranked newest first, where SnapKV keeps ``topk``'s order.
    """

    name = "snapkv-d"
    summary = "attention of a window of recent queries, pooled; window protected"
    source = "Li et al. 2024, arXiv 2404.14469; decoding variant: the paper, arXiv 2512.12008"
    revision = 2  # pools the scored prefix only, zero padding counted (1: every slot, padding not counted)
    reference = "FasterDecoding/SnapKV@e216ddc snapkv/monkeypatch/snapkv_utils.py (SnapKVCluster.update_kv)"

    #: Observation window (recent queries) and protected recent tokens: 32, SnapKV's runtime default
    #: (``init_snapkv``) and its LongBench configs; its class default and kvpress use 64 (hott-snapkv-d-fixed).
    window_size: int = 32
    #: Pooling kernel over token order (5 in SnapKV's code and kvpress; 7 in SnapKV's LongBench configs).
    kernel_size: int = 5
    #: Pooling: avg (SnapKV's code default) or max (SnapKV's LongBench configs).
    pooling: str = "avg"
    #: How the query heads of a GQA group are combined: mean (SnapKV issue #22, kvpress) or max.
    gqa: str = "mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window_size < 1 or self.kernel_size < 1:
            raise ValueError(f"{self.name}: window_size and kernel_size must be >= 1, got {self.window_size}, "
                             f"{self.kernel_size}")
        if self.pooling not in ("avg", "max") or self.gqa not in ("mean", "max"):
            raise ValueError(f"{self.name}: pooling must be 'avg' or 'max' and gqa 'mean' or 'max', got "
                             f"{self.pooling!r}, {self.gqa!r}")

    @property
    def query_window(self) -> int:
        return self.window_size

    def score(self, view: View) -> torch.Tensor:
        prefix = view.valid & ~recent_positions(view, self.window_size)
        scores = pool_by_position(view.attention(gqa=self.gqa), view, self.kernel_size, self.pooling, among=prefix,
                                  count_padding=True)
        return protect(scores, view, recent=self.window_size)
