from dataclasses import dataclass

import torch

from kvbench.presses.base import Press, View


@dataclass
class RandomPress(Press):
    """Evict uniformly at random (a floor every policy should beat). Seeded per sequence and layer by ``--seed``."""

    name = "random"
    summary = "uniform random scores"
    source = "-"
    revision = 2  # hash draws instead of generator streams

    def score(self, view: View) -> torch.Tensor:
        # A hash of (row seed, step, KV head, position), not a generator's stream: the draws do not depend on
        # how many slots the batch holds or where a token sits, so a sequence evicts alike in any batch.
        h = view.positions.shape[1]
        heads = torch.arange(h, device=view.positions.device)
        step = view.step if view.row_step is None else view.row_step  # each sequence's own step (continuous)
        x = _mix(_mix(view.seeds * 1_000_003 + step)[:, None, None] ^ heads[None, :, None])
        x = _mix(x ^ view.positions)
        return ((x >> 11) & ((1 << 53) - 1)).double().div(2.0**53).float()


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 (multiplication wraps; logical right shifts by masking)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * -4658895280553007687  # 0xbf58476d1ce4e5b9
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * -7723592293110705685  # 0x94d049bb133111eb
    return x ^ ((x >> 31) & ((1 << 33) - 1))
