from dataclasses import dataclass

import torch

from kvbench.presses.base import Press, View, protect


@dataclass
class H2OPress(Press):
    """Heavy hitters: accumulated attention received, plus a recent window.

    H2O's ``H2OKVCache_LayerWise``: per layer and KV head, the attention each cached token has received, summed
    over every query that saw it (the prompt's queries included); once a layer holds more than the budget it keeps
    the ``recent_ratio`` newest entries and the highest accumulated scores among the rest. H2O's code is MHA only;
    under GQA a KV head's score is its query heads' mean (``gqa``). Of entries whose scores tie exactly kvbench keeps
    the newest, H2O whichever ``torch.topk`` returns first (accumulated sums practically never tie).

    ``recent_ratio=0 normalize=true`` is the rule the paper's harness meant (``hott-h2o-fixed``): no recent window,
    and the accumulated attention divided by the number of queries that could attend to each token (its age). The
    harness's code ran it with one bf16 accumulator shared by all layers (``hott-h2o``).
    """

    name = "h2o"
    summary = "accumulated attention received + recent window"
    source = "Zhang et al. 2023, arXiv 2306.14048"
    reference = "FMInference/H2O@ac75c2a h2o_hf/utils_real_drop/modify_llama.py (H2OKVCache_LayerWise)"
    state_names = ("accumulated",)

    #: Fraction of the budget kept for the most recent tokens (H2O splits heavy hitters and recent 50/50).
    recent_ratio: float = 0.5
    #: Divide accumulated attention by the token's age (queries that saw it), as the paper's harness meant to
    #: (not H2O's rule; see ``hott-h2o`` for what the harness's code computed).
    normalize: bool = False
    #: How the query heads of a GQA group are combined: mean (kvpress, the paper's harness) or max. H2O's code is
    #: MHA only.
    gqa: str = "mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"h2o: recent_ratio must be in [0, 1], got {self.recent_ratio}")

    @property
    def accumulates_attention(self) -> bool:
        return True

    def observe(self, view: View, attention: torch.Tensor) -> None:
        view.state["accumulated"] += attention

    def score(self, view: View) -> torch.Tensor:
        scores = view.state["accumulated"].clone()
        if self.normalize:
            age = (view.query_position[:, None, None] - view.positions + 1).clamp(min=1)
            scores = scores / age
        recent = int(self.recent_ratio * view.budget) if view.budget else 0
        return protect(scores, view, recent=recent)
