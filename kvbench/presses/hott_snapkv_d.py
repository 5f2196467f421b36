from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.errors import KvbenchError
from kvbench.presses.base import Press
from kvbench.presses.hott_order import (
    STATE,
    compress,
    fork_index,
    to_fork_order,
    valid_lengths,
    window_padded,
)


@dataclass
class HottSnapKVDPress(Press):
    """SnapKV-D as the paper's harness's decoding path computes it: the current query only, by cache index.

    Bug-compatible with the fork's ``snapkv_press.py`` (43d9e37) given eager attentions, its only decoding path
    that runs (without them it raises, or scores NaN in later versions). It takes ``attentions[..., -64:, :-64]``,
    which while decoding is the *current* query's row; averages it over that one query, avg-pools it (kernel 5,
    zero padding counted) along the cache's physical order, averages the GQA group, pads the last 64 cache
    entries with the maximum score of the layer and keeps ``topk(budget)``, gathered in topk's order. So its
    "window" is the last 64 entries of a cache reordered by score at every step (the newest token and the 63
    lowest-ranked survivors), and its pooling neighbours are score-order neighbours. The prefill uses the prompt's
    last 64 queries, as SnapKV. Emulated over each slot's fork index with the fork's ``topk``; the attention is
    rounded to the model's dtype, as eager attention returns it.
    """

    name = "hott-snapkv-d"
    summary = "the paper's harness's SnapKV-D: current query only, window and pooling by cache index (bug-compatible)"
    source = "the kvpress fork of arXiv 2512.12008 (snapkv_press.py @43d9e37, eager decoding path)"
    state_names = (STATE,)
    #: Decoding scores read the newest query of the window only.
    reads_whole_window = False

    #: Prompt queries that score the prefill, and cache entries padded with the maximum (64 in the fork).
    window_size: int = 64
    #: Average-pooling kernel along the cache's order (5 in the fork).
    kernel_size: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window_size < 1 or self.kernel_size < 1 or self.kernel_size % 2 == 0 or self.buffer != 1:
            raise ValueError(f"{self.name}: window_size >= 1, an odd kernel_size and buffer 1 are needed")

    def cadence(self, budget: int) -> tuple[int, int]:
        if budget < self.window_size:
            raise KvbenchError(f"{self.name}: budget {budget} is below its window of {self.window_size} (the fork "
                               "asserts that the cache is longer than the window)")
        return super().cadence(budget)

    @property
    def query_window(self) -> int:
        return self.window_size

    def score(self, view) -> torch.Tensor:
        index, lengths = fork_index(view), valid_lengths(view)
        attention = view.attention(gqa="mean", last=None if view.step == 0 else 1).to(view.keys.dtype).float()
        ordered = to_fork_order(attention, index, view.valid, max(lengths))

        def pooled(rows: list[int], prefix: int) -> torch.Tensor:
            return F.avg_pool1d(ordered[rows, :, :prefix], self.kernel_size, stride=1, padding=self.kernel_size // 2)

        scores = window_padded(lengths, self.window_size, ordered.shape[:2], ordered.device, pooled)
        return compress(self, view, index, lengths, scores)
