"""BudgetCache: a DynamicCache whose layers are fixed-capacity slot buffers with per-KV-head eviction.

The cache preallocates ``[layers, batch, kv_heads, capacity, head_dim]`` keys and values, the original
position of every slot and a valid-slot mask; each ``BudgetLayer`` works on its own slice. Decoding writes
the new token into a free slot in place. When a sequence holds ``budget + buffer`` entries after a step, the
press scores the slots and the lowest ``buffer`` per KV head are freed: at the end of the step, for all
layers at once (the layers are folded into the batch dimension), because a layer's cache is not read again
before the next step and one call for all layers costs a thirtieth of the per-layer overhead. A step that
does not fit (a prompt longer than the capacity) attends over the slots plus the new tokens, then keeps the
press's best ``budget`` per layer (prefill compression).

Bookkeeping that decides *when* to evict (entries per sequence, the same in every layer) lives on the host,
so deciding costs no device synchronisation. Under a press that allocates (PyramidKV, AdaKV) layers and heads
keep different numbers of entries: each keeps its best-ranked slots up to its count, and the capacity is the
most one head may hold.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache

from kvbench.engine.device_eviction import DeviceEviction
from kvbench.engine.layer import BudgetLayer, LayerStep
from kvbench.engine.occupancy import Occupancy
from kvbench.engine.query_ring import QueryRing
from kvbench.engine.recorders import AttentionLossRecorder, RetentionRecorder
from kvbench.engine.scores import attention_probs
from kvbench.engine.splice import RowSplicing
from kvbench.engine.telemetry import CacheTelemetry
from kvbench.engine.view import SlotView, StepMode, StepPlan
from kvbench.engine.window import KeptWindowAttention, worth_keeping
from kvbench.errors import KvbenchError
from kvbench.presses.base import TOKEN_STATE, Press
from kvbench.presses.ranking import lowest_slots, slot_ranks


def slot_capacity(press: Press, budget: int | None, num_layers: int, num_kv_heads: int, max_length: int) -> int:
    """Slots preallocated per layer and KV head: what the press may hold at its budget, never more than a sequence
    of ``max_length`` tokens can fill (a budget beyond the length costs no memory)."""
    if not (press.evicts and budget is not None):
        return max_length
    return min(press.capacity(budget, num_layers, num_kv_heads), max_length)


class BudgetCache(RowSplicing, DeviceEviction, CacheTelemetry, DynamicCache):
    """A cache with one ``BudgetLayer`` per model layer over stacked slot buffers.

    ``budget=None`` (or a press that does not evict) is the full cache, preallocated for ``max_length``.
    ``get_seq_length()`` is the logical length (tokens seen); attention sees the physical slots in use.
    The decode loop calls ``begin_step`` before and ``end_step`` after every forward.

    How full, in one place (entries are counted per KV head, one entry = one token's key and value):
    ``capacity`` slots preallocated per layer and head; ``used`` slots that may hold a valid entry (the prefix
    attention and scoring read), ``used_after`` the same once this step's tokens are written; ``occupancy.held``
    (``kvbench.engine.occupancy``) the entries each sequence holds, on the host, and its next ``row_trigger``
    (the count that starts a compression) and ``row_keep`` (what it keeps; ``budget`` and ``trigger`` are the
    nominal ones, ``step.keep_n`` an overflow step's); ``entries(row)`` what telemetry reports.
    """

    def __init__(self, press: Press, budget: int | None, num_layers: int, num_kv_heads: int, max_length: int,
                 seeds: list[int], measure_attention_loss: bool = False, max_new_tokens: int = 0,
                 static_shapes: bool = False, keep_window_attention: bool = False):
        if budget is not None and budget < 1:
            raise ValueError(f"budget must be >= 1, got {budget}")
        self.press = press
        self._set_schedule(budget, num_layers, num_kv_heads, max_length)
        #: Attend over every preallocated slot, so each decoding step has the same shapes (for torch.compile).
        self.static_shapes = static_shapes
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        #: The attention mass each query puts on evicted entries, when measured (the layers write and record it).
        self.attention_loss = (AttentionLossRecorder(num_layers, max_length, max_new_tokens)
                               if measure_attention_loss else None)
        batch = len(seeds)
        self.row_seeds = torch.tensor([[seed * 1_000_003 + layer for seed in seeds] for layer in range(num_layers)])
        # Stacked buffers, allocated by the first layer to see keys: [layers, B, H, capacity, ...].
        self.keys: torch.Tensor | None = None
        self.values = self.positions = self.valid = None
        self.state: dict[str, torch.Tensor] = {}
        self.occupancy = Occupancy(batch, num_layers, self.allocates)
        #: Every valid slot lies in [0, used): writes go to the first free slot (a slot index is at most the
        #: entries held before the write), so attention and scoring skip the never-written tail.
        self.used = self.capacity if static_shapes else 0
        self.heads_uniform = True  # all KV heads hold the same positions (true until an eviction)
        #: Recent queries, for presses with a query window.
        self.query_ring = QueryRing(num_layers, press.query_window, batch) if press.query_window else None
        self.rope = None  # the model's RoPE, for a press that reads it (``set_rope``)
        #: The window queries' attention kept between decoding steps (see ``kvbench.engine.window``).
        self.kept_window = (KeptWindowAttention(self.capacity)
                            if keep_window_attention and worth_keeping(press, budget) else None)
        self.step_queries: list[torch.Tensor | None] = [None] * num_layers  # decode queries, for observe()
        self._row_masks: dict[tuple[bool, ...], torch.Tensor] = {}
        self._keep_rows: dict[tuple[tuple[bool, ...], int | None], torch.Tensor] = {}
        #: Measurements told after every forward's eviction (``after_step(cache)``), e.g. retention.
        self.observers: list = []
        self.retention: RetentionRecorder | None = None
        #: This forward's plan (``begin_step``): mode, slots in use after it, what an overflow keeps.
        self.step: StepPlan | None = None
        self.query_position: torch.Tensor | None = None
        self.prompt_length: torch.Tensor | None = None  # [B], set by the prefill
        #: [B] the forward at which each sequence joined (continuous batching, ``kvbench.engine.splice``), and
        #: each row's own decoding step this forward; both None while every row started together.
        self.step_offset: torch.Tensor | None = None
        self.row_step: torch.Tensor | None = None
        self.tokens_seen = 0
        Cache.__init__(self, layers=[BudgetLayer(i, self.bind_layer, self.capacity) for i in range(num_layers)])

    def _set_schedule(self, budget: int | None, num_layers: int, num_kv_heads: int, max_length: int) -> None:
        """When to compress and how much to keep, per layer and head, and the slots that needs."""
        press = self.press
        #: Entries a compression keeps and entries that trigger one (``budget`` and ``budget + buffer`` for most
        #: presses; a press bounded by its budget keeps less).
        self.budget, self.trigger = press.cadence(budget) if press.evicts and budget is not None else (None, None)
        self.requested_budget = budget
        self.num_kv_heads = num_kv_heads
        #: Entries each layer keeps per KV head on average at a compression; layers or heads keep different
        #: numbers under a press that ``allocates`` (PyramidKV, AdaKV), which then frees slots by rank.
        self.layer_keep = press.layer_budgets(self.budget, num_layers) if self.budget is not None else None
        self.allocates = press.allocates and self.budget is not None
        self.capacity = slot_capacity(press, budget, num_layers, num_kv_heads, max_length)
        self.head_capacity = ([press.head_capacity(b, num_kv_heads) for b in self.layer_keep]
                              if self.allocates else None)

    def set_rope(self, rope) -> None:
        """The model's RoPE (``kvbench.engine.rope``), handed to the press in every view and query window."""
        self.rope = rope
        if self.query_ring is not None:
            self.query_ring.rope = rope

    def bind_layer(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple:
        """Layer ``layer``'s slices of the stacked buffers, allocated by the first layer to see keys."""
        if self.keys is None:
            b, h, _, d = key_states.shape
            self.allocate_rows(b, h, d, value_states.shape[-1], key_states.dtype, key_states.device)
        if key_states.shape[1:2] + key_states.shape[3:] != self.keys.shape[2:3] + self.keys.shape[4:]:
            raise KvbenchError(f"layer {layer}: KV shape {tuple(key_states.shape)} differs from layer 0's; kvbench "
                               "needs the same KV heads and head size in every layer")
        return (self.keys[layer], self.values[layer], self.positions[layer], self.valid[layer],
                {name: s[layer] for name, s in self.state.items()})

    def allocate_rows(self, b: int, h: int, key_dim: int, value_dim: int, dtype: torch.dtype, device) -> None:
        n_layers, c = len(self.layers), self.capacity
        self.keys = torch.zeros(n_layers, b, h, c, key_dim, dtype=dtype, device=device)
        self.values = torch.zeros(n_layers, b, h, c, value_dim, dtype=dtype, device=device)
        self.positions = torch.full((n_layers, b, h, c), -1, dtype=torch.long, device=device)
        self.valid = torch.zeros(n_layers, b, h, c, dtype=torch.bool, device=device)
        self.state = {n: torch.zeros(n_layers, b, h, c, dtype=torch.float32, device=device)
                      for n in (*self.press.state_names, *((TOKEN_STATE,) if self.press.reads_tokens else ()))}
        self.row_seeds = self.row_seeds.to(device)

    # --- the step protocol ---------------------------------------------------------------------------------------
    def begin_step(self, positions: torch.Tensor, valid: torch.Tensor, valid_counts: list[int],
                   decode_step: int = 0, token_ids: torch.Tensor | None = None) -> StepPlan:
        """Decide what the forward does (the step's plan, ``self.step``) and count its tokens on the host."""
        self.query_position = positions[:, -1]
        self.row_step = None if self.step_offset is None else decode_step - self.step_offset
        if self.prompt_length is None:
            self.prompt_length = torch.tensor(valid_counts, device=positions.device)
            self.occupancy.prompt_held = list(valid_counts)
            for row in range(len(valid_counts)):
                self._schedule(row)
        n_new = positions.shape[1]
        self.tokens_seen += n_new
        occupancy = self.occupancy
        held = max(occupancy.held)
        fits = held + n_new <= self.capacity
        mode = (StepMode.SLOT if fits and n_new == 1 else StepMode.BULK if fits and held == 0
                else StepMode.OVERFLOW)
        occupancy.add(valid_counts, self.capacity)
        if self.static_shapes:
            used_after = self.capacity
        elif mode is StepMode.OVERFLOW:
            used_after = min(self.capacity, self.used + n_new)
        elif mode is StepMode.BULK:
            used_after = max(self.used, n_new)
        else:  # a valid write lands at most at the entries its head held before it
            used_after = min(self.capacity, max(self.used, occupancy.most_held()))
        keep_n: list[int] = []
        if mode is StepMode.OVERFLOW:
            keep_n = [k if t is not None and c >= t else c
                      for c, k, t in zip(occupancy.held, occupancy.row_keep, occupancy.row_trigger)]
            if max(keep_n) > self.capacity:
                raise RuntimeError(f"cache capacity {self.capacity} exceeded ({max(keep_n)} entries) without eviction")
        if self.query_ring is not None:
            self.query_ring.advance(positions, valid)
        self.step = StepPlan(positions, valid, valid_counts, decode_step, mode, used_after, tuple(keep_n),
                             overflow_evicts=mode is StepMode.OVERFLOW and keep_n != occupancy.held,
                             token_ids=token_ids if self.press.reads_tokens else None)
        layer_step = LayerStep(
            self.step, self.press, self.used, self.capacity, self.tokens_seen, self.budget, tuple(occupancy.held),
            self.query_position, self.prompt_length, self.row_step, self.row_seeds, self.heads_uniform,
            self.allocates, self.query_ring, self.attention_loss, self.hold_query, self.layer_keep_rows,
            self.requested_budget if self.press.selects else None, self.rope)
        for layer in self.layers:
            layer.step = layer_step
        return self.step

    def hold_query(self, layer: int, query: torch.Tensor) -> None:
        """A decoding query of ``layer``, for the press's ``observe`` in ``end_step``."""
        self.step_queries[layer] = query

    # the step's plan, read-only: set by begin_step alone
    @property
    def decode_step(self) -> int:
        return self.step.decode_step if self.step is not None else 0

    @property
    def mode(self) -> StepMode:
        return self.step.mode if self.step is not None else StepMode.BULK

    @property
    def used_after(self) -> int:
        return self.step.used_after if self.step is not None else self.used

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.tokens_seen

    def get_query_offset(self, layer_idx: int = 0) -> int:
        # Read only by transformers' mask builders, which kvbench's attention bypasses (its masks come from the
        # slots); a constant keeps a compiled step from specialising on the token count.
        return 0

    def end_step(self) -> None:
        """After the forward: decoding's scoring and eviction for all layers at once, and the bookkeeping."""
        press = self.press
        if self.mode is not StepMode.SLOT and self.kept_window is not None:
            self.kept_window.fresh = False  # several tokens were written or slots moved: recompute next step
        if self.mode is StepMode.OVERFLOW:
            counted = self.held_on_device() if self.press.keeps_fewer and self.step.overflow_evicts else None
            for i, keep in enumerate(self.step.keep_n):
                if keep != self.occupancy.held[i]:
                    self._compressed(i, keep, None if counted is None else counted[i])
            self.heads_uniform &= not self.step.overflow_evicts
        else:
            view = None
            if self.mode is StepMode.SLOT and press.accumulates_attention:
                view = self._observe_decoding()
            if self.mode is StepMode.SLOT and self.kept_window is not None:
                view = view or self.stacked_view()
                self._update_kept_window(view)
            if self.trigger is not None and any(self.occupancy.at_trigger()):
                self._evict_in_place(view or self.stacked_view())
        self.used = self.used_after
        for observer in self.observers:
            observer.after_step(self)

    def _observe_decoding(self, step: torch.Tensor | None = None) -> SlotView:
        """The press observes this decoding step's attention, every layer at once; the view it saw."""
        view = self.stacked_view(step)
        queries = torch.stack(self.step_queries).flatten(0, 1)  # [L*B, H_q, 1, D]
        n_layers = len(self.layers)
        self.press.observe(view, attention_probs(
            queries, self.step.positions.repeat(n_layers, 1), self.step.valid.repeat(n_layers, 1), view.keys,
            view.positions, view.valid, self.layers[0].scaling, reduce="sum", gqa=getattr(self.press, "gqa", "mean"),
        ))
        self.step_queries = [None] * n_layers
        return view

    def stacked_view(self, step: torch.Tensor | None = None) -> SlotView:
        """Every layer's slots in use, folded into the rows: [layers * B, H, used, ...] views of the buffers;
        ``step`` replaces the decoding step's number (a compiled step's tensor of it)."""
        n, n_layers = self.used_after, len(self.layers)

        def fold(t: torch.Tensor) -> torch.Tensor:
            t = t[:, :, :, :n]
            return t.view(-1, *t.shape[2:])

        window = None
        if self.query_ring is not None and self.query_ring.queries is not None:
            scalings = {layer.scaling for layer in self.layers}
            if len(scalings) > 1:
                raise KvbenchError("layers with different attention scalings are not supported")
            window = self.query_ring.stacked_window(scalings.pop())
        return SlotView(
            keys=fold(self.keys), values=fold(self.values), positions=fold(self.positions), valid=fold(self.valid),
            state={name: fold(s) for name, s in self.state.items()},
            query_position=self.query_position.repeat(n_layers), budget=self.budget,
            seeds=self.row_seeds.flatten(), step=self.decode_step if step is None else step,
            prompt_length=self.prompt_length.repeat(n_layers),
            row_step=None if self.row_step is None else self.row_step.repeat(n_layers),
            layers=n_layers, window=window, rope=self.rope,
        )

    def _compressed(self, row: int, keep: int, counted: tuple | None = None) -> None:
        """Host bookkeeping of sequence ``row`` after a compression that keeps ``keep`` (or what the device
        ``counted``: ``held_on_device``); its next schedule."""
        if counted is not None:
            self.occupancy.counted(row, *counted)
            self._schedule(row)
            return
        layer_keep = self.occupancy.layer_keep[row]
        head_capacity = self.head_capacity if layer_keep is None else [
            self.press.head_capacity(b, self.num_kv_heads) for b in layer_keep]
        self.occupancy.compressed(row, keep, layer_keep or self.layer_keep, head_capacity)
        self._schedule(row)

    def _schedule(self, row: int) -> None:
        """Sequence ``row``'s next (keep, trigger, and what each layer keeps where layers differ), after its
        compressions so far."""
        occupancy = self.occupancy
        if self.budget is None:
            occupancy.set_schedule(row, None, None)
            return
        cadence = (self.requested_budget, occupancy.prompt_held[row], occupancy.compressions[row])
        keep, trigger = self.press.row_cadence(*cadence)
        occupancy.set_schedule(row, keep, trigger, self.press.layer_keeps(*cadence, len(self.layers)))

    def _evict_in_place(self, view: SlotView) -> None:
        """Free the ``count - budget`` lowest-scored slots of each full sequence, per KV head, in every layer."""
        occupancy = self.occupancy
        full = occupancy.at_trigger()
        keeps = list(occupancy.row_keep)
        if self.allocates:
            view.compress_to, keep = self.layer_keep_rows(full)
        else:
            view.compress_to = [k if f else self.capacity for k, f in zip(keeps, full)] * len(self.layers)
        scores = self.press.score(view).float().masked_fill(~view.valid, -torch.inf)
        if self.press.keeps_fewer:  # the press chooses: what it scores above -inf, in the rows at their trigger
            view.valid &= (scores > -torch.inf) | ~self.row_mask(full)
            counted = self.held_on_device()
        elif self.allocates:
            view.valid &= self.keep_mask(scores, view.positions, keep)
        elif self.capacity > min(occupancy.row_trigger):  # a growing schedule: those at their trigger hold free slots
            keep = torch.tensor(view.compress_to, device=scores.device)
            view.valid &= slot_ranks(scores, view.positions) < keep[:, None, None]
        else:
            surplus = {c - k for c, k, f in zip(occupancy.held, keeps, full) if f}
            if len(surplus) != 1:
                raise RuntimeError(f"sequences at their trigger would evict different numbers of entries: {surplus}")
            n_evict = surplus.pop()
            lowest = lowest_slots(scores, view.positions, n_evict)  # [L*B, H, n]; full rows hold no free slot
            if all(full):
                view.valid.scatter_(2, lowest, False)
            else:  # only sequences at the trigger evict; the others keep their slots
                keep_rows = self.row_mask(tuple(not f for f in full))
                view.valid.scatter_(2, lowest, view.valid.gather(2, lowest) & keep_rows)
            if self.kept_window is not None and self.kept_window.fresh:
                self.kept_window.drop(lowest, None if all(full) else self.row_mask(full))
        for i, is_full in enumerate(full):
            if is_full:
                self._compressed(i, keeps[i], counted[i] if self.press.keeps_fewer else None)
        self.heads_uniform = False

    def held_on_device(self) -> list[tuple[int, list[float], list[int]]]:
        """Per sequence, read from the device (one synchronisation): the most entries a KV head of any layer holds,
        and per layer the mean and the most per KV head: the host's counts after a press that ``keeps_fewer``."""
        if self.kept_window is not None:
            self.kept_window.fresh = False  # entries left that the window's bookkeeping did not drop
        counts = self.valid.sum(-1).float()  # [L, B, H]
        means, most = torch.stack([counts.mean(-1).T, counts.amax(-1).T]).tolist()  # one transfer
        return [(int(max(m)), mean, [int(x) for x in m]) for mean, m in zip(means, most)]

    def keep_mask(self, scores: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """[N, H, S]: the slots of each head ranked within its count, the press's counts for rows keeping ``keep``."""
        counts = self.press.head_counts(scores, positions, keep)
        if counts is None:
            counts = keep[:, None]
        return slot_ranks(scores, positions) < counts[..., None]

    def layer_keep_rows(self, full: tuple[bool, ...], layer: int | None = None) -> tuple[list[int], torch.Tensor]:
        """Mean keep per head of each row (all layers folded, or one layer), on the host and on the device: its
        layer's share if the sequence is full (the sequence's own shares where the press staggers its layers),
        every slot otherwise. Cached, so it crosses to the device once."""
        per_row = tuple(self.occupancy.layer_keep)
        key = (full, layer, per_row)
        if key not in self._keep_rows:
            layers = range(len(self.layers)) if layer is None else [layer]
            keep = [(own or self.layer_keep)[i] if is_full else self.capacity
                    for i in layers for is_full, own in zip(full, per_row)]
            self._keep_rows[key] = keep, torch.tensor(keep, device=self.keys.device)
        return self._keep_rows[key]

    def _update_kept_window(self, view: SlotView) -> None:
        """Bring the kept window attention up to this step and let ``view.attention`` read it."""
        window, kept = view.window, self.kept_window
        kept.update(window.queries, window.positions, window.valid, view.keys, view.positions, view.valid,
                    window.scaling, self.query_ring.slots[0])
        used, query_valid = self.used_after, window.valid
        view.attention_override = lambda gqa: kept.mean_attention(query_valid, used, gqa)

    def forget_row_masks(self) -> None:
        """The batch's rows changed (continuous batching): masks made for the old rows no longer apply."""
        self._row_masks.clear()
        self._keep_rows.clear()

    def row_mask(self, rows: tuple[bool, ...]) -> torch.Tensor:
        """[L*B, 1, 1] device mask of the rows given per sequence; cached, so it crosses to the device once."""
        if rows not in self._row_masks:
            mask = torch.tensor(rows, device=self.keys.device).repeat(len(self.layers))
            self._row_masks[rows] = mask[:, None, None]
        return self._row_masks[rows]
