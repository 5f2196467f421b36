from dataclasses import dataclass

import torch

from kvbench.errors import KvbenchError
from kvbench.presses.base import INF, Press
from kvbench.presses.ranking import rank_slots


@dataclass
class SCOPEPress(Press):
    """SCOPE: the prompt and the reasoning get separate budgets, chosen separately.

    Prefill: the prompt's best ``prefill_budget`` tokens, by the attention the prompt's own queries gave them
    (H2O's prefill, one of SCOPE's prefill methods) with the last ``recent_ratio`` of them protected, are
    pinned for the whole run; the rest of the prompt goes first. Decoding: the generated tokens share what
    the pinned prompt leaves of the budget, re-selected every ``buffer`` steps, the most recent ``recent_ratio``
    of the decoding budget protected. SCOPE's code scores decoding tokens by the current query's attention
    (``scoring=current``; with ``buffer=1`` that is its "slide" strategy, with a larger buffer its
    "discontinuous" one, whose budget SCOPE also grows, here fixed). The default, ``scoring=accumulated``, ranks
    by the attention accumulated since each token was written (its paper's heavy hitters): steadier between
    re-selections, and not SCOPE's code. SCOPE budgets the prompt and the decoding separately (2048 and
    512-1024 tokens in its scripts); here one budget is split.
    """

    name = "scope"
    summary = "pinned prompt (prefill budget) + generated tokens re-selected by accumulated attention"
    source = "Wu et al. 2024, arXiv 2412.13649"
    state_names = ("accumulated", "pinned")

    #: Decoding steps between two re-selections (SCOPE's discontinuous delta is 15; 1 = its slide strategy).
    buffer: int = 16
    #: Prompt entries pinned for the whole run; 0 = half the budget. The decoding budget is the rest.
    prefill_budget: int = 0
    #: Share of each phase's budget kept for its most recent tokens (SCOPE: 256 of a 1024 decoding budget).
    recent_ratio: float = 0.25
    #: How the query heads of a GQA group are combined: mean or max.
    gqa: str = "mean"
    #: Decoding scores: accumulated attention, or the current query's attention (SCOPE's code).
    scoring: str = "accumulated"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prefill_budget < 0:
            raise ValueError(f"scope: prefill_budget must be >= 0 (0 = half the budget), got {self.prefill_budget}")
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"scope: recent_ratio must be in [0, 1], got {self.recent_ratio}")
        if self.scoring not in ("accumulated", "current") or self.gqa not in ("mean", "max"):
            raise ValueError(f"scope: scoring must be 'accumulated' or 'current' and gqa 'mean' or 'max', got "
                             f"{self.scoring!r}, {self.gqa!r}")

    def prompt_budget(self, budget: int) -> int:
        return self.prefill_budget or budget // 2

    def cadence(self, budget: int) -> tuple[int, int]:
        if self.prompt_budget(budget) >= budget:
            raise KvbenchError(f"scope: prefill_budget {self.prefill_budget} must be below the budget {budget} "
                               "(the generated tokens get the rest)")
        return super().cadence(budget)

    @property
    def accumulates_attention(self) -> bool:
        return True  # the prefill's attention pins the prompt

    @property
    def query_window(self) -> int:
        return 1 if self.scoring == "current" else 0

    def observe(self, view, attention: torch.Tensor) -> None:
        view.state["accumulated"] += attention
        if view.step == 0:
            self._pin_prompt(view)

    def _pin_prompt(self, view) -> None:
        """Mark the prompt's best ``prefill_budget`` slots per KV head: they are never evicted."""
        pinned_n = self.prompt_budget(view.budget)
        prompt_length = view.prompt_length[:, None, None]
        in_prompt = view.valid & (view.positions < prompt_length)
        recent = view.positions >= prompt_length - int(self.recent_ratio * pinned_n)
        scores = view.state["accumulated"].masked_fill(recent, INF).masked_fill(~in_prompt, -INF)
        best = rank_slots(scores, view.positions)[..., :pinned_n]
        pinned = torch.zeros_like(view.state["pinned"]).scatter_(-1, best, 1.0) * in_prompt
        view.state["pinned"].copy_(pinned)

    def score(self, view) -> torch.Tensor:
        pinned = view.state["pinned"] > 0
        if view.step == 0:  # a prompt longer than the cache: the pinned ones, then the prompt's heavy hitters
            return view.state["accumulated"].masked_fill(pinned, INF)
        decoding_budget = view.budget - self.prompt_budget(view.budget)
        recent = view.positions > view.query_position[:, None, None] - int(self.recent_ratio * decoding_budget)
        generated = view.positions >= view.prompt_length[:, None, None]
        ranked = view.state["accumulated"] if self.scoring == "accumulated" else view.attention(gqa=self.gqa)
        scores = ranked.masked_fill(generated & recent, INF)
        return scores.masked_fill(~generated, -INF).masked_fill(pinned, INF)
