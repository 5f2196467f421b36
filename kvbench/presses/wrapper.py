"""A press that wraps a scoring press: the wrapper decides how many entries each layer or KV head keeps, the
inner press which ones (``--press adakv:snapkv-d``)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from kvbench.presses.base import Press, View


@dataclass
class WrapperPress(Press):
    """Delegates scoring, state and cadence to ``inner``; subclasses change the allocation."""

    inner: Press | None = None

    def __post_init__(self) -> None:
        if self.inner is None:
            raise ValueError(f"{self.name}: wraps a scoring press, as in {self.name}:snapkv-d")
        if self.inner.sparse:
            raise ValueError(f"{self.name}: {self.inner.name!r} evicts nothing (it selects per step); it cannot be "
                             "wrapped")
        if not self.inner.evicts:
            raise ValueError(f"{self.name}: the {self.inner.name!r} press does not evict; wrap a scoring press")
        if self.inner.keeps_fewer:
            raise ValueError(f"{self.name}: {self.inner.name!r} keeps only the entries it wants, fewer than a budget; "
                             "it cannot be given per-layer or per-head budgets")
        if getattr(self.inner, "grows", False):
            raise ValueError(f"{self.name}: {self.inner.name!r} follows a schedule that grows with the sequence; "
                             "wrap it with -a schedule=budget")
        if getattr(self.inner, "layers_keep_alike", False):
            raise ValueError(f"{self.name}: {self.inner.name!r} ranks every layer's entries by one score per KV head "
                             "(the same positions in every layer); per-layer or per-head budgets would break that")
        # Instance attributes: the label, state and revision are the composition's.
        self.name = f"{type(self).name}:{self.inner.name}"
        self.state_names = self.inner.state_names
        self.revision = self.inner.revision
        self.origin = self.inner.origin
        self.buffer = self.inner.buffer
        self.reads_rope = self.inner.reads_rope  # the engine hands the model's RoPE to what the inner press reads

    def own_params(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("inner", "buffer")}

    def params(self) -> dict:
        return {**self.inner.params(), **self.own_params()}

    def __getattr__(self, name: str):  # the inner press's own parameters (e.g. ``gqa``), read by the engine
        if name.startswith("__") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def cadence(self, budget: int) -> tuple[int, int]:
        return self.inner.cadence(budget)

    def check_model(self, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.inner.check_model(num_layers, num_heads, num_kv_heads, head_dim)

    @property
    def query_window(self) -> int:
        return self.inner.query_window

    @property
    def accumulates_attention(self) -> bool:
        return self.inner.accumulates_attention

    def observe(self, view: View, attention: torch.Tensor) -> None:
        self.inner.observe(view, attention)

    def score(self, view: View) -> torch.Tensor:
        return self.inner.score(view)

    def layer_budgets(self, budget: int, n_layers: int) -> list[int]:
        return self.inner.layer_budgets(budget, n_layers)

    def head_capacity(self, layer_budget: int, n_heads: int) -> int:
        return self.inner.head_capacity(layer_budget, n_heads)

    def head_counts(self, scores: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor) -> torch.Tensor | None:
        return self.inner.head_counts(scores, positions, keep)

    @property
    def allocates(self) -> bool:
        return True
