"""A decoding step's eviction with no host decision, for a decoding step compiled into one graph
(``kvbench.engine.compiled``): the ``BudgetCache`` methods that graph calls, and the host's side after it."""

from __future__ import annotations

import torch

from kvbench.presses.base import Press
from kvbench.presses.ranking import lowest_slots


class DeviceEviction:
    """Mixed into ``BudgetCache``: eviction as masked arithmetic over every row, so that one graph serves every step
    at which some row evicts (``observe_on_device`` the steps at which none does).

    Two forms. A press with a constant cadence frees each compressing row's ``trigger - budget`` lowest slots
    (``evicting``: a row mask; a press that keeps fewer drops what it scores -inf there). One whose compressions
    keep different counts (a schedule that changes with the sequence, layers or heads that keep different numbers)
    keeps each row's best-ranked slots up to a count (``keep``: [L*B] entries per KV head, every slot for a row not
    at its trigger), as eager decoding does then.
    """

    @property
    def keeps_by_rank(self) -> bool:
        """True where a compiled step frees slots by rank against per-row counts (``device_keeps``); never for a
        press that ``keeps_fewer`` (it keeps what it scores above -inf in the rows at their trigger)."""
        press = type(self.press)
        return not self.press.keeps_fewer and (self.allocates or press.row_cadence is not Press.row_cadence
                                               or press.layer_keeps is not Press.layer_keeps)

    def device_keeps(self, full: tuple[bool, ...]) -> torch.Tensor:
        """[L*B] entries each row keeps this step, on the device: its compression's count where the sequence is at
        its trigger (its layer's share under allocation), every slot otherwise. Cached, so it crosses once."""
        if self.allocates:
            return self.layer_keep_rows(full)[1]
        keeps = tuple(k if f else self.capacity for k, f in zip(self.occupancy.row_keep, full))
        key = (keeps, "rows")
        if key not in self._keep_rows:
            per_row = list(keeps) * len(self.layers)
            self._keep_rows[key] = per_row, torch.tensor(per_row, device=self.keys.device)
        return self._keep_rows[key][1]

    def observe_on_device(self, step: torch.Tensor) -> None:
        """A decoding step at which no row is at its trigger: only an accumulating press observes its attention."""
        if self.press.accumulates_attention:
            self._observe_decoding(step)

    def evict_on_device(self, step: torch.Tensor, evicting: torch.Tensor | None = None,
                        keep: torch.Tensor | None = None) -> None:
        """A decoding step's scoring and eviction with no host decision: every row is scored, and either the rows
        of ``evicting`` ([L*B, 1, 1], at their trigger) free their ``trigger - budget`` lowest slots, or each row
        keeps its ``keep`` best (``keeps_by_rank``); the other rows keep theirs by masked arithmetic, so that a
        compiled step has one graph. ``step``: the decoding step as a 0-d tensor (what the views carry, so the
        graph is not specialised on it)."""
        view = self._observe_decoding(step) if self.press.accumulates_attention else self.stacked_view(step)
        if self.trigger is None:
            return
        if keep is not None:
            view.compress_to = keep  # on the device: a press reading it must not need it on the host
        scores = self.press.score(view).float().masked_fill(~view.valid, -torch.inf)
        if self.press.keeps_fewer:  # what the press scores above -inf, in the rows at their trigger
            view.valid &= (scores > -torch.inf) | ~evicting
            return
        if keep is not None:
            view.valid &= self.keep_mask(scores, view.positions, keep)
            return
        # a cache shorter than the trigger (a short sequence) never evicts: the mask is all False then
        lowest = lowest_slots(scores, view.positions, min(self.trigger - self.budget, scores.shape[-1]))
        view.valid.scatter_(2, lowest, view.valid.gather(2, lowest) & ~evicting)

    def finish_decoding_step(self, full: tuple[bool, ...]) -> None:
        """The host's side of ``evict_on_device``: the rows at their trigger compressed (the counts of a press that
        keeps fewer read back from the device, after the graph, as eager decoding reads them), and the observers."""
        counted = self.held_on_device() if self.press.keeps_fewer and any(full) else None
        for row, is_full in enumerate(full):
            if is_full:
                self._compressed(row, self.occupancy.row_keep[row], None if counted is None else counted[row])
        self.heads_uniform &= not any(full)
        self.used = self.used_after
        for observer in self.observers:
            observer.after_step(self)
