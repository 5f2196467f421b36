from dataclasses import dataclass

import torch

from kvbench.presses.base import Press


@dataclass
class RandomPress(Press):
    """Evict uniformly at random (a floor every policy should beat). Seeded per sequence and layer by ``--seed``."""

    name = "random"
    summary = "uniform random scores"
    source = "-"

    def score(self, view) -> torch.Tensor:
        _, h, s = view.positions.shape
        rows = [torch.rand(h, s, generator=g, device=view.positions.device) for g in view.generators]
        return torch.stack(rows)
