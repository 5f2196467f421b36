"""Continuous batching: a row freed by a finished sequence takes the next prompt while the other rows decode.

Each new prompt is prefilled alone, in the one-row cache batch 1 builds for it (``build_cache``), and that row is
spliced into the running batch's cache (``kvbench.engine.splice``). Every sequence therefore gets the forwards
batch 1 gives it: its own prefill, then one decoding forward per token, batched with whatever else is running
(as static batching batches it). Rows with nothing left to take are frozen. Its outputs are those of
``generate`` at batch 1, token for token and eviction for eviction (``tests/test_continuous.py``, every press).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Generator, Sequence

import torch

from kvbench.engine.compiled import CompiledStep, bucketed_length, check_compilable
from kvbench.engine.decode import Decoder, Hooks, RowRecord, SequenceOutput, synchronize
from kvbench.engine.generate import GenerationSettings, build_cache, engine_mode, left_pad
from kvbench.presses.base import Press

#: What a continuous generation yields: (prompt index, output) of the sequences that have just finished.
Finished = list[tuple[int, SequenceOutput]]


class ContinuousDecoder(Decoder):
    """A ``Decoder`` over rows that sequences join (``admit``) and leave as they finish."""

    def __init__(self, model, cache, rows: int, settings: GenerationSettings, hooks: Hooks, forced: bool,
                 detokenize: Callable[[list[int]], str] | None, pad_token_id: int, device: torch.device):
        # no padded batch: every sequence arrives through ``admit``, into a free row
        super().__init__(model, cache, settings, hooks, [RowRecord(finish="free") for _ in range(rows)],
                         [None] * rows, torch.zeros(rows, dtype=torch.long, device=device), forced=forced,
                         detokenize=detokenize, pad_token_id=pad_token_id)
        #: Rows whose logits wait for their token to be chosen (after a forward, or a new sequence's prefill).
        self.waiting = [False] * rows
        #: Decoding forwards the batch has run, and the tokens chosen for its next one.
        self.step = 0
        self.chosen: dict[int, int] = {}

    def admit(self, row: int, single: Decoder) -> None:
        """Row ``row`` takes ``single``'s sequence, which has run its prefill (and nothing else)."""
        self.cache.splice_row(row, single.cache, self.step)
        self.rows[row], self.generators[row] = single.rows[0], single.generators[0]
        if self.logits is None:
            self.logits = single.logits.new_zeros(len(self.rows), single.logits.shape[-1])
        self.logits = self.logits.clone()  # recorded logits may be views of the old tensor
        self.logits[row] = single.logits[0]
        if single.seen is not None:
            if self.seen is None:
                self.seen = single.seen.new_zeros(len(self.rows), single.seen.shape[-1])
            self.seen[row] = single.seen[0]
        self.next_position = self.next_position.clone()  # the cache's last step still reads the old tensor
        self.next_position[row] = single.rows[0].prompt_tokens
        self.waiting[row] = True
        # Positions stay below the longest sequence running: what the attention-loss shadow is read up to.
        self.cache.advance_tokens(max(r.prompt_tokens + len(r.tokens) + 1 for r in self.rows if r.finish is None))

    def choose_waiting(self) -> list[int]:
        """Choose the token of every waiting row and apply the stop rules; the rows that finished."""
        rows = [i for i, waiting in enumerate(self.waiting) if waiting]
        if not rows:
            return []
        chosen = self.choose(None if len(rows) == len(self.rows) else rows).tolist()  # the one synchronisation
        self.record(chosen, time.perf_counter(), rows)
        for i in rows:
            self.waiting[i] = False
        self.chosen.update(zip(rows, chosen))
        return [i for i in rows if self.rows[i].finish is not None]

    def keep_rows(self, rows: list[int]) -> None:
        """Only ``rows`` stay in the batch, in that order (``BudgetCache.keep_rows``)."""
        self.cache.keep_rows(rows)
        index = torch.tensor(rows, device=self.device)
        self.rows = [self.rows[i] for i in rows]
        self.generators = [self.generators[i] for i in rows]
        self.waiting = [self.waiting[i] for i in rows]
        self.chosen = {new: self.chosen[old] for new, old in enumerate(rows) if old in self.chosen}
        self.logits = self.logits.index_select(0, index)
        self.next_position = self.next_position.index_select(0, index)
        if self.seen is not None:
            self.seen = self.seen.index_select(0, index)
        self.active_masks = {}

    def finished_output(self, row: int) -> SequenceOutput:
        """The output of the sequence that has just finished in ``row`` (before the row takes another)."""
        return self._output(row, self.rows[row])

    def decode_running(self) -> bool:
        """The next decoding forward of the running rows; False when none is running."""
        active = tuple(row.finish is None for row in self.rows)
        if not any(active):
            return False
        chosen = torch.tensor([self.chosen.get(i, self.pad_token_id) for i in range(len(self.rows))],
                              device=self.device)
        self.step += 1
        self.feed(chosen, active, self.step)
        self.waiting = list(active)
        self.chosen = {}
        return True


