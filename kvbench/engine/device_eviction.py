"""A decoding step's eviction with no host decision, for a decoding step compiled into one graph
(``kvbench.engine.compiled``): the ``BudgetCache`` methods that graph calls, and the host's side after it."""

from __future__ import annotations

import torch

from kvbench.presses.ranking import lowest_slots


class DeviceEviction:
    """Mixed into ``BudgetCache``: eviction as masked arithmetic over every row, so that one graph serves every step."""

    def evict_on_device(self, evicting: torch.Tensor, step: torch.Tensor) -> None:
        """A decoding step's scoring and eviction with no host decision: every row is scored and the rows of
        ``evicting`` ([L*B, 1, 1], at their trigger) free their ``trigger - budget`` lowest slots; the others keep
        theirs (masked arithmetic, so that a compiled step has one graph). For presses with a constant cadence.
        ``step``: the decoding step as a 0-d tensor (what the views carry, so the graph is not specialised on it)."""
        view = self._observe_decoding(step) if self.press.accumulates_attention else self.stacked_view(step)
        if self.trigger is None:
            return
        scores = self.press.score(view).float().masked_fill(~view.valid, -torch.inf)
        # a cache shorter than the trigger (a short sequence) never evicts: the mask is all False then
        lowest = lowest_slots(scores, view.positions, min(self.trigger - self.budget, scores.shape[-1]))
        view.valid.scatter_(2, lowest, view.valid.gather(2, lowest) & ~evicting)

    def finish_decoding_step(self, full: tuple[bool, ...]) -> None:
        """The host's side of ``evict_on_device``: the rows at their trigger compressed, and the observers."""
        for row, is_full in enumerate(full):
            if is_full:
                self._compressed(row, self.occupancy.row_keep[row])
        self.heads_uniform &= not any(full)
        self.used = self.used_after
        for observer in self.observers:
            observer.after_step(self)
