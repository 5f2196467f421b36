from dataclasses import dataclass

import torch

from kvbench.presses.base import Press, View


@dataclass
class TOVAPress(Press):
    """Keep the tokens the current query attends to most.

    TOVA's ``TOVACache.reduce``: after each forward's attention, once a layer holds more than the budget, the last
    query's attention averaged over all query heads, top ``budget`` kept, the same tokens in every KV head (in the
    prefill the last prompt token is the query). Of entries whose scores tie exactly (a key repeated exactly draws
    exactly the same attention) kvbench keeps the newest; TOVA keeps whichever ``torch.topk`` returns first.
    """

    name = "tova"
    summary = "attention of the current query"
    source = "Oren et al. 2024, arXiv 2401.06104"
    reference = "schwartz-lab-NLP/TOVA@9c7d09b src/tova_cache.py (TOVACache.reduce)"

    #: False = TOVA's rule: attention averaged over all heads, so every KV head keeps the same tokens.
    #: True = each KV head ranks by its own GQA group's attention.
    per_head: bool = False

    @property
    def query_window(self) -> int:
        return 1

    def score(self, view: View) -> torch.Tensor:
        attention = view.attention(gqa="mean")
        if self.per_head:
            return attention
        # Invalid slots differ per head only after per-head evictions, which this rule never makes.
        return attention.mean(dim=1, keepdim=True).expand_as(attention)
