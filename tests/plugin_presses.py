"""Presses defined outside kvbench's registry, for the plug-in and `kvbench verify` tests: one correct, three broken
in the ways a new press most often is."""

from dataclasses import dataclass

import torch

from kvbench.presses.base import Press, View, protect


@dataclass
class RecencyPress(Press):
    """Correct: keep the newest tokens and ``n_sink`` first ones (StreamingLLM's rule, written from scratch)."""

    name = "recency"
    summary = "newest tokens, plus sinks"
    source = "a test plug-in"

    #: First tokens always kept.
    n_sink: int = 2

    def score(self, view: View) -> torch.Tensor:
        return protect(view.positions.float(), view, n_sink=self.n_sink)


@dataclass
class SlotOrderPress(Press):
    """Broken: scores by physical slot index, which padding and reused slots reorder."""

    name = "slot-order"

    def score(self, view: View) -> torch.Tensor:
        slots = torch.arange(view.valid.shape[-1], device=view.valid.device, dtype=torch.float32)
        return slots.expand(view.valid.shape)


@dataclass
class SharedStatePress(Press):
    """Broken: accumulates key norms on the press object, so every layer adds to the previous layer's history
    (and sequences and runs share it)."""

    name = "shared-state"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.running = None

    def score(self, view: View) -> torch.Tensor:
        norms = view.keys.float().norm(dim=-1)
        if self.running is not None and self.running.shape == norms.shape:
            norms = norms + self.running
        self.running = norms
        return -norms


@dataclass
class IgnoresValidityPress(Press):
    """Broken: computes its own window attention as a softmax over every slot, invalid ones included."""

    name = "ignores-validity"

    #: Recent queries averaged.
    window_size: int = 4

    @property
    def query_window(self) -> int:
        return self.window_size

    def score(self, view: View) -> torch.Tensor:
        window = view.window
        n, hq, w, d = window.queries.shape
        h = view.keys.shape[1]
        queries = window.queries.float().view(n, h, hq // h, w, d).mean(dim=2)
        logits = torch.einsum("nhwd,nhsd->nhws", queries, view.keys.float()) * window.scaling
        return protect(torch.softmax(logits, dim=-1).mean(dim=2), view, recent=self.window_size)


@dataclass
class CrashingPress(Press):
    """Broken: its score raises an error no check expects (a KeyError)."""

    name = "crashing"

    def score(self, view: View) -> torch.Tensor:
        return {}["missing"]