class ContinuousGeneration:
    """Generate for ``prompts`` with at most ``batch_size`` sequences decoding at once, each prompt taking the
    first row free. ``steps()`` runs it; ``on_admit`` is told each prompt as it begins (for failure records)."""

    def __init__(self, model: torch.nn.Module, prompts: Sequence[Sequence[int]], press: Press, budget: int | None,
                 settings: GenerationSettings, batch_size: int, *, detokenize: Callable[[list[int]], str] | None = None,
                 pad_token_id: int = 0, seeds: Sequence[int] | None = None,
                 forced_tokens: Sequence[Sequence[int]] | None = None, hooks: Hooks = Hooks(),
                 keep_window_attention: bool | None = None, on_admit: Callable[[int], None] | None = None,
                 compile_backend: str | None = None):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if press.sparse or hooks.on_step or hooks.on_logits:
            raise ValueError("continuous batching needs an evicting cache and no per-step hooks (use generate)")
        self.model, self.prompts, self.press, self.budget = model, prompts, press, budget
        self.settings, self.detokenize, self.pad_token_id = settings, detokenize, pad_token_id
        self.seeds = list(seeds) if seeds is not None else [settings.seed] * len(prompts)
        if compile_backend is not None:  # one graph for the batch's rows: they never leave (a fixed bucket)
            check_compilable(press, budget, hooks.attention_loss)
            keep_window_attention = False
        self.compiled = compile_backend is not None
        self.forced, self.hooks, self.keep_window_attention = forced_tokens, hooks, keep_window_attention
        self.on_admit = on_admit  # told each prompt's index as it is begun
        self.device = next(model.parameters()).device
        self.pending = deque(range(len(prompts)))
        rows = min(batch_size, len(prompts))
        max_length = max(len(p) for p in prompts) + settings.max_new_tokens
        if self.compiled:
            max_length = bucketed_length(max_length)
        batch_hooks = Hooks(attention_loss=hooks.attention_loss, record_logits=hooks.record_logits,
                            critical_positions=None if hooks.critical_positions is None else [[]] * rows)
        cache = build_cache(model, press, budget, max_length, self.device, settings, [settings.seed] * rows,
                            batch_hooks, self.compiled, keep_window_attention)
        self.decoder = ContinuousDecoder(model, cache, rows, settings, batch_hooks, forced_tokens is not None,
                                         detokenize, pad_token_id, self.device)
        if self.compiled:
            self.decoder.step_graph = CompiledStep(model, cache, self.decoder.cache_kwarg, compile_backend)
        #: Row -> index of the prompt it decodes.
        self.in_flight: dict[int, int] = {}

    def steps(self) -> Generator[Finished, None, None]:
        """Run to the end, yielding the sequences that finish as soon as they do (before their rows take new
        prompts) and an empty list after every decoding forward."""
        decoder = self.decoder
        while True:
            with engine_mode(self.model):
                self._fill_free_rows()
            done = decoder.choose_waiting()
            if done:  # a new sequence may finish on its first token: its row takes the next prompt at once
                yield [(self.in_flight.pop(row), decoder.finished_output(row)) for row in done]
                continue
            if not self.pending and 0 < len(self.in_flight) < len(decoder.rows) and not self.compiled:
                self._leave_finished_rows()
            with engine_mode(self.model):
                if not decoder.decode_running():
                    synchronize(self.device)
                    return
            yield []

    def _leave_finished_rows(self) -> None:
        """Nothing waits to join: the rows of finished sequences leave the batch."""
        running = sorted(self.in_flight)
        with engine_mode(self.model):
            self.decoder.keep_rows(running)
        self.in_flight = {new: self.in_flight[old] for new, old in enumerate(running)}

    def _fill_free_rows(self) -> None:
        for row, state in enumerate(self.decoder.rows):
            if state.finish is not None and row not in self.in_flight and self.pending:
                index = self.pending.popleft()
                self.in_flight[row] = index
                if self.on_admit:
                    self.on_admit(index)
                self.decoder.admit(row, self._prefill(index))

    def _prefill(self, index: int) -> Decoder:
        """Prompt ``index`` prefilled alone, in the cache batch 1 builds for it."""
        settings, hooks = self.settings, self.hooks
        batch = left_pad([self.prompts[index]], self.pad_token_id, self.device)
        single_hooks = Hooks(attention_loss=hooks.attention_loss, record_logits=hooks.record_logits,
                             critical_positions=None if hooks.critical_positions is None
                             else [hooks.critical_positions[index]])
        cache = build_cache(self.model, self.press, self.budget, batch.ids.shape[1] + settings.max_new_tokens,
                            self.device, settings, [self.seeds[index]], single_hooks, False,
                            self.keep_window_attention)
        forced = None if self.forced is None else [self.forced[index]]
        decoder = Decoder.for_batch(self.model, cache, batch, settings, single_hooks, [self.seeds[index]], forced,
                                    self.detokenize)
        decoder.prefill()
        return decoder


def generate_continuous(model: torch.nn.Module, prompts: Sequence[Sequence[int]], press: Press, budget: int | None,
                        settings: GenerationSettings, batch_size: int, **options) -> list[SequenceOutput]:
    """Every prompt's output, in order, by continuous batching (``ContinuousGeneration``'s options)."""
    outputs: dict[int, SequenceOutput] = {}
    for finished in ContinuousGeneration(model, prompts, press, budget, settings, batch_size, **options).steps():
        outputs.update(finished)
    return [outputs[i] for i in range(len(prompts))]
