"""The decode loop's named steps, after gpt-fast: ``prefill``, ``decode_one_token`` (choose, stop, feed), ``outputs``.

``kvbench.engine.generate.generation`` drives a ``Decoder``; the cache it drives is any ``DecodingCache``.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvbench.engine.protocol import DecodingCache
from kvbench.engine.sampling import next_tokens, seen_tokens

if TYPE_CHECKING:
    from kvbench.engine.settings import GenerationSettings, PaddedBatch


@dataclass(frozen=True)
class Hooks:
    """What a generation measures or reports besides its tokens; all off by default."""

    #: Attention mass each query puts on evicted entries (exact, against a shadow full cache).
    attention_loss: bool = False
    #: Per sequence, the prompt positions whose share held is recorded after each forward (retention).
    critical_positions: Sequence[Sequence[int]] | None = None
    #: Keep every step's next-token logits in ``SequenceOutput.logits`` (tests and analysis).
    record_logits: bool = False
    #: Called after every forward with the cache and the step (0 = the prefill).
    on_step: Callable[[DecodingCache, int], None] | None = None
    #: Called with (t, [B, V] logits) before output token t (0-based) is chosen.
    on_logits: Callable[[int, torch.Tensor], None] | None = None


@dataclass
class SequenceOutput:
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    output_tokens: int
    prefill_s: float
    decode_s: float
    tokens_per_s: float
    #: Peak KV bytes on the device (for ShadowKV: its low-rank store, landmarks and exact tokens).
    peak_kv_bytes: int
    evicted_tokens: float
    mean_cache_len: float
    #: Whether the output ever became degenerate repetition, and at which output token it was detected.
    looped: bool = False
    loop_start: int | None = None
    #: KV footprint over time: bytes held by the cache, summed over this sequence's decoding steps.
    kv_byte_steps: float = 0.0
    #: Peak KV bytes offloaded to host memory (ShadowKV's values; 0 for the other presses).
    host_kv_bytes: int = 0
    #: [layers, decoding steps, KV heads] attention mass the query put on evicted entries (when measured).
    attention_loss: torch.Tensor | None = field(default=None, repr=False)
    #: [layers, forwards] share of the critical prompt tokens held after each forward (0 = after prefill).
    retention: torch.Tensor | None = field(default=None, repr=False)
    text: str | None = None
    #: Seconds of the decoding forwards that compiled a graph (``--compile``): not in ``decode_s`` nor
    #: ``tokens_per_s``; None when decoding was not compiled.
    compile_s: float | None = None
    #: Next-token logits of every step (only with ``Hooks.record_logits``; for tests and analysis).
    logits: list[torch.Tensor] = field(default_factory=list, repr=False)


@dataclass
class RowRecord:
    """One sequence's record so far."""

    prompt_tokens: int = 0
    #: The tokens to replay (teacher forcing), else None.
    forced: Sequence[int] | None = None
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    finish: str | None = None
    prefill_s: float = 0.0
    decode_start: float = 0.0
    decode_end: float = 0.0
    loop_start: int | None = None
    cache_len_sum: float = 0.0
    #: Seconds of the decoding forwards that compiled a graph (``--compile``), left out of ``decode_s``, and how many.
    compile_s: float = 0.0
    compiling_forwards: int = 0


