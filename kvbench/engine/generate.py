"""Our own prefill + decode loop (not ``model.generate``), with explicit positions and per-sequence telemetry.

A ladder of small steps: check the request, ``left_pad`` the prompts, check the model (``supported_text_config``),
``build_cache``, then a ``Decoder`` (``kvbench.engine.decode``) runs ``prefill`` and ``decode_one_token`` until
every sequence has stopped. Batches are left-padded; padding is never written as a valid slot, so it is never
attended and never counts against the budget. Finished sequences are frozen: they feed an invalid token that
the cache ignores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Sequence

import torch

from kvbench.engine.attention import use_kvbench_attention
from kvbench.engine.cache import BudgetCache
from kvbench.engine.compiled import CompiledStep, bucketed_length, check_compilable
from kvbench.engine.decode import Decoder, Hooks, SequenceOutput, cache_argument, synchronize
from kvbench.engine.protocol import DecodingCache
from kvbench.engine.rope import model_rope
from kvbench.engine.sampling import sampling_probs
from kvbench.engine.settings import GenerationSettings, PaddedBatch
from kvbench.errors import KvbenchError
from kvbench.presses.base import Press

#: ``SequenceOutput``, ``cache_argument`` and ``sampling_probs`` are re-exported: callers import them from here.
__all__ = ["GenerationSettings", "Hooks", "SequenceOutput", "cache_argument", "generate", "generation", "run_to_end",
           "sampling_probs"]


@contextlib.contextmanager
def engine_mode(model):
    with torch.inference_mode(), use_kvbench_attention(model):
        yield


def generate(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], press: Press, budget: int | None,
    settings: GenerationSettings, *, detokenize: Callable[[list[int]], str] | None = None, pad_token_id: int = 0,
    seeds: Sequence[int] | None = None, forced_tokens: Sequence[Sequence[int]] | None = None,
    record_logits: bool = False, on_step: Callable[[DecodingCache, int], None] | None = None,
    measure_attention_loss: bool = False, on_logits: Callable[[int, torch.Tensor], None] | None = None,
    critical_positions: Sequence[Sequence[int]] | None = None, static_shapes: bool = False,
    keep_window_attention: bool | None = None, compile_backend: str | None = None,
) -> list[SequenceOutput]:
    """Generate for a batch of tokenised prompts under ``press`` at ``budget``: ``generation`` run to its end,
    with its ``Hooks`` given one by one."""
    hooks = Hooks(attention_loss=measure_attention_loss, critical_positions=critical_positions,
                  record_logits=record_logits, on_step=on_step, on_logits=on_logits)
    return run_to_end(generation(model, prompts, press, budget, settings, detokenize=detokenize,
                                 pad_token_id=pad_token_id, seeds=seeds, forced_tokens=forced_tokens, hooks=hooks,
                                 static_shapes=static_shapes, keep_window_attention=keep_window_attention,
                                 compile_backend=compile_backend))


def run_to_end(steps: Generator[int, None, list[SequenceOutput]]) -> list[SequenceOutput]:
    """Advance a ``generation`` to its end and return its outputs."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def generation(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], press: Press, budget: int | None,
    settings: GenerationSettings, *, detokenize: Callable[[list[int]], str] | None = None, pad_token_id: int = 0,
    seeds: Sequence[int] | None = None, forced_tokens: Sequence[Sequence[int]] | None = None,
    hooks: Hooks = Hooks(), static_shapes: bool = False, keep_window_attention: bool | None = None,
    compile_backend: str | None = None,
) -> Generator[int, None, list[SequenceOutput]]:
    """Generate for a batch of tokenised prompts under ``press`` at ``budget`` (None = no eviction).

    ``detokenize`` turns tokens into text (needed for stop strings and ``SequenceOutput.text``); ``seeds`` gives
    each sequence its own sampling and press seed (default: ``settings.seed`` for all); ``forced_tokens`` replays
    given outputs instead of choosing (teacher forcing: finish reason "forced" when a sequence's tokens run out).
    ``keep_window_attention`` keeps a query window's attention between steps (default: on CPU only; see
    ``kvbench.engine.window``). ``compile_backend`` (``kvbench.engine.compiled.BACKENDS``) runs every decoding
    step as one compiled graph (static shapes).

    A generator: it yields the step number after the prefill (0) and after every decoding forward, and returns
    the outputs, so that ``kvbench bench`` can time several generations side by side, step by step. Each stretch
    of work between two yields runs in its own context, so interleaved generations never see each other's
    inference mode or attention setting.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if settings.stop_strings and detokenize is None:
        raise ValueError("stop strings need a detokenize function")
    device = next(model.parameters()).device
    batch = left_pad(prompts, pad_token_id, device)
    seeds = list(seeds) if seeds is not None else [settings.seed] * len(prompts)
    max_length = batch.ids.shape[1] + settings.max_new_tokens
    if compile_backend is not None:  # one graph per step: static shapes, no host-kept window attention
        check_compilable(press, budget, hooks.attention_loss)
        static_shapes, keep_window_attention = True, False
        max_length = bucketed_length(max_length)
    cache = build_cache(model, press, budget, max_length, device, settings, seeds, hooks, static_shapes,
                        keep_window_attention)
    decoder = Decoder.for_batch(model, cache, batch, settings, hooks, seeds, forced_tokens, detokenize)
    if compile_backend is not None:
        decoder.step_graph = CompiledStep(model, cache, decoder.cache_kwarg, compile_backend)
    with engine_mode(model):
        decoder.prefill()
    yield 0
    for step in range(1, settings.max_new_tokens + 1):
        with engine_mode(model):
            finished = decoder.decode_one_token(step)
        if finished:
            break
        yield step
    synchronize(device)
    return decoder.outputs()



def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device) -> PaddedBatch:
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        valid[row, width - len(prompt):] = True
    positions = (valid.long().cumsum(dim=-1) - 1).clamp(min=0)
    return PaddedBatch(ids.to(device), valid.to(device), positions.to(device), lengths, pad_token_id)


def supported_text_config(model):
    """The decoder's configuration, once it is one kvbench can evict from (full attention, text only)."""
    if any(getattr(model.config, name, None) is not None for name in ("vision_config", "audio_config")):
        raise KvbenchError(f"{model.config.model_type}: multimodal models are not supported (kvbench runs text-only "
                           "decoders)")
    config = model.config.get_text_config(decoder=True)
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise KvbenchError(f"{config.model_type}: layers of type {sorted(layer_types - {'full_attention'})} are not "
                           "supported (kvbench evicts from full-attention caches only)")
    return config


