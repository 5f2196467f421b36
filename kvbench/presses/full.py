from dataclasses import dataclass

import torch

from kvbench.presses.base import Press, View


@dataclass
class FullPress(Press):
    """No eviction: the reference every other press is compared with."""

    name = "full"
    summary = "no eviction (the full cache)"
    source = "-"
    evicts = False

    def score(self, view: View) -> torch.Tensor:
        return torch.zeros_like(view.positions, dtype=torch.float32)