def cache_argument(model) -> str:
    """The name under which the installed transformers' ``forward`` takes the cache.

    ``cache`` where it exists (``past_key_values`` is deprecated there, to be removed in 5.40), else
    ``past_key_values`` (transformers 5.0 to the release that renamed it).
    """
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Decoder:
    """One generation between its named steps; finished sequences are frozen (they feed a token the cache
    ignores), so a batch decodes until its last sequence stops."""

    def __init__(self, model, cache: DecodingCache, settings: GenerationSettings, hooks: Hooks,
                 rows: list[RowRecord], generators: list[torch.Generator | None], next_position: torch.Tensor, *,
                 forced: bool, detokenize: Callable[[list[int]], str] | None, pad_token_id: int,
                 batch: PaddedBatch | None = None):
        """The generation's state: its rows (one record each), their generators and next positions. ``batch``:
        the padded prompts the prefill feeds (None where sequences arrive otherwise, as in continuous batching)."""
        self.model, self.cache, self.batch, self.settings, self.hooks = model, cache, batch, settings, hooks
        self.detokenize, self.pad_token_id = detokenize, pad_token_id
        self.device = next_position.device
        self.rows, self.generators, self.next_position = rows, generators, next_position
        self.eos = set(settings.eos_token_ids)
        self.forced_mode = forced
        self.seen: torch.Tensor | None = None  # [B, V] tokens each row has seen, for the repetition penalty
        self.active_masks: dict[tuple[bool, ...], torch.Tensor] = {}  # each crosses to the device once
        self.cache_kwarg = {cache_argument(model): cache}
        self.logits: torch.Tensor | None = None  # [B, V] that choose the next token
        #: The decoding forward compiled into one graph (``kvbench.engine.compiled``), when asked for.
        self.step_graph = None

    @classmethod
    def for_batch(cls, model, cache: DecodingCache, batch: PaddedBatch, settings: GenerationSettings, hooks: Hooks,
                  seeds: list[int], forced_tokens: Sequence[Sequence[int]] | None,
                  detokenize: Callable[[list[int]], str] | None) -> Decoder:
        """A decoder of the padded prompts ``batch``, one seeded generator per sequence."""
        device = batch.ids.device
        forced = forced_tokens is not None
        rows = [RowRecord(prompt_tokens=n, forced=forced_tokens[i] if forced else None)
                for i, n in enumerate(batch.lengths)]
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        return cls(model, cache, settings, hooks, rows, generators, torch.tensor(batch.lengths, device=device),
                   forced=forced, detokenize=detokenize, pad_token_id=batch.pad_token_id, batch=batch)

    def forward(self, ids, positions, valid, counts: list[int], step: int = 0) -> torch.Tensor:
        """One forward through the cache's step protocol; the last position's logits."""
        if step > 0 and self.step_graph is not None:
            return self.step_graph.forward(ids, positions, valid, counts, step)
        self.cache.begin_step(positions, valid, counts, step, ids)
        out = self.model(input_ids=ids, position_ids=positions, **self.cache_kwarg, use_cache=True,
                         kvbench_cache=self.cache, logits_to_keep=1)
        self.cache.end_step()
        return out.logits[:, -1]

    def prefill(self) -> None:
        synchronize(self.device)
        start = time.perf_counter()
        self.logits = self.forward(self.batch.ids, self.batch.positions, self.batch.valid, self.batch.lengths)
        if self.settings.repetition_penalty != 1.0:
            self.seen = seen_tokens(self.batch.ids, self.batch.valid, self.logits.shape[-1])
        if self.hooks.on_step:
            self.hooks.on_step(self.cache, 0)
        synchronize(self.device)
        now = time.perf_counter()
        for row in self.rows:
            row.prefill_s, row.decode_start = now - start, now

    def decode_one_token(self, step: int) -> bool:
        """Choose output token ``step`` of every running sequence, apply the stop rules and feed the tokens of
        those still running; True once every sequence has finished."""
        if self.hooks.on_logits:
            self.hooks.on_logits(step - 1, self.logits)
        chosen = self.choose()
        self.record(chosen.tolist(), time.perf_counter())  # the stopping check: the one synchronisation per step
        active = tuple(row.finish is None for row in self.rows)
        if not any(active):
            return True
        self.feed(chosen, active, step)
        return False

    def feed(self, chosen: torch.Tensor, active: tuple[bool, ...], step: int) -> None:
        """The decoding forward of step ``step``: the running rows feed their ``chosen`` token, the others pad."""
        if active not in self.active_masks:
            self.active_masks[active] = torch.tensor(active, device=self.device)
        mask = self.active_masks[active]
        if self.seen is not None:
            self.seen[torch.arange(len(active), device=self.device), chosen] |= mask
        step_ids = torch.where(mask, chosen, self.pad_token_id)[:, None]
        self.logits = self.forward(step_ids, self.next_position[:, None], mask[:, None], [int(a) for a in active], step)
        self.next_position = self.next_position + mask  # not in place: the cache keeps the old tensor
        compiling_s = 0.0 if self.step_graph is None else self.step_graph.compiling_s
        for index, (row, running) in enumerate(zip(self.rows, active)):
            if running:
                row.cache_len_sum += self.cache.entries(index)
                if compiling_s:
                    row.compile_s += compiling_s
                    row.compiling_forwards += 1
        if self.hooks.on_step:
            self.hooks.on_step(self.cache, step)

    def choose(self, rows: list[int] | None = None) -> torch.Tensor:
        """The next token of every row (or of ``rows``): the forced ones (teacher forcing), else greedy or sampled
        ones. Only the rows chosen for draw from their generators."""
        index = range(len(self.rows)) if rows is None else rows
        if self.forced_mode:  # a row's next forced token is its own len(tokens)-th
            return torch.tensor([_forced_next(self.rows[i], self.pad_token_id) for i in index], device=self.device)
        if rows is None:
            return next_tokens(self.logits, self.settings, self.generators, self.seen)
        picked = torch.tensor(rows, device=self.device)
        return next_tokens(self.logits[picked], self.settings, [self.generators[i] for i in rows],
                           None if self.seen is None else self.seen[picked])

    def record(self, chosen: list[int], now: float, rows: list[int] | None = None) -> None:
        """Append each running sequence's token (of every row, or of ``rows``) and decide whether it stops here."""
        for index, token in zip(range(len(self.rows)) if rows is None else rows, chosen):
            row = self.rows[index]
            if row.finish is not None:
                continue
            row.tokens.append(token)
            if self.hooks.record_logits:
                row.logits.append(self.logits[index].float().cpu())
            if row.loop_start is None and self.settings.loop_detector.looped(row.tokens):
                row.loop_start = len(row.tokens)
            row.finish = self.finish_reason(row, token)
            if row.finish is not None:
                row.decode_end = now

    def finish_reason(self, row: RowRecord, token: int) -> str | None:
        """The first stop rule the sequence meets, in order; replayed sequences stop when their tokens run out."""
        settings = self.settings
        if row.forced is not None:
            return "forced" if len(row.tokens) >= len(row.forced) else None
        if token in self.eos:
            return "eos"
        if settings.stop_strings and _hits_stop(row.tokens, self.detokenize, settings.stop_strings):
            return "stop"
        if settings.stop_on_loop and row.loop_start is not None:
            return "loop"
        if settings.repetition_stop is not None and settings.repetition_stop.hit(row.tokens):
            return "repetition"
        return "length" if len(row.tokens) >= settings.max_new_tokens else None

    def outputs(self) -> list[SequenceOutput]:
        return [self._output(index, row) for index, row in enumerate(self.rows)]

    def _output(self, index: int, row: RowRecord) -> SequenceOutput:
        cache, n_out = self.cache, len(row.tokens)
        decode_s = max(row.decode_end - row.decode_start - row.compile_s, 1e-9)
        timed_tokens = max(n_out - row.compiling_forwards, 1)  # the tokens of compiling forwards are not timed
        steps = max(n_out - 1, 1)  # decode forwards this sequence took part in
        return SequenceOutput(
            tokens=row.tokens, finish_reason=row.finish or "length", prompt_tokens=row.prompt_tokens,
            output_tokens=n_out, prefill_s=row.prefill_s, decode_s=decode_s, tokens_per_s=timed_tokens / decode_s,
            peak_kv_bytes=cache.peak_bytes(index), evicted_tokens=cache.evicted_tokens(index),
            mean_cache_len=row.cache_len_sum / steps if n_out > 1 else cache.entries(index),
            looped=row.loop_start is not None, loop_start=row.loop_start,
            kv_byte_steps=row.cache_len_sum * cache.bytes_per_entry(), host_kv_bytes=cache.host_bytes(index),
            attention_loss=None if cache.loss_log is None else _copy(cache.loss_log[index, :, : max(n_out - 1, 0)]),
            retention=None if cache.retention_log is None else _copy(cache.retention_log[index, :, : max(n_out, 1)]),
            text=self.detokenize(row.tokens) if self.detokenize else None, logits=row.logits,
            compile_s=None if self.step_graph is None else row.compile_s,
        )


def _copy(log: torch.Tensor) -> torch.Tensor:
    """A host copy (never a view: under continuous batching the row is reused)."""
    return log.to("cpu", copy=True)


def _forced_next(row: RowRecord, pad_token_id: int) -> int:
    return row.forced[len(row.tokens)] if row.finish is None and len(row.tokens) < len(row.forced) else pad_token_id


def _hits_stop(tokens: list[int], detokenize: Callable[[list[int]], str], stops: tuple[str, ...]) -> bool:
    tail = detokenize(tokens[-16:])  # stop strings are short; the tail is enough and keeps this O(1) per step
    return any(s in tail for s in stops)
