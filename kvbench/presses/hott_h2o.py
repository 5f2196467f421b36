from dataclasses import dataclass

import torch

from kvbench.presses.base import Press, View
from kvbench.presses.source_order import (
    COMPILE_REFUSAL,
    STATE,
    fork_index,
    fork_topk,
    from_fork_order,
    reorder,
    to_fork_order,
)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class HottH2OPress(Press):
    """H2O as the paper's harness ran it: one accumulator for all layers, misaligned, kept in bf16.

    Bug-compatible with the fork (``h2o_press.py`` at 43d9e37, every branch until 2026). Its score is the mean
    attention received (accumulated attention over the number of queries summed), GQA mean, no recent window.
    But ``acc_attn`` and ``n_tokens_in_sum`` are single attributes shared by every layer:

    - the prefill of each layer overwrites them (each layer compresses its prompt by its own attention);
    - while decoding, layer ``l`` adds its step's attention to what layer ``l - 1`` left (layer 0 to what the
      last layer left at the previous step), index by index in the cache's physical order, then keeps
      ``topk(budget)`` and gathers the accumulator in that order. After the first eviction each layer's cache is
      in its own score order, so the sum it ranks by mixes other layers' attention to *other tokens*;
    - both live in the attention dtype, bf16 for the paper's models: a count cannot pass 256 and an increment
      of about 0.002 to a sum of 1 is lost, so scores stop moving within a few hundred steps.

    Emulated here with per-slot state (each layer's accumulator, count and index in the fork's cache) and the
    fork's own ``topk`` in ``state_dtype``; ties within ``topk`` fall as topk orders them. With ``state_dtype`` =
    the attention's dtype of a float32 model this keeps exactly what the fork's code keeps
    (``tests/reference/test_hott_h2o.py``). In bf16 it is an approximation: the engine hands the press the step's
    attention in float32, summed over the queries and averaged over each group, and the press adds it to the
    state in float32 and rounds the sum once, where the fork rounds each head's probabilities to bf16 (and its
    logits are bf16 matmuls), then their sum, group mean and addition, each in bf16; the kept sets agree for the
    first compressions, then drift.
    """

    name = "hott-h2o"
    compile_refusal = COMPILE_REFUSAL
    summary = "the paper's harness's H2O: one bf16 accumulator shared by all layers, misaligned (bug-compatible)"
    source = "the kvpress fork of arXiv 2512.12008 (h2o_press.py @43d9e37)"
    reference = ("minghui-liu/kvpress@43d9e37 kvpress/presses/h2o_press.py (H2OPress.score, compress_prefilling, "
                 "compress_decoding)")
    state_names = (STATE, "accumulated", "count", "keep")

    #: Dtype of the shared accumulator and count (the attention dtype: bf16 for the paper's models).
    state_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.state_dtype not in _DTYPES or self.buffer != 1:
            raise ValueError(f"{self.name}: state_dtype must be one of {', '.join(_DTYPES)} and buffer 1")

    @property
    def accumulates_attention(self) -> bool:
        return True

    def _round(self, values: torch.Tensor) -> torch.Tensor:
        return values.to(_DTYPES[self.state_dtype]).float()

    def observe(self, view: View, attention: torch.Tensor) -> None:
        if view.step == 0:  # each layer's prefill overwrites the shared attributes with its own
            index = fork_index(view)
            length = view.valid[:, :1].sum(dim=-1, keepdim=True)
            self._settle(view, slice(None), index, self._round(attention), self._round((length - index).float()))
            return
        layers = view.layers
        batch = view.valid.shape[0] // layers
        rows = [slice(layer * batch, (layer + 1) * batch) for layer in range(layers)]
        previous = self._ordered(view, rows[-1])  # what the last layer left at the previous step
        for r in rows:
            index = fork_index(_Rows(view, r))
            acc, count = (from_fork_order(p, index) for p in previous)
            self._settle(view, r, index, self._round(attention[r] + acc), self._round(count + 1.0))
            previous = self._ordered(view, r)

    def _settle(self, view, r: slice, index: torch.Tensor, acc: torch.Tensor, count: torch.Tensor) -> None:
        """Store rows ``r``'s accumulator and count, and compress them as the fork does when they are full."""
        sub = _Rows(view, r)
        sub.state["accumulated"].copy_(acc)
        sub.state["count"].copy_(count)
        lengths = sub.valid[:, 0].sum(dim=-1).tolist()
        keep, trigger = self.cadence(view.budget)
        width = max(lengths)
        ordered = to_fork_order(self._round(acc / count.clamp(min=1)), index, sub.valid, width)
        ordered = ordered.to(_DTYPES[self.state_dtype])
        sub.state["keep"].copy_(reorder(sub, index, fork_topk(ordered, lengths, keep, trigger)))

    def _ordered(self, view, r: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``r``'s accumulator and count in the fork's order, after their compression."""
        sub = _Rows(view, r)
        kept = sub.valid & (sub.state["keep"] > -torch.inf)  # the slot just evicted is still valid until end_step
        width = int(kept[:, 0].sum(dim=-1).max())
        index = torch.where(kept, fork_index(sub), width)
        return (to_fork_order(sub.state["accumulated"], index, kept, width),
                to_fork_order(sub.state["count"], index, kept, width))

    def score(self, view: View) -> torch.Tensor:
        return view.state["keep"].clone()


class _Rows:
    """A few rows of a view: the same tensors, sliced, so writes reach the cache's state."""

    def __init__(self, view, r: slice):
        self.valid, self.positions = view.valid[r], view.positions[r]
        self.state = {name: s[r] for name, s in view.state.items()}
