from dataclasses import dataclass

import torch

from kvbench.presses.base import Press, protect


@dataclass
class KNormPress(Press):
    """Keep the keys with the lowest L2 norm (they draw the most attention)."""

    name = "knorm"
    summary = "lowest key L2 norm"
    source = "Devoto et al. 2024, arXiv 2406.11430"

    #: First tokens always kept. 0 = no protection, as in Devoto et al., kvpress and the paper.
    n_sink: int = 0
    #: Most recent tokens always kept. 0 = no protection (the paper's variant).
    recent_window: int = 0

    def score(self, view) -> torch.Tensor:
        return protect(-view.keys.float().norm(dim=-1), view, n_sink=self.n_sink, recent=self.recent_window)
