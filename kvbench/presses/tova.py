from dataclasses import dataclass

import torch

from kvbench.presses.base import Press


@dataclass
class TOVAPress(Press):
    """Keep the tokens the current query attends to most."""

    name = "tova"
    summary = "attention of the current query"
    source = "Oren et al. 2024, arXiv 2401.06104"

    #: False = TOVA's rule: attention averaged over all heads, so every KV head keeps the same tokens.
    #: True = each KV head ranks by its own GQA group's attention.
    per_head: bool = False

    @property
    def query_window(self) -> int:
        return 1

    def score(self, view) -> torch.Tensor:
        attention = view.attention(gqa="mean")
        if self.per_head:
            return attention
        # Invalid slots differ per head only after per-head evictions, which this rule never makes.
        return attention.mean(dim=1, keepdim=True).expand_as(attention)
