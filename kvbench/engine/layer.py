"""``BudgetLayer``: one model layer's slots in a ``BudgetCache``, the object transformers' attention talks to.

It writes the step's keys and values into free slots (or, when they do not fit, gathers slots and new tokens for
a prefill compression), records attention loss against a shadow of every key, and hands the step's queries to
the cache, which scores and evicts for all layers at once after the forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

from kvbench.engine.scores import attention_probs
from kvbench.engine.view import SlotView, StepMode, StepPlan
from kvbench.presses.base import TOKEN_STATE, Press
from kvbench.presses.ranking import rank_slots


@dataclass(frozen=True)
class LayerStep:
    """What a layer reads during one forward, handed to every layer by ``BudgetCache.begin_step``: the step's plan
    and the cache's state as it stands until ``end_step`` (nothing here changes mid-forward), the recorders a layer
    writes to, and the two things a layer asks of the cache. The layer holds no reference to the cache."""

    plan: StepPlan
    press: Press
    used: int  # slots that may hold a valid entry before this step's tokens
    capacity: int
    tokens_seen: int
    budget: int | None
    held: tuple[int, ...]  # entries each row holds once this step's tokens are written
    query_position: torch.Tensor  # [B] position of each row's newest token
    prompt_length: torch.Tensor  # [B]
    row_step: torch.Tensor | None  # [B] each row's own decoding step (continuous batching), else None
    row_seeds: torch.Tensor  # [layers, B]
    heads_uniform: bool  # all KV heads hold the same positions
    allocates: bool  # layers and heads keep different numbers (PyramidKV, AdaKV)
    query_ring: Any  # QueryRing | None: recent queries, for presses with a query window
    attention_loss: Any  # AttentionLossRecorder | None
    hold_query: Callable[[int, torch.Tensor], None]  # keep a decoding query for end_step's observe()
    layer_keep_rows: Callable[[tuple[bool, ...], int | None], tuple[list[int], torch.Tensor]]
    #: Tokens a selecting press (``Press.selects``: Quest) lets each query head attend to per decoding step.
    selection_budget: int | None = None
    rope: Any = None  # the model's RoPE, for a press that reads it

    @property
    def mode(self) -> StepMode:
        return self.plan.mode

    @property
    def decode_step(self) -> int:
        return self.plan.decode_step

    @property
    def used_after(self) -> int:
        return self.plan.used_after


#: Binds a layer to its slice of the cache's stacked buffers: (layer, key_states, value_states) -> keys, values,
#: positions, valid, {state name: tensor}; allocates the buffers on the first call.
SlotBinder = Callable[[int, torch.Tensor, torch.Tensor], tuple]


class BudgetLayer(DynamicLayer):
    """One layer's slots: views into the cache's stacked buffers, returned to attention."""

    def __init__(self, layer_idx: int, bind: SlotBinder, capacity: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.bind = bind
        self.capacity = capacity
        #: This forward's ``LayerStep``, set by the cache's ``begin_step``; None before the first forward.
        self.step: LayerStep | None = None
        self.scaling: float | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values, self.positions, self.valid, self.state = self.bind(
            self.layer_idx, key_states, value_states)
        self.is_initialized = True

    # --- transformers' Cache interface --------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        ctx = self.step
        step = ctx.plan
        b, h, n_new, _ = key_states.shape
        used = ctx.used
        if ctx.attention_loss is not None:
            ctx.attention_loss.write(self.layer_idx, key_states, step.positions, step.valid)
        if ctx.mode is StepMode.OVERFLOW:
            self._pending = {
                "keys": torch.cat([self.keys[:, :, :used], key_states], dim=2),
                "values": torch.cat([self.values[:, :, :used], value_states], dim=2),
                "positions": torch.cat([self.positions[:, :, :used], step.positions[:, None, :].expand(b, h, n_new)],
                                       dim=2),
                "valid": torch.cat([self.valid[:, :, :used], step.valid[:, None, :].expand(b, h, n_new)], dim=2),
                "state": {n: torch.cat([s[:, :, :used], self._new_state(n, s, step, h)], dim=2)
                          for n, s in self.state.items()},
            }
            return self._pending["keys"], self._pending["values"]
        if ctx.mode is StepMode.SLOT:
            # A free slot per (sequence, head): the first invalid one. Any will do; attention is order-free.
            # Slot `used` is free if it exists; past the capacity every row has a free slot below it.
            free = ~self.valid[:, :, : min(used + 1, ctx.capacity)]
            slot = free.to(torch.uint8).argmax(dim=-1, keepdim=True)  # [B, H, 1]
        else:  # bulk: the first write of several tokens into an empty cache
            slot = torch.arange(n_new, device=self.device).expand(b, h, n_new)
        self._write(slot, key_states, value_states, step)
        n = ctx.used_after
        return self.keys[:, :, :n], self.values[:, :, :n]

    def get_seq_length(self) -> int:
        return 0 if self.step is None else self.step.tokens_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.step.used_after if self.is_initialized else query_length, 0

    def get_max_length(self) -> int:
        return self.capacity

    # --- writes -------------------------------------------------------------------------------------------
    def _write(self, slot, key_states, value_states, step: StepPlan) -> None:
        b, h, n_new, _ = key_states.shape
        self.keys.scatter_(2, slot[..., None].expand(-1, -1, -1, self.keys.shape[-1]), key_states)
        self.values.scatter_(2, slot[..., None].expand(-1, -1, -1, self.values.shape[-1]), value_states)
        self.positions.scatter_(2, slot, step.positions[:, None, :].expand(b, h, n_new))
        self.valid.scatter_(2, slot, step.valid[:, None, :].expand(b, h, n_new))
        for name, s in self.state.items():
            s.scatter_(2, slot, self._new_state(name, s, step, h))

    @staticmethod
    def _new_state(name: str, state: torch.Tensor, step: StepPlan, h: int) -> torch.Tensor:
        """[B, H, L] the state of the step's new entries: their token ids (``TOKEN_STATE``), zero otherwise."""
        b, n_new = step.positions.shape
        if name == TOKEN_STATE:
            return step.token_ids.to(state.dtype)[:, None, :].expand(b, h, n_new)
        return state.new_zeros(b, h, n_new)

    def visible_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions and validity of the slots attention sees this step (including an overflow's new tokens)."""
        if self.step.mode is StepMode.OVERFLOW:
            return self._pending["positions"], self._pending["valid"]
        n = self.step.used_after
        return self.positions[:, :, :n], self.valid[:, :, :n]

    def _view(self) -> SlotView:
        """This layer's slots (multi-token steps)."""
        ctx = self.step
        if ctx.mode is StepMode.OVERFLOW:
            src = self._pending
        else:
            n = ctx.used_after
            src = {"keys": self.keys[:, :, :n], "values": self.values[:, :, :n], "positions": self.positions[:, :, :n],
                   "valid": self.valid[:, :, :n], "state": {k: s[:, :, :n] for k, s in self.state.items()}}
        window = None if ctx.query_ring is None else ctx.query_ring.layer_window(self.layer_idx, self.scaling)
        return SlotView(
            keys=src["keys"], values=src["values"], positions=src["positions"], valid=src["valid"],
            state=src["state"], query_position=ctx.query_position, budget=ctx.budget,
            seeds=ctx.row_seeds[self.layer_idx], step=ctx.decode_step, prompt_length=ctx.prompt_length,
            row_step=ctx.row_step,
            layer_idx=self.layer_idx, window=window, rope=ctx.rope,
        )

    # --- after attention -------------------------------------------------------------------------------------
    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention [B, H_q, L, D] of the step's queries over the slots ``update`` returned, then what the press
        needs of the queries (``after_attention``)."""
        ctx = self.step
        b, hq, lq, d = query.shape
        h = key.shape[1]
        if lq == 1 and ctx.mode is not StepMode.OVERFLOW:
            # One query per sequence: fold the GQA group into the query length, so keys are never expanded.
            mask = self.valid[:, :, None, : key.shape[2]]
            if ctx.selection_budget is not None:  # each query head attends to what the press selects
                chosen = ctx.press.select(query.view(b, h, hq // h, d), key, self.positions[:, :, : key.shape[2]],
                                          mask[:, :, 0], ctx.selection_budget, self.layer_idx)
                mask = mask if chosen is None else chosen
            out = F.scaled_dot_product_attention(query.view(b, h, hq // h, d), key, value, attn_mask=mask,
                                                 scale=scaling).view(b, hq, 1, -1)
        else:
            positions, valid = self.visible_positions()
            if ctx.heads_uniform:
                positions, valid = positions[:, :1], valid[:, :1]
            mask = valid[:, :, None, :] & (positions[:, :, None, :] <= ctx.plan.positions[:, None, :, None])
            if mask.shape[1] > 1:
                mask = mask.repeat_interleave(hq // h, dim=1)
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
            out = out.nan_to_num(0.0)  # padding queries may see no key; their outputs are never used
        self.after_attention(query, scaling)
        return out

    def after_attention(self, query: torch.Tensor, scaling: float) -> None:
        ctx, press = self.step, self.step.press
        self.scaling = scaling
        if ctx.attention_loss is not None and ctx.decode_step > 0:  # before this step's eviction: what was missed
            ctx.attention_loss.record(self.layer_idx, query, scaling, self.positions, self.valid,
                                      ctx.query_position, ctx.tokens_seen,
                                      ctx.decode_step if ctx.row_step is None else ctx.row_step)
        if press.query_window:
            ctx.query_ring.push(self.layer_idx, query)
        if ctx.mode is StepMode.SLOT:  # decoding: scoring and eviction happen in end_step, for all layers at once
            if press.accumulates_attention:
                ctx.hold_query(self.layer_idx, query)
            return
        view = self._view()
        if press.accumulates_attention:
            step = ctx.plan
            press.observe(view, attention_probs(
                query, step.positions, step.valid, view.keys, view.positions, view.valid, scaling, reduce="sum",
                gqa=getattr(press, "gqa", "mean"),
            ))
        if ctx.mode is StepMode.OVERFLOW:
            self._compress_overflow(view)

    def _compress_overflow(self, view: SlotView) -> None:
        """Keep the best ``budget`` of slots + new tokens per KV head (all of them if under the trigger)."""
        ctx = self.step
        keep_n = ctx.plan.keep_n
        full = tuple(keep != count for keep, count in zip(keep_n, ctx.held))
        layer_keep = None
        if ctx.allocates and ctx.plan.overflow_evicts:
            view.compress_to, layer_keep = ctx.layer_keep_rows(full, self.layer_idx)
        else:
            view.compress_to = list(keep_n)
        if ctx.plan.overflow_evicts:
            scores = ctx.press.score(view).float().masked_fill(~view.valid, -torch.inf)
        else:  # nothing to drop: keep every valid slot, newest first
            scores = view.valid.float().masked_fill(~view.valid, -torch.inf)
        ranked = rank_slots(scores, view.positions)
        k = ctx.used_after
        order = ranked[..., :k]  # [B, H, k], best first
        if layer_keep is not None:  # this layer's share, split among heads by the press
            counts = ctx.press.head_counts(scores, view.positions, layer_keep)
            limit = (layer_keep[:, None] if counts is None else counts)[..., None]  # [B, H or 1, 1]
        else:
            limit = torch.tensor(keep_n, device=self.device)[:, None, None]
        rank_ok = torch.arange(k, device=self.device) < limit
        if ctx.press.keeps_fewer and ctx.plan.overflow_evicts:  # the press chooses, in the rows that compress
            compressing = torch.tensor(full, device=self.device)[:, None, None]
            rank_ok = torch.where(compressing, scores.gather(2, order) > -torch.inf, rank_ok)
        pending = self._pending
        self.valid[:, :, :k] = view.valid.gather(2, order) & rank_ok
        self.valid[:, :, k:] = False
        for name in ("keys", "values"):
            src = pending[name]
            getattr(self, name)[:, :, :k] = src.gather(2, order[..., None].expand(-1, -1, -1, src.shape[-1]))
        self.positions[:, :, :k] = pending["positions"].gather(2, order)
        for n, s in self.state.items():
            s[:, :, :k] = pending["state"][n].gather(2, order)
        self._pending = None
