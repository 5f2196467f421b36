"""Our own prefill + decode loop (not ``model.generate``), with explicit positions and per-sequence telemetry.

Batches are left-padded; padding is never written as a valid slot, so it is never attended and never
counts against the budget. Finished sequences are frozen: they feed an invalid token that the cache ignores.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

import torch

from kvbench.engine.attention import use_kvbench_attention
from kvbench.engine.cache import BudgetCache
from kvbench.engine.loops import LoopDetector, RepetitionStop
from kvbench.errors import KvbenchError
from kvbench.presses.base import Press


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 512
    #: 0 = greedy.
    temperature: float = 0.0
    top_p: float = 1.0
    #: Keep the k most likely tokens before top-p (0 = all), as transformers' ``top_k``.
    top_k: int = 0
    #: transformers' repetition penalty: logits of tokens already in the sequence (prompt included) divided by it
    #: when positive, multiplied when negative (1 = none). Applied to each row's own tokens only.
    repetition_penalty: float = 1.0
    seed: int = 0
    eos_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    #: End a sequence with finish_reason "loop" once it repeats itself (see ``LoopDetector``).
    stop_on_loop: bool = False
    loop_detector: LoopDetector = LoopDetector()
    #: End a sequence with finish_reason "repetition" at this rule (the paper's harness's ``StopOnRepetition``).
    repetition_stop: RepetitionStop | None = None


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
    #: Next-token logits of every step (only with ``record_logits=True``; for tests and analysis).
    logits: list[torch.Tensor] = field(default_factory=list, repr=False)


def cache_argument(model) -> str:
    """The name under which the installed transformers' ``forward`` takes the cache.

    ``cache`` where it exists (``past_key_values`` is deprecated there, to be removed in 5.40), else
    ``past_key_values`` (transformers 5.0 to the release that renamed it).
    """
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


@contextlib.contextmanager
def _engine_mode(model):
    with torch.inference_mode(), use_kvbench_attention(model):
        yield


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _next_tokens(logits: torch.Tensor, settings: GenerationSettings, generators: list[torch.Generator],
                 seen: torch.Tensor | None = None):
    """Greedy or seeded sampling from ``sampling_probs``; greedy takes the argmax after the repetition penalty."""
    if settings.temperature <= 0:
        return _penalised(logits.float(), settings, seen).argmax(dim=-1)
    probs = sampling_probs(logits, settings, seen)
    # One generator per sequence, so a sequence samples the same tokens whatever batch it is in.
    return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generators)])


def _penalised(logits: torch.Tensor, settings: GenerationSettings, seen: torch.Tensor | None) -> torch.Tensor:
    if seen is None or settings.repetition_penalty == 1.0:
        return logits
    penalty = settings.repetition_penalty
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def sampling_probs(logits: torch.Tensor, settings: GenerationSettings, seen: torch.Tensor | None = None):
    """[B, V] the distribution sampled from, after transformers' processors in their order: repetition penalty
    (over ``seen``, [B, V] bool: the tokens already in each row), temperature, top-k, top-p."""
    logits = _penalised(logits.float(), settings, seen) / settings.temperature
    if 0 < settings.top_k < logits.shape[-1]:
        kth = logits.topk(settings.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    probs = torch.softmax(logits, dim=-1)
    if settings.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > settings.top_p  # keep the first that crosses
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs


def generate(*args, **kwargs) -> list[SequenceOutput]:
    """Generate for a batch of tokenised prompts under ``press`` at ``budget``; see ``generation``."""
    return run_to_end(generation(*args, **kwargs))


def run_to_end(steps: Generator[int, None, list[SequenceOutput]]) -> list[SequenceOutput]:
    """Advance a ``generation`` to its end and return its outputs."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def generation(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    press: Press,
    budget: int | None,
    settings: GenerationSettings,
    *,
    decode: Callable[[list[int]], str] | None = None,
    pad_token_id: int = 0,
    seeds: Sequence[int] | None = None,
    record_logits: bool = False,
    on_step: Callable[[BudgetCache, int], None] | None = None,
    measure_attention_loss: bool = False,
    forced_tokens: Sequence[Sequence[int]] | None = None,
    on_logits: Callable[[int, torch.Tensor], None] | None = None,
    critical_positions: Sequence[Sequence[int]] | None = None,
    static_shapes: bool = False,
    keep_window_attention: bool | None = None,
) -> Generator[int, None, list[SequenceOutput]]:
    """Generate for a batch of tokenised prompts under ``press`` at ``budget`` (None = no eviction).

    ``decode`` turns tokens into text (needed for stop strings and ``SequenceOutput.text``); ``seeds`` gives
    each sequence its own sampling and press seed (default: ``settings.seed`` for all); ``on_step(cache, t)``
    is called after every forward (t = 0 for the prefill). ``forced_tokens`` replays given outputs instead of
    choosing (teacher forcing: finish reason "forced" when a sequence's tokens run out); ``on_logits(t, logits)``
    receives the [B, V] next-token logits that choose output token t (0-based) before it is chosen.
    ``keep_window_attention`` keeps a query window's attention between steps (default: on CPU only; see
    ``kvbench.engine.window``).

    A generator: it yields the step number after the prefill (0) and after every decoding forward, and returns
    the outputs, so that ``kvbench bench`` can time several generations side by side, step by step.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if settings.stop_strings and decode is None:
        raise ValueError("stop strings need a decode function")
    device = next(model.parameters()).device
    batch = len(prompts)
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    seeds = list(seeds) if seeds is not None else [settings.seed] * batch

    ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    valid = torch.zeros(batch, width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        valid[row, width - len(prompt):] = True
    positions = (valid.long().cumsum(dim=-1) - 1).clamp(min=0)
    ids, valid, positions = ids.to(device), valid.to(device), positions.to(device)

    if any(getattr(model.config, name, None) is not None for name in ("vision_config", "audio_config")):
        raise KvbenchError(f"{model.config.model_type}: multimodal models are not supported (kvbench runs text-only "
                           "decoders)")
    config = model.config.get_text_config(decoder=True)
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise KvbenchError(f"{config.model_type}: layers of type {sorted(layer_types - {'full_attention'})} are not "
                           "supported (kvbench evicts from full-attention caches only)")
    if press.sparse:
        cache = _shadow_cache(model, press, budget, config.num_hidden_layers, width + settings.max_new_tokens,
                              batch, device, measure_attention_loss or static_shapes)
    else:
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        cache = BudgetCache(press, budget, config.num_hidden_layers, kv_heads, width + settings.max_new_tokens, seeds,
                            measure_attention_loss=measure_attention_loss, max_new_tokens=settings.max_new_tokens,
                            static_shapes=static_shapes,
                            keep_window_attention=device.type == "cpu" if keep_window_attention is None
                            else keep_window_attention)
    if critical_positions is not None:  # prompt positions -> padded batch positions are the same (explicit)
        cache.track_critical(critical_positions, settings.max_new_tokens, device)
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    eos = set(settings.eos_token_ids)
    seen = None  # [B, V] tokens each row has seen, for the repetition penalty

    tokens: list[list[int]] = [[] for _ in range(batch)]
    logits_log: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    finish: list[str | None] = [None] * batch
    decode_end = [0.0] * batch
    loop_start: list[int | None] = [None] * batch
    cache_len_sum = [0.0] * batch
    next_position = torch.tensor(lengths, device=device)

    cache_kwarg = {cache_argument(model): cache}

    def forward(input_ids, pos, ok, counts, decode_step=0):
        cache.begin_step(pos, ok, counts, decode_step)
        out = model(
            input_ids=input_ids, position_ids=pos, **cache_kwarg, use_cache=True, kvbench_cache=cache,
            logits_to_keep=1,
        )
        cache.end_step()
        return out.logits[:, -1]

    # Each stretch of work between two yields runs in its own context, so generations interleaved by a caller
    # never see each other's inference mode or attention setting.
    with _engine_mode(model):
        _synchronize(device)
        start = time.perf_counter()
        logits = forward(ids, positions, valid, lengths)
        if on_step:
            on_step(cache, 0)
        _synchronize(device)
    decode_start = time.perf_counter()
    prefill_s = decode_start - start
    yield 0

    active_masks: dict[tuple[bool, ...], torch.Tensor] = {}  # each crosses to the device once
    for step in range(1, settings.max_new_tokens + 1):
        with _engine_mode(model):
            if on_logits:
                on_logits(step - 1, logits)
            if forced_tokens is not None:
                chosen = torch.tensor([f[step - 1] if step <= len(f) else pad_token_id for f in forced_tokens],
                                      device=device)
            else:
                if settings.repetition_penalty != 1.0:
                    seen = _seen_tokens(ids, valid, logits.shape[-1]) if seen is None else seen
                chosen = _next_tokens(logits, settings, generators, seen)
            chosen_list = chosen.tolist()  # the stopping check: the one synchronisation per step
            now = time.perf_counter()
            for row in range(batch):
                if finish[row] is not None:
                    continue
                token = chosen_list[row]
                tokens[row].append(token)
                if record_logits:
                    logits_log[row].append(logits[row].float().cpu())
                if loop_start[row] is None and settings.loop_detector.looped(tokens[row]):
                    loop_start[row] = len(tokens[row])
                if forced_tokens is not None:
                    if len(tokens[row]) >= len(forced_tokens[row]):
                        finish[row] = "forced"
                elif token in eos:
                    finish[row] = "eos"
                elif settings.stop_strings and _hits_stop(tokens[row], decode, settings.stop_strings):
                    finish[row] = "stop"
                elif settings.stop_on_loop and loop_start[row] is not None:
                    finish[row] = "loop"
                elif settings.repetition_stop is not None and settings.repetition_stop.hit(tokens[row]):
                    finish[row] = "repetition"
                elif len(tokens[row]) >= settings.max_new_tokens:
                    finish[row] = "length"
                if finish[row] is not None:
                    decode_end[row] = now
            if all(f is not None for f in finish):
                break
            active = tuple(f is None for f in finish)
            if active not in active_masks:
                active_masks[active] = torch.tensor(active, device=device)
            active_mask = active_masks[active]
            if seen is not None:
                seen[torch.arange(batch, device=device), chosen] |= active_mask
            step_ids = torch.where(active_mask, chosen, pad_token_id)[:, None]
            logits = forward(step_ids, next_position[:, None], active_mask[:, None], [int(a) for a in active], step)
            next_position = next_position + active_mask  # not in place: the cache keeps the old tensor
            for row in range(batch):
                if active[row]:
                    cache_len_sum[row] += cache.entries(row)
            if on_step:
                on_step(cache, step)
        yield step
    _synchronize(device)

    results = []
    for row in range(batch):
        n_out = len(tokens[row])
        decode_s = max(decode_end[row] - decode_start, 1e-9)
        steps = max(n_out - 1, 1)  # decode forwards this sequence took part in
        results.append(SequenceOutput(
            tokens=tokens[row],
            finish_reason=finish[row] or "length",
            prompt_tokens=lengths[row],
            output_tokens=n_out,
            prefill_s=prefill_s,
            decode_s=decode_s,
            tokens_per_s=n_out / decode_s,
            peak_kv_bytes=cache.peak_bytes(row),
            evicted_tokens=cache.evicted_tokens(row),
            mean_cache_len=cache_len_sum[row] / steps if n_out > 1 else cache.entries(row),
            looped=loop_start[row] is not None,
            loop_start=loop_start[row],
            kv_byte_steps=cache_len_sum[row] * cache.bytes_per_entry(),
            host_kv_bytes=cache.host_bytes(row) if press.sparse else 0,
            attention_loss=None if cache.loss_log is None else cache.loss_log[row, :, : max(n_out - 1, 0)].cpu(),
            retention=None if cache.retention_log is None else cache.retention_log[row, :, : max(n_out, 1)].cpu(),
            text=decode(tokens[row]) if decode else None,
            logits=logits_log[row],
        ))
    return results


def _seen_tokens(ids: torch.Tensor, valid: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, V]: the tokens of each row's prompt (padding excluded)."""
    seen = torch.zeros(ids.shape[0], vocab, dtype=torch.bool, device=ids.device)
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
    seen[rows[valid], ids[valid]] = True
    return seen


def _shadow_cache(model, press: Press, budget: int | None, num_layers: int, max_length: int, batch: int, device,
                  unsupported: bool):
    """ShadowKV's cache, which rebuilds keys with the model's own rotary embedding."""
    from kvbench.engine.shadow import ShadowCache

    if budget is None:
        raise KvbenchError(f"{press.name}: give a budget (tokens attended per step)")
    if unsupported:
        raise KvbenchError(f"{press.name}: attention-loss measurement and --static-shapes apply to evicting caches "
                           "only")
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None:
        raise KvbenchError(f"{press.name}: needs a model with a rotary embedding (model.model.rotary_emb)")

    def rope(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rotary(torch.zeros(1, device=device), positions[None].to(device))
        return cos[0].float(), sin[0].float()

    return ShadowCache(press, budget, num_layers, max_length, rope, batch)


def _hits_stop(tokens: list[int], decode: Callable[[list[int]], str], stops: tuple[str, ...]) -> bool:
    tail = decode(tokens[-16:])  # stop strings are short; the tail is enough and keeps this O(1) per step
    return any(s in tail for s in stops)
