"""A press written outside kvbench: attention weighted by the value's norm (kvbench's README, "Write your own press").

Run it with ``--press examples/my_press.py:ValueNormAttentionPress`` (or ``examples.my_press:...`` from the
repository root) and certify it with ``kvbench verify examples/my_press.py:ValueNormAttentionPress``.
"""

from dataclasses import dataclass

import torch

from kvbench.presses.base import Press, View, protect


@dataclass
class ValueNormAttentionPress(Press):
    """Keep the entries whose attention from the recent queries, times the L2 norm of their value, is highest:
    a token that draws attention but carries a near-zero value adds little to the output. After VATP (Guo et al.
    2024), which weights accumulated attention; this press weights the window's, as SnapKV-D does."""

    name = "value-norm-attention"
    summary = "recent queries' attention x value L2 norm; sinks and window protected"
    source = "after Guo et al. 2024, arXiv 2406.12335 (VATP)"

    #: Recent queries whose attention is averaged; the newest tokens up to it are always kept.
    window_size: int = 8
    #: First tokens always kept (attention sinks, as VATP keeps them).
    n_sink: int = 4

    @property
    def query_window(self) -> int:
        return self.window_size

    def score(self, view: View) -> torch.Tensor:
        attention = view.attention(gqa="mean")  # [N, H, S], zero on invalid slots
        scores = attention * view.values.float().norm(dim=-1)
        return protect(scores, view, n_sink=self.n_sink, recent=self.window_size)
