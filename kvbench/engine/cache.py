"""BudgetCache: a DynamicCache whose layers are fixed-capacity slot buffers with per-KV-head eviction.

Each layer preallocates ``[batch, kv_heads, capacity, head_dim]`` keys and values, the original position
of every slot and a valid-slot mask. Decoding writes the new token into a free slot in place; when a
sequence's layer holds ``budget + buffer`` entries after a step's attention, the press scores the slots and
the lowest ``buffer`` per KV head are freed. A step that does not fit (a prompt longer than the capacity)
attends over the slots plus the new tokens, then keeps the press's best ``budget`` (prefill compression).

Bookkeeping that decides *when* to evict (entries per sequence) lives on the host, so deciding costs no
device synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from kvbench.engine.attention import attention_probs
from kvbench.presses.base import Press


@dataclass
class StepInputs:
    """What the decode loop tells the cache about the tokens of the current forward."""

    positions: torch.Tensor  # [B, L] original position of each new token
    valid: torch.Tensor  # [B, L] False for padding and for frozen (finished) sequences
    valid_counts: list[int]  # host copy of valid.sum(-1)


@dataclass
class SlotView:
    """What a press sees: the slots of one layer (physical order), and how to get attention over them."""

    layer: BudgetLayer
    keys: torch.Tensor  # [B, H, S, D]
    values: torch.Tensor
    positions: torch.Tensor  # [B, H, S]
    valid: torch.Tensor  # [B, H, S]
    state: dict[str, torch.Tensor]  # per-slot press state, [B, H, S]
    query_position: torch.Tensor  # [B] position of the newest token
    budget: int | None
    generators: list[torch.Generator] = field(default_factory=list)

    @property
    def layer_idx(self) -> int:
        return self.layer.layer_idx

    def attention(self, gqa: str = "mean") -> torch.Tensor:
        """Mean attention [B, H, S] that the layer's recent queries (``press.query_window``) place on the slots."""
        return self.layer.window_attention(self, gqa)


