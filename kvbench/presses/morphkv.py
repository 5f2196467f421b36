from dataclasses import dataclass

import torch

from kvbench.presses.base import Press, View, protect, window_logits


@dataclass
class MorphKVPress(Press):
    """A recent window plus the older tokens the window attends to most, re-chosen at every step.

    MorphKV's ``morphkv_mask`` (``LlamaAttentionMorph``): once a layer holds more than ``max_capacity`` entries it
    keeps its ``window_size`` newest and, of the older ones, the ``max_capacity - window_size`` with the highest
    fused attention of the window: each window query's logits (``q·k/sqrt(d)``, summed over the query heads of a
    GQA group) softmaxed over the older entries only, then the ``max`` or ``sum`` over the window's queries
    (``fusion``; MorphKV's ``morph_type`` ``max_fused`` / ``sum_fused``). kvbench's budget is ``max_capacity``.

    MorphKV evicts before the step's attention, from the new token's forward, choosing with the window of the
    queries before it; kvbench evicts after the attention with the window that ends at that query. The candidates,
    the queries and the entries attended are the same (budget + 1, the new token included), so the kept sets are
    the same (``tests/reference/test_morphkv.py``). MorphKV compresses nothing at the prefill: a prompt over the
    budget is cut at its first decoding step by the prompt's last ``window_size`` queries, which is what kvbench's
    prefill compression chooses with the same queries.

    Differences from MorphKV's code: scores are float32 (MorphKV's logits are in the model's dtype) and scaled by
    the model's attention scaling (``1/sqrt(head_dim)`` for Llama and Qwen); exact ties keep the newest entry, and
    near ties (float32 noise) can fall either way. Under
    GQA MorphKV prunes its stored window logits per query head and its cache per KV head (``MorphOffloadedCache.
    cleanup``), so after its first eviction a stored row's columns no longer match the cache's entries, and that
    step's query heads attend to their own top entries; kvbench keeps the rows aligned with the cache, the rule
    the code's comments describe (``reduce scores by summing over grouped heads``), and every query head attends to
    what its KV head keeps. Under MHA (a group of 1) there is no such difference. MorphKV's scripts run several
    settings (``pred_single.py``'s defaults are ``max_fused`` with a window of 3); kvbench's defaults are its
    README's LongBench command.
    """

    name = "morphkv"
    summary = "recent window + older tokens the window attends to most (fused max/sum), every step"
    source = "Ghadia et al. 2025, arXiv 2503.00979 (MorphKV)"
    reference = "ghadiaravi13/MorphKV@8903d2a morphkv/models/patch_llama.py (LlamaAttentionMorph.morphkv_mask)"
    #: The window's queries score the older entries here, not through ``view.attention``.
    reads_whole_window = False

    #: Newest entries kept, whose queries score the older ones (MorphKV's ``window_size``; its README runs 30-200,
    #: 32 in its LongBench command).
    window_size: int = 32
    #: How the window's attention rows are fused: ``sum`` (``sum_fused``, its LongBench and LongWriter commands)
    #: or ``max`` (``max_fused``, its LongGenBench command).
    fusion: str = "sum"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window_size < 1:
            raise ValueError(f"morphkv: window_size must be >= 1, got {self.window_size}")
        if self.fusion not in ("sum", "max"):
            raise ValueError(f"morphkv: fusion must be 'sum' or 'max', got {self.fusion!r}")

    @property
    def query_window(self) -> int:
        return self.window_size

    def score(self, view: View) -> torch.Tensor:
        window = view.window
        logits = window_logits(view, sum_group=True)  # the group's logits summed (MorphKV's ``.sum(dim=2)``)
        older = view.valid & (view.positions <= view.query_position[:, None, None] - self.window_size)
        probs = torch.softmax(logits.masked_fill(~older[:, :, None, :], -torch.inf), dim=-1).nan_to_num(0.0)
        probs = probs * window.valid[:, None, :, None]
        fused = probs.amax(dim=2) if self.fusion == "max" else probs.sum(dim=2)
        return protect(fused, view, recent=self.window_size)
