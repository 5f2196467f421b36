"""Choosing the next token: greedy or seeded sampling after transformers' logits processors, in their order."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvbench.engine.settings import GenerationSettings


def next_tokens(logits: torch.Tensor, settings: GenerationSettings, generators: list[torch.Generator],
                seen: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy or seeded sampling from ``sampling_probs``; greedy takes the argmax after the repetition penalty."""
    if settings.temperature <= 0:
        return penalised(logits.float(), settings, seen).argmax(dim=-1)
    probs = sampling_probs(logits, settings, seen)
    # One generator per sequence, so a sequence samples the same tokens whatever batch it is in.
    return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generators)])


def penalised(logits: torch.Tensor, settings: GenerationSettings, seen: torch.Tensor | None) -> torch.Tensor:
    """transformers' repetition penalty over ``seen`` ([B, V] bool): positive logits divided, negative multiplied."""
    if seen is None or settings.repetition_penalty == 1.0:
        return logits
    penalty = settings.repetition_penalty
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def sampling_probs(logits: torch.Tensor, settings: GenerationSettings, seen: torch.Tensor | None = None):
    """[B, V] the distribution sampled from, after transformers' processors in their order: repetition penalty
    (over ``seen``, [B, V] bool: the tokens already in each row), temperature, top-k, top-p."""
    logits = penalised(logits.float(), settings, seen) / settings.temperature
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


def seen_tokens(ids: torch.Tensor, valid: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, V]: the tokens of each row's prompt (padding excluded)."""
    seen = torch.zeros(ids.shape[0], vocab, dtype=torch.bool, device=ids.device)
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
    seen[rows[valid], ids[valid]] = True
    return seen
