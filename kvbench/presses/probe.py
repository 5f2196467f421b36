"""A plug-in press's first call, on a small made-up cache, before any model loads: a press that raises or returns
something other than one finite-or-infinite float score per slot is a bad input, refused in one line naming the
press, the check and what came back (not an example failure found mid-run, with an empty row stored)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from kvbench.errors import KvbenchError

#: The probe cache: one sequence, two KV heads, twelve slots in shuffled order (two invalid), four window queries.
SLOTS, HEADS, DIM, WINDOW, BUDGET = 12, 2, 8, 4, 8


class ProbeError(KvbenchError, ValueError):
    """A plug-in press failed its first call."""


@dataclass
class ProbeView:
    """What the engine's ``SlotView`` gives a press (``kvbench.presses.base.View``), made up."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    state: dict[str, torch.Tensor]
    window: Any
    query_position: torch.Tensor = field(default_factory=lambda: torch.tensor([SLOTS - 1]))
    budget: int | None = BUDGET
    seeds: torch.Tensor | None = field(default_factory=lambda: torch.tensor([0]))
    step: int = 1
    row_step: torch.Tensor | None = None
    prompt_length: torch.Tensor | None = field(default_factory=lambda: torch.tensor([4]))
    layers: int = 1
    layer_idx: int | None = 0
    compress_to: list[int] | None = field(default_factory=lambda: [BUDGET])

    def attention(self, gqa: str = "mean", last: int | None = None) -> torch.Tensor:
        """The window queries' mean softmax over the valid slots, [1, H, S]."""
        logits = torch.einsum("nhwd,nhsd->nhws", self.window.queries, self.keys) * self.window.scaling
        probs = torch.softmax(logits.masked_fill(~self.valid[:, :, None, :], -torch.inf), dim=-1)
        return probs[:, :, -(last or WINDOW):].mean(dim=2)


def _rope(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A standard RoPE (theta 10,000) over the probe's head dims, for a press that reads ``window.rope``."""
    frequencies = 10000.0 ** (-torch.arange(0, DIM, 2).float() / DIM)
    angles = positions.float()[:, None] * frequencies
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def probe_view(state_names: tuple[str, ...]) -> ProbeView:
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, HEADS, SLOTS, DIM, generator=g)
    valid = torch.ones(1, HEADS, SLOTS, dtype=torch.bool)
    valid[..., -2:] = False
    order = torch.randperm(SLOTS, generator=g)
    positions = order.expand(1, HEADS, SLOTS).clone()
    queries = torch.randn(1, HEADS, WINDOW, DIM, generator=g)
    window = SimpleNamespace(queries=queries, positions=torch.arange(SLOTS - WINDOW, SLOTS)[None],
                             valid=torch.ones(1, WINDOW, dtype=torch.bool), scaling=DIM**-0.5, rope=_rope)
    return ProbeView(keys=keys, values=torch.randn(1, HEADS, SLOTS, DIM, generator=g), positions=positions,
                     valid=valid, state={name: torch.zeros(1, HEADS, SLOTS) for name in state_names}, window=window)


def probe(press, name: str) -> None:
    """Call ``press`` (its ``observe`` if it accumulates attention, then ``score``) on the probe cache; ProbeError
    with one line when it raises or returns other than a float tensor [1, H, S] with no NaN on a valid slot."""
    import copy

    press, view = copy.deepcopy(press), probe_view(tuple(press.state_names))  # the caller's press stays untouched
    try:
        if press.accumulates_attention:
            press.observe(view, view.attention())
        scores = press.score(view)
    except KvbenchError:
        raise
    except Exception as err:  # the plug-in's own code: anything can come out of it
        raise ProbeError(f"press {name!r}: score() raised {type(err).__name__}: {str(err).splitlines()[0][:160]} "
                         "(on a made-up cache of 12 slots, 2 KV heads, before any model loads)") from None
    expected = tuple(view.valid.shape)
    if not isinstance(scores, torch.Tensor):
        raise ProbeError(f"press {name!r}: score() must return a tensor of shape [rows, kv_heads, slots], returned "
                         f"{type(scores).__name__}")
    if tuple(scores.shape) != expected:
        raise ProbeError(f"press {name!r}: score() returned shape {tuple(scores.shape)}, expected {expected} "
                         "(rows, KV heads, slots: one score per slot)")
    if not scores.dtype.is_floating_point:
        raise ProbeError(f"press {name!r}: score() returned {scores.dtype} scores; return floating-point scores")
    if torch.isnan(scores[view.valid]).any():
        raise ProbeError(f"press {name!r}: score() returned NaN for a valid slot (use -inf to evict, +inf to keep)")
