from dataclasses import dataclass

import torch

from kvbench.presses.base import INF
from kvbench.presses.ranking import rank_slots, slot_ranks
from kvbench.presses.wrapper import WrapperPress


@dataclass
class AdaKVPress(WrapperPress):
    """AdaKV: the KV heads of a layer share its budget by score instead of taking equal parts.

    At each compression a layer keeps its ``heads x budget`` best-scored entries over all its KV heads together,
    each head first guaranteed its ``int(alpha x budget)`` best, protected tokens included: the safeguard of
    kvpress's ``AdaKVPress``, whose rule this is. AdaKV's own code (FFY0/AdaKV) guarantees
    ``int(alpha x (budget - window))`` scored entries on top of the window and gives each head
    ``round(count x (1 - alpha) + that floor)`` of the ``heads x (budget - window)`` it wins jointly, so with
    snapkv-d's 32 protected tokens and alpha 0.2 kvbench guarantees no scored entry up to budget 164
    (``tests/reference/test_adakv.py`` measures both; they agree at alpha 0). The inner press's scores must be
    comparable across heads (attention is; key norms are, less meaningfully). A head may hold up to
    ``heads x budget - (heads - 1) x int(alpha x budget)`` entries, which is what the cache allocates per head; the
    entries held add up to the budget.
    """

    name = "adakv"
    summary = "per-head budgets within each layer by score, same total; wraps a scoring press"
    source = "Feng et al. 2024, arXiv 2407.11550"
    reference = "NVIDIA/kvpress@8bb29b9 kvpress/presses/adakv_press.py (AdaKVPress.compress)"
    # 2: the guarantee int(alpha x budget) computed in double precision, as kvpress's code and ``head_capacity``
    # compute it (1: in float32, one entry less or more for some alphas, e.g. 62 not 63 at alpha 0.84, budget 75;
    # never at alpha 0.2). A composition's revision is its inner press's plus this one's raise (``__post_init__``).
    revision = 2

    #: Share of its budget each head keeps whatever the other heads' scores, protected tokens included (kvpress's
    #: alpha_safeguard, 0.2; AdaKV's code applies its floor_alpha, 0.2, to the budget less the window).
    alpha: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        self.revision = self.inner.revision + type(self).revision - 1
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"adakv: alpha must be in [0, 1], got {self.alpha}")

    def head_capacity(self, layer_budget: int, n_heads: int) -> int:
        return n_heads * layer_budget - (n_heads - 1) * int(self.alpha * layer_budget)

    def head_counts(self, scores: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        n, h, s = scores.shape
        guaranteed = (self.alpha * keep.double()).floor().long()[:, None, None]  # [N, 1, 1]: int(alpha * keep)
        boosted = scores.masked_fill((slot_ranks(scores, positions) < guaranteed) & (scores > -INF), INF)
        # One ranking over the layer's heads together (equal scores: newest first, then lower head).
        joint = rank_slots(boosted.reshape(n, 1, h * s), positions.reshape(n, 1, h * s)).reshape(n, h * s)
        chosen = torch.arange(h * s, device=scores.device) < (keep * h)[:, None]
        return torch.zeros(n, h, dtype=torch.long, device=scores.device).scatter_add_(1, joint // s, chosen.long())
