from dataclasses import dataclass

import torch

from kvbench.errors import KvbenchError
from kvbench.presses.base import INF, Press, View, at_prefill
from kvbench.presses.ranking import rank_slots


@dataclass
class SCOPEPress(Press):
    """SCOPE: the prompt and the reasoning get separate budgets, chosen separately.

    SCOPE's code (Linking-ai/SCOPE, ``model/kv_utils.py``) caches ``C + D`` entries: a prefill part of C
    (``max_capacity_prompt``) and a decoding part of D (``decoding_window_size``). Here ``--budget`` is ``C + D``
    and ``prefill_budget`` is C. Prefill: a prompt longer than C is compressed at once to the prompt's best
    ``C - w`` tokens by the attention the prompt's own queries gave them (SCOPE's H2O prefill) and its last w
    (``prefill_window``); these C are pinned for the whole run. A prompt of at most C tokens stays whole, and the
    cache's first C tokens, generated ones included, are pinned (SCOPE keeps its first C physical entries).
    Decoding: the generated tokens compete for the D other entries, re-selected every ``buffer`` steps, the most
    recent ``recent_ratio`` of D protected.

    SCOPE's "slide" decoding (its ``update_kv_in_decoding``) is ``scoring=current, buffer=1`` with
    ``prefill_budget=C``, ``prefill_window=8`` (``run_longgenbench.py``) and ``recent_ratio=r/D`` (r =
    ``decoding_recent_size``; its scripts: C = 2048, D = 512 or 1024, r = 256), checked in
    ``tests/reference/test_scope.py``. Differences from SCOPE's code that remain in that setting:

    - per KV head: SCOPE repeats the KV heads to the query heads before caching (``model/llama_model.py``), so
      each query head selects its own tokens; here each KV head selects once, by its group's mean (``gqa``). The
      same at GQA group 1; with a larger group SCOPE's query heads of one group keep different tokens.
    - a causal prefill: SCOPE's H2O prefill masks only the last w queries' block causally, so its earlier prompt
      queries' softmax also spans the keys after them; here each prompt query sees the keys up to it.
    - float32 scores, ties by recency; SCOPE's are float16 probabilities, ties by ``topk``.

    kvbench's defaults are not SCOPE's: ``scoring=accumulated`` ranks the generated tokens by the attention
    accumulated since each was written (its paper's heavy hitters; steadier between re-selections, not SCOPE's
    code, which scores by the current query); ``buffer=16`` re-selects every 16 steps (SCOPE's "discontinuous"
    re-selects every delta + 1 steps, delta = 15 at 4096 new tokens with D = 512 in ``run_longgenbench.py``, and
    its "adaptive" and "discontinuous" grow their decoding part with the step, here fixed); ``prefill_budget=0``
    is half the budget; ``prefill_window=0`` protects the last ``recent_ratio`` of the prefill budget (SCOPE: 8).
    """

    name = "scope"
    summary = "pinned prompt (prefill budget) + generated tokens re-selected by accumulated attention"
    source = "Wu et al. 2024, arXiv 2412.13649"
    reference = "Linking-ai/SCOPE@8cbae48 model/kv_utils.py (H2OKVCluster.update_kv, update_kv_in_decoding 'slide')"
    # 2: the prefill compresses the prompt to the prefill budget (was: to the whole budget, the unpinned rest
    # evicted first during decoding), and a prompt shorter than it pins the first generated tokens up to it (SCOPE).
    revision = 2
    state_names = ("accumulated", "pinned")

    #: Decoding steps between two re-selections (1 = SCOPE's slide; its discontinuous re-selects every delta + 1).
    buffer: int = 16
    #: C, SCOPE's prefill capacity: the entries pinned for the whole run; 0 = half the budget. The decoding part is
    #: the rest of the budget.
    prefill_budget: int = 0
    #: Last prompt tokens kept by a prefill compression (SCOPE's window_size, 8); 0 = recent_ratio of prefill_budget.
    prefill_window: int = 0
    #: Share of the decoding part kept for its most recent tokens (SCOPE: 256 of 512 or 1024), and of the prefill
    #: budget for the prompt's last tokens when prefill_window is 0.
    recent_ratio: float = 0.25
    #: How the query heads of a GQA group are combined: mean or max (SCOPE selects per query head).
    gqa: str = "mean"
    #: Decoding scores: accumulated attention (kvbench's default), or the current query's attention (SCOPE's code).
    scoring: str = "accumulated"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prefill_budget < 0 or self.prefill_window < 0:
            raise ValueError(f"scope: prefill_budget (0 = half the budget) and prefill_window must be >= 0, got "
                             f"{self.prefill_budget}, {self.prefill_window}")
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
        if self.prefill_window >= self.prompt_budget(budget):
            raise KvbenchError(f"scope: prefill_window {self.prefill_window} must be below the prefill budget "
                               f"{self.prompt_budget(budget)}")
        return super().cadence(budget)

    def row_cadence(self, budget: int, prompt_length: int, compressions: int) -> tuple[int, int]:
        """A prompt longer than the prefill budget is compressed to it at the prefill (SCOPE's ``update_kv``);
        then the budget's cadence."""
        pinned_n = self.prompt_budget(budget)
        if compressions == 0 and prompt_length > pinned_n:
            return pinned_n, pinned_n + 1
        return self.cadence(budget)

    @property
    def accumulates_attention(self) -> bool:
        return True  # the prefill's attention pins the prompt

    @property
    def query_window(self) -> int:
        return 1 if self.scoring == "current" else 0

    def observe(self, view: View, attention: torch.Tensor) -> None:
        view.state["accumulated"] += attention
        if at_prefill(view):
            self._pin_prompt(view)

    def _pin_prompt(self, view) -> None:
        """Mark the prompt's best ``prefill_budget`` slots per KV head: they are never evicted."""
        pinned_n = self.prompt_budget(view.budget)
        window = self.prefill_window or int(self.recent_ratio * pinned_n)
        prompt_length = view.prompt_length[:, None, None]
        in_prompt = view.valid & (view.positions < prompt_length)
        recent = view.positions >= prompt_length - window
        scores = view.state["accumulated"].masked_fill(recent, INF).masked_fill(~in_prompt, -INF)
        best = rank_slots(scores, view.positions)[..., :pinned_n]
        pinned = torch.zeros_like(view.state["pinned"]).scatter_(-1, best, 1.0) * in_prompt
        view.state["pinned"].copy_(pinned)

    def score(self, view: View) -> torch.Tensor:
        pinned = view.state["pinned"] > 0
        if at_prefill(view):  # a prompt longer than the prefill budget: the pinned ones
            return view.state["accumulated"].masked_fill(pinned, INF)
        pinned_n = self.prompt_budget(view.budget)
        prompt_length = view.prompt_length[:, None, None]
        # SCOPE pins its first C physical entries: after a prompt shorter than C, the first generated tokens too
        pinned |= (view.positions < pinned_n) & (prompt_length < pinned_n)
        decoding_budget = view.budget - pinned_n
        recent = view.positions > view.query_position[:, None, None] - int(self.recent_ratio * decoding_budget)
        generated = view.positions >= prompt_length
        ranked = view.state["accumulated"] if self.scoring == "accumulated" else view.attention(gqa=self.gqa)
        scores = ranked.masked_fill(generated & recent, INF)
        return scores.masked_fill(~generated, -INF).masked_fill(pinned, INF)