def build_cache(model, press: Press, budget: int | None, max_length: int, device: torch.device,
                settings: GenerationSettings, seeds: list[int], hooks: Hooks, static_shapes: bool,
                keep_window_attention: bool | None) -> DecodingCache:
    """A ``ShadowCache`` for a sparse press, else a ``BudgetCache``, for sequences of ``max_length`` tokens (the
    padded prompts and the generation)."""
    config = supported_text_config(model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    try:
        press.check_model(config.num_hidden_layers, config.num_attention_heads,
                          getattr(config, "num_key_value_heads", None) or config.num_attention_heads, head_dim)
    except ValueError as err:
        raise KvbenchError(str(err)) from None
    if press.sparse:
        cache = _shadow_cache(model, press, budget, config.num_hidden_layers, max_length, len(seeds), device,
                              hooks.attention_loss or static_shapes)
    else:
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        keep_window = device.type == "cpu" if keep_window_attention is None else keep_window_attention
        cache = BudgetCache(press, budget, config.num_hidden_layers, kv_heads, max_length, seeds,
                            measure_attention_loss=hooks.attention_loss, max_new_tokens=settings.max_new_tokens,
                            static_shapes=static_shapes, keep_window_attention=keep_window)
        if press.reads_rope:
            cache.set_rope(model_rope(model, press.name, device))
    if hooks.critical_positions is not None:  # prompt positions -> padded batch positions are the same (explicit)
        cache.track_critical(hooks.critical_positions, settings.max_new_tokens, device)
    return cache


def _shadow_cache(model, press: Press, budget: int | None, num_layers: int, max_length: int, batch: int, device,
                  unsupported: bool):
    """ShadowKV's cache, which rebuilds keys with the model's own rotary embedding."""
    from kvbench.engine.shadow import ShadowCache

    if budget is None:
        raise KvbenchError(f"{press.name}: give a budget (tokens attended per step)")
    if unsupported:
        raise KvbenchError(f"{press.name}: attention-loss measurement and --static-shapes apply to evicting caches "
                           "only")
    return ShadowCache(press, budget, num_layers, max_length, model_rope(model, press.name, device), batch)