class BudgetLayer(DynamicLayer):
    """One layer's slots. ``keys``/``values`` are the physical buffers returned to attention."""

    def __init__(self, cache: BudgetCache, layer_idx: int):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.press: Press = cache.press
        self.overflowing = False
        self.heads_uniform = True  # all KV heads hold the same positions (true until a per-head eviction)
        self._pending: dict | None = None
        self.scaling: float | None = None

    # --- allocation -------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        c = self.cache.capacity
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros(b, h, c, d)
        self.values = value_states.new_zeros(b, h, c, value_states.shape[-1])
        self.positions = torch.full((b, h, c), -1, dtype=torch.long, device=self.device)
        self.valid = torch.zeros(b, h, c, dtype=torch.bool, device=self.device)
        self.state = {n: torch.zeros(b, h, c, dtype=torch.float32, device=self.device) for n in self.press.state_names}
        self.counts = [0] * b  # valid entries per KV head, per sequence (host)
        self.peak = [0] * b
        self.evicted = [0] * b
        self.generators = [
            torch.Generator(device=self.device).manual_seed(seed * 1_000_003 + self.layer_idx)
            for seed in self.cache.seeds
        ]
        if self.cache.measure_attention_loss:
            # Shadow of every key at its original position (one spare slot absorbs padding writes).
            self.shadow_keys = key_states.new_zeros(b, h, self.cache.max_length + 1, d)
            self.shadow_written = torch.zeros(b, self.cache.max_length + 1, dtype=torch.bool, device=self.device)
            if self.cache.loss_log is None:
                self.cache.loss_log = torch.zeros(b, len(self.cache.layers), self.cache.max_new_tokens, h,
                                                  device=self.device)
        window = self.press.query_window
        if window:
            self.query_buffer: torch.Tensor | None = None  # allocated on first queries (needs H_q)
            self.query_positions = torch.zeros(b, window, dtype=torch.long, device=self.device)
            self.query_valid = torch.zeros(b, window, dtype=torch.bool, device=self.device)
            self.query_pointer = 0
        self.is_initialized = True

    # --- transformers' Cache interface --------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        step = self.cache.step
        b, h, n_new, _ = key_states.shape
        capacity = self.cache.capacity
        if self.cache.measure_attention_loss:
            self._write_shadow(key_states, step)
        fits = max(self.counts) + n_new <= capacity
        if n_new == 1 and fits:
            # A free slot per (sequence, head): the first invalid one. Any will do; attention is order-free.
            slot = (~self.valid).to(torch.uint8).argmax(dim=-1, keepdim=True)  # [B, H, 1]
            self._write(slot, key_states, value_states, step)
        elif fits and max(self.counts) == 0:
            slot = torch.arange(n_new, device=self.device).expand(b, h, n_new)
            self._write(slot, key_states, value_states, step)
        else:
            self._pending = {
                "keys": torch.cat([self.keys, key_states], dim=2),
                "values": torch.cat([self.values, value_states], dim=2),
                "positions": torch.cat([self.positions, step.positions[:, None, :].expand(b, h, n_new)], dim=2),
                "valid": torch.cat([self.valid, step.valid[:, None, :].expand(b, h, n_new)], dim=2),
                "state": {n: torch.cat([s, s.new_zeros(b, h, n_new)], dim=2) for n, s in self.state.items()},
            }
            self.overflowing = True
            self._add_counts(step)
            return self._pending["keys"], self._pending["values"]
        self._add_counts(step)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.cache.tokens_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2] if self.is_initialized else query_length, 0

    def get_max_length(self) -> int:
        return self.cache.capacity

    # --- writes -------------------------------------------------------------------------------------------
    def _write(self, slot, key_states, value_states, step: StepInputs) -> None:
        b, h, n_new, _ = key_states.shape
        self.keys.scatter_(2, slot[..., None].expand(-1, -1, -1, self.keys.shape[-1]), key_states)
        self.values.scatter_(2, slot[..., None].expand(-1, -1, -1, self.values.shape[-1]), value_states)
        self.positions.scatter_(2, slot, step.positions[:, None, :].expand(b, h, n_new))
        self.valid.scatter_(2, slot, step.valid[:, None, :].expand(b, h, n_new))
        for s in self.state.values():
            s.scatter_(2, slot, 0.0)

    def _write_shadow(self, key_states: torch.Tensor, step: StepInputs) -> None:
        spare = self.cache.max_length
        index = torch.where(step.valid, step.positions, spare)  # [B, L]; padding goes to the spare slot
        b, h, n_new, d = key_states.shape
        self.shadow_keys.scatter_(2, index[:, None, :, None].expand(b, h, n_new, d), key_states)
        self.shadow_written.scatter_(1, index, True)
        self.shadow_written[:, spare] = False

    def _record_attention_loss(self, query: torch.Tensor, scaling: float) -> None:
        """The mass the current query puts on evicted entries, under full attention over every key seen.

        Runs before this step's eviction: it is what attention actually missed. Exact, from the shadow keys.
        """
        b, hq, _, d = query.shape
        h = self.keys.shape[1]
        seen = self.cache.tokens_seen  # > every position so far
        keys = self.shadow_keys[:, :, :seen].float()
        logits = torch.matmul(query.float().view(b, h, hq // h, d), keys.transpose(-1, -2)) * scaling
        q_pos = self.cache.query_position
        visible = self.shadow_written[:, :seen] & (torch.arange(seen, device=self.device)[None, :] <= q_pos[:, None])
        probs = torch.softmax(logits.masked_fill(~visible[:, None, None, :], -torch.inf), dim=-1)
        held = torch.zeros(b, h, seen + 1, dtype=torch.bool, device=self.device)
        held.scatter_(2, torch.where(self.valid, self.positions, seen).clamp(max=seen), True)
        missed = (probs * ~held[:, :, None, :seen]).sum(dim=-1).mean(dim=-1)  # [B, H], GQA group averaged
        self.cache.loss_log[:, self.layer_idx, self.cache.decode_step - 1] = missed

    def _add_counts(self, step: StepInputs) -> None:
        for i, n in enumerate(step.valid_counts):
            self.counts[i] += n
            self.peak[i] = max(self.peak[i], min(self.counts[i], self.cache.capacity))

    def visible_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions and validity of the slots attention sees this step (including an overflow's new tokens)."""
        if self._pending is not None:
            return self._pending["positions"], self._pending["valid"]
        return self.positions, self.valid

    def _view(self) -> SlotView:
        src = self._pending if self._pending is not None else {
            "keys": self.keys, "values": self.values, "positions": self.positions,
            "valid": self.valid, "state": self.state,
        }
        return SlotView(
            layer=self, keys=src["keys"], values=src["values"], positions=src["positions"], valid=src["valid"],
            state=src["state"], query_position=self.cache.query_position, budget=self.cache.budget,
            generators=self.generators,
        )

    # --- after attention: scores and eviction ---------------------------------------------------------------
    def after_attention(self, query: torch.Tensor, scaling: float) -> None:
        self.scaling = scaling
        press = self.press
        if self.cache.measure_attention_loss and self.cache.decode_step > 0:
            self._record_attention_loss(query, scaling)
        if press.query_window:
            self._push_queries(query)
        view = None
        if press.accumulates_attention:
            view = self._view()
            step = self.cache.step
            press.observe(view, attention_probs(
                query, step.positions, step.valid, view.keys, view.positions, view.valid, scaling, reduce="sum",
                gqa=getattr(press, "gqa", "mean"),
            ))
        if self._pending is not None:
            self._compress_overflow(view or self._view())
        elif self.cache.trigger is not None and max(self.counts) >= self.cache.trigger:
            self._evict_in_place(view or self._view())
        if self.cache.retention_log is not None:
            self._record_retention()

    def _record_retention(self) -> None:
        """Fraction of the critical prompt positions held, per KV head, after this step's eviction."""
        critical = self.cache.critical  # [B, max_length] bool
        length = critical.shape[1]
        held = torch.zeros(*self.valid.shape[:2], length + 1, dtype=torch.bool, device=self.device)
        held.scatter_(2, torch.where(self.valid, self.positions, length).clamp(min=0, max=length), True)
        kept = (held[:, :, :length] & critical[:, None, :]).sum(dim=-1).float()
        total = critical.sum(dim=-1, keepdim=True).float()
        fraction = (kept / total).mean(dim=-1)  # [B]; NaN for a prompt without critical tokens
        if self.cache.decode_step < self.cache.retention_log.shape[2]:
            self.cache.retention_log[:, self.layer_idx, self.cache.decode_step] = fraction

    def _push_queries(self, query: torch.Tensor) -> None:
        step = self.cache.step
        window = self.press.query_window
        if self.query_buffer is None:
            b, hq, _, d = query.shape
            self.query_buffer = query.new_zeros(b, hq, window, d)
        n_new = query.shape[2]
        if n_new >= window:
            self.query_buffer.copy_(query[:, :, -window:])
            self.query_positions.copy_(step.positions[:, -window:])
            self.query_valid.copy_(step.valid[:, -window:])
            self.query_pointer = 0
            return
        for i in range(n_new):  # a ring buffer: order does not matter for a mean over queries
            p = self.query_pointer
            self.query_buffer[:, :, p] = query[:, :, i]
            self.query_positions[:, p] = step.positions[:, i]
            self.query_valid[:, p] = step.valid[:, i]
            self.query_pointer = (p + 1) % window

    def window_attention(self, view: SlotView, gqa: str) -> torch.Tensor:
        if not self.press.query_window or self.query_buffer is None:
            raise RuntimeError(f"press {self.press.name!r} asked for attention without a query window")
        return attention_probs(
            self.query_buffer, self.query_positions, self.query_valid,
            view.keys, view.positions, view.valid, self.scaling, reduce="mean", gqa=gqa,
        )

    def _ranked(self, view: SlotView) -> torch.Tensor:
        """Slot indices [B, H, S], best first: by press score, ties kept by recency, invalid slots last.

        Ranking never depends on where a token sits physically, so batched and single runs evict alike.
        """
        scores = self.press.score(view).float().masked_fill(~view.valid, -torch.inf)
        return rank_slots(scores, view.positions)

    def _evict_in_place(self, view: SlotView) -> None:
        """Free the ``count - budget`` lowest-scored slots of each full sequence, per KV head."""
        budget, trigger = self.cache.budget, self.cache.trigger
        full = [c >= trigger for c in self.counts]
        n_evict = max(self.counts) - budget
        lowest = self._ranked(view)[..., -n_evict:]  # [B, H, n]; full rows hold no invalid slot
        if all(full):
            self.valid.scatter_(2, lowest, False)
        else:  # only sequences at the trigger evict; the others keep their slots
            keep_rows = torch.tensor([not f for f in full], device=self.device)[:, None, None]
            self.valid.scatter_(2, lowest, self.valid.gather(2, lowest) & keep_rows)
        for i, is_full in enumerate(full):
            if is_full:
                self.evicted[i] += self.counts[i] - budget
                self.counts[i] = budget
        self.heads_uniform = False

    def _compress_overflow(self, view: SlotView) -> None:
        """Keep the best ``budget`` of slots + new tokens per KV head (all of them if under the trigger)."""
        budget, trigger, capacity = self.cache.budget, self.cache.trigger, self.cache.capacity
        keep_n = [budget if trigger is not None and c >= trigger else c for c in self.counts]
        if max(keep_n) > capacity:
            raise RuntimeError(f"cache capacity {capacity} exceeded ({max(keep_n)} entries) without eviction")
        evicting = keep_n != self.counts
        if evicting:
            ranked = self._ranked(view)
        else:  # nothing to drop: keep every valid slot, newest first
            ranked = rank_slots(view.valid.float().masked_fill(~view.valid, -torch.inf), view.positions)
        k = min(capacity, ranked.shape[-1])
        order = ranked[..., :k]  # [B, H, k], best first
        rank_ok = torch.arange(k, device=self.device)[None, :] < torch.tensor(keep_n, device=self.device)[:, None]
        kept_valid = view.valid.gather(2, order) & rank_ok[:, None, :]
        pending = self._pending
        for name in ("keys", "values"):
            src = pending[name]
            getattr(self, name)[:, :, :k] = src.gather(2, order[..., None].expand(-1, -1, -1, src.shape[-1]))
        self.positions[:, :, :k] = pending["positions"].gather(2, order)
        self.valid[:, :, :k] = kept_valid
        self.valid[:, :, k:] = False
        for n, s in self.state.items():
            s[:, :, :k] = pending["state"][n].gather(2, order)
        for i in range(len(self.counts)):
            self.evicted[i] += self.counts[i] - keep_n[i]
            self.counts[i] = keep_n[i]
        self._pending = None
        self.overflowing = False
        if evicting:
            self.heads_uniform = False


def rank_slots(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Indices that sort slots by descending score, equal scores by descending position (newest first)."""
    newest_first = positions.argsort(dim=-1, descending=True, stable=True)
    by_score = scores.gather(-1, newest_first).argsort(dim=-1, descending=True, stable=True)
    return newest_first.gather(-1, by_score)


class BudgetCache(DynamicCache):
    """A cache with one ``BudgetLayer`` per model layer.

    ``budget=None`` (or a press that does not evict) is the full cache, preallocated for ``max_length``.
    ``get_seq_length()`` is the logical length (tokens seen); attention sees the physical slots.
    """

    def __init__(self, press: Press, budget: int | None, num_layers: int, max_length: int, seeds: list[int],
                 measure_attention_loss: bool = False, max_new_tokens: int = 0):
        if budget is not None and budget < 1:
            raise ValueError(f"budget must be >= 1, got {budget}")
        self.press = press
        self.budget = budget if press.evicts else None
        self.trigger = None if self.budget is None else self.budget + press.buffer
        # Never allocate more than a sequence can hold: a budget beyond the length costs no memory.
        self.capacity = max_length if self.trigger is None else min(self.trigger, max_length)
        self.seeds = list(seeds)
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.measure_attention_loss = measure_attention_loss
        #: [B, layers, decode steps, KV heads] attention loss, allocated with the first layer when measuring.
        self.loss_log: torch.Tensor | None = None
        self.decode_step = 0  # 0 = prefill, t = the t-th decoding forward
        #: With critical prompt positions: [B, layers, steps] share of them held after each forward.
        self.critical: torch.Tensor | None = None
        self.retention_log: torch.Tensor | None = None
        self.step: StepInputs | None = None
        self.query_position: torch.Tensor | None = None
        self.tokens_seen = 0
        Cache.__init__(self, layers=[BudgetLayer(self, i) for i in range(num_layers)])

    def begin_step(self, positions: torch.Tensor, valid: torch.Tensor, valid_counts: list[int],
                   decode_step: int = 0) -> None:
        self.step = StepInputs(positions=positions, valid=valid, valid_counts=valid_counts)
        self.decode_step = decode_step
        self.query_position = positions[:, -1]
        self.tokens_seen += positions.shape[1]

    def track_critical(self, positions: list[list[int]], max_new_tokens: int, device) -> None:
        """Measure retention of these prompt positions (per sequence) after every forward."""
        self.critical = torch.zeros(len(positions), self.max_length, dtype=torch.bool, device=device)
        for row, row_positions in enumerate(positions):
            self.critical[row, list(row_positions)] = True
        self.retention_log = torch.full((len(positions), len(self.layers), max_new_tokens), float("nan"),
                                        device=device)

    # --- telemetry (host side, no synchronisation) ------------------------------------------------------------
    def entries(self, row: int) -> float:
        """Mean over layers of the valid entries per KV head held for sequence ``row``."""
        return sum(layer.counts[row] for layer in self.layers) / len(self.layers)

    def bytes_per_entry(self) -> int:
        """Bytes of one token's keys and values across all layers and KV heads."""
        return sum(layer.keys.shape[1] * (layer.keys.shape[-1] + layer.values.shape[-1]) * layer.keys.element_size()
                   for layer in self.layers if layer.is_initialized)

    def peak_bytes(self, row: int) -> int:
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                _, h, _, d = layer.keys.shape
                total += layer.peak[row] * h * (d + layer.values.shape[-1]) * layer.keys.element_size()
        return total

    def evicted_tokens(self, row: int) -> float:
        """Mean over layers of the entries evicted per KV head for sequence ``row``."""
        return sum(layer.evicted[row] for layer in self.layers) / len(self.layers)

    def kept_positions(self, row: int = 0) -> list[list[set[int]]]:
        """Per layer, per KV head, the positions currently held (for tests and analysis; synchronises)."""
        out = []
        for layer in self.layers:
            pos, ok = layer.positions[row].tolist(), layer.valid[row].tolist()
            out.append([{p for p, v in zip(ph, vh) if v} for ph, vh in zip(pos, ok)])
        return out
