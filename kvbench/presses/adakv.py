from dataclasses import dataclass

import torch

from kvbench.presses.base import INF
from kvbench.presses.ranking import rank_slots, slot_ranks
from kvbench.presses.wrapper import WrapperPress


@dataclass
class AdaKVPress(WrapperPress):
    """AdaKV: the KV heads of a layer share its budget by score instead of taking equal parts.

    At each compression a layer keeps its ``heads x budget`` best-scored entries over all its KV heads together,
    each head first guaranteed its ``alpha x budget`` best (AdaKV's safeguard). The inner press's scores must be
    comparable across heads (attention is; key norms are, less meaningfully). A head may hold up to
    ``heads x budget - (heads - 1) x alpha x budget`` entries, which is what the cache allocates per head; the
    entries held add up to the budget.
    """

    name = "adakv"
    summary = "per-head budgets within each layer by score, same total; wraps a scoring press"
    source = "Feng et al. 2024, arXiv 2407.11550"

    #: Share of its budget each head keeps whatever the other heads' scores (AdaKV's safeguard, 0.2).
    alpha: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"adakv: alpha must be in [0, 1], got {self.alpha}")

    def head_capacity(self, layer_budget: int, n_heads: int) -> int:
        return n_heads * layer_budget - (n_heads - 1) * int(self.alpha * layer_budget)

    def head_counts(self, scores: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        n, h, s = scores.shape
        guaranteed = (self.alpha * keep).floor().long()[:, None, None]  # [N, 1, 1]
        boosted = scores.masked_fill((slot_ranks(scores, positions) < guaranteed) & (scores > -INF), INF)
        # One ranking over the layer's heads together (equal scores: newest first, then lower head).
        joint = rank_slots(boosted.reshape(n, 1, h * s), positions.reshape(n, 1, h * s)).reshape(n, h * s)
        chosen = torch.arange(h * s, device=scores.device) < (keep * h)[:, None]
        return torch.zeros(n, h, dtype=torch.long, device=scores.device).scatter_add_(1, joint // s, chosen.long())
