"""What every reference transcription uses: the same inputs for kvbench's press and the source's rule, and a
comparison of the sets of positions each keeps.

A transcription module (one per press, ``tests/reference/test_<press>.py``) cites its source at the top
(repository, commit, file, lines) and holds that source's rule in plain torch, written from reading the source,
as a *reference*: a function ``reference(forwards, budget) -> kept`` that simulates the source's own cache (its
order, its schedule, its state) over a stream of ``Forward``s and returns ``kept[t][layer][head]``, the set of
token positions its cache holds after forward ``t``. Two kinds of input:

- ``synthetic_forwards``: seeded keys, values and queries for every layer, a GQA group of 1, 2 or 7 query heads
  per KV head (``GROUPS``). ``run_cache`` feeds them through kvbench's ``BudgetCache`` as the decode loop does
  (``begin_step``, each layer's ``update`` and ``attend``, ``end_step``), so after the first eviction the
  positions held have gaps and the slots sit in shuffled physical order: every later compression scores such a
  cache.
- ``trace_model``: a greedy generation on a tiny model (``tiny_model``: llama-shaped, the same three GQA groups),
  recording each layer's post-RoPE keys, values and queries at every forward and kvbench's kept sets after it.
  The reference replays the recorded inputs.

``compare`` walks both histories forward by forward and stops at the first difference (after it, in situ, the
inputs themselves would differ); ``assert_identical`` fails with that difference. Set ``KVBENCH_REFERENCE_LOG``
to a file to append one JSON line per comparison (press, case, compressions compared, identical): the agreement
table of ``docs/fidelity.md`` is made from it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from unittest import mock

import torch

from kvbench.engine.cache import BudgetCache
from kvbench.engine.generate import GenerationSettings, generate
from kvbench.engine.layer import BudgetLayer
from kvbench.presses.base import Press

#: Query heads per KV head in the seeded and in-situ cases (1 = MHA; 7 = R1-Distill-Qwen-7B's grouping).
GROUPS = (1, 2, 7)
#: kept[t][layer][head]: the positions a cache holds after forward t.
Kept = list[list[list[set[int]]]]


@dataclass(frozen=True)
class Forward:
    """One forward's new tokens, every layer: what a cache and a press see of it (batch 1, post-RoPE)."""

    positions: torch.Tensor  # [n] long, increasing
    keys: torch.Tensor  # [layers, kv_heads, n, head_dim]
    values: torch.Tensor  # [layers, kv_heads, n, head_dim]
    queries: torch.Tensor  # [layers, query_heads, n, head_dim]
    scaling: float
    tokens: torch.Tensor | None = None  # [n] the token ids, for a press that reads them (SepLLM's separators)

    @property
    def layers(self) -> int:
        return self.keys.shape[0]

    @property
    def group(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1]


def synthetic_forwards(seed: int = 0, *, group: int = 2, prompt: int = 24, steps: int = 60, layers: int = 2,
                       kv_heads: int = 2, head_dim: int = 8, copies: float = 0.0) -> list[Forward]:
    """A prefill of ``prompt`` tokens, then ``steps`` one-token forwards, at positions 0, 1, 2, ... (a position
    is a token's index in its sequence, in kvbench as in every source; the positions a cache holds have gaps once
    it has evicted). Keys have varied norms; a fraction ``copies`` of the tokens repeat an earlier token's key in
    every layer and head (exact cosine 1 and exact norm ties)."""
    g = torch.Generator().manual_seed(seed)
    total = prompt + steps
    positions = torch.arange(total)
    keys = torch.randn(layers, kv_heads, total, head_dim, generator=g)
    keys = keys * (0.5 + torch.rand(layers, kv_heads, total, 1, generator=g))
    for i in range(1, total):
        if torch.rand((), generator=g) < copies:
            keys[:, :, i] = keys[:, :, int(torch.randint(0, i, (), generator=g))]
    values = torch.randn(layers, kv_heads, total, head_dim, generator=g)
    queries = torch.randn(layers, kv_heads * group, total, head_dim, generator=g) * 2.0
    scaling = head_dim**-0.5
    cuts = [(0, prompt)] + [(prompt + i, prompt + i + 1) for i in range(steps)]
    return [Forward(positions[a:b], keys[:, :, a:b], values[:, :, a:b], queries[:, :, a:b], scaling) for a, b in cuts]


def run_cache(press: Press, budget: int, forwards: Sequence[Forward], *, seed: int = 0,
              keep_window_attention: bool = True, rope=None) -> Kept:
    """kvbench's kept sets when ``forwards`` pass through a ``BudgetCache`` as the decode loop passes them.

    ``rope`` (positions [n] -> cos, sin [n, rotary dims]) is the RoPE a press with ``reads_rope`` undoes on the
    window's queries (the model's own, in a real run)."""
    first = forwards[0]
    n_tokens = sum(f.positions.numel() for f in forwards)
    cache = BudgetCache(press, budget, first.layers, first.keys.shape[1], n_tokens, [seed],
                        max_new_tokens=len(forwards), keep_window_attention=keep_window_attention)
    if rope is not None:
        cache.set_rope(rope)
    kept: Kept = []
    with torch.inference_mode():
        for step, forward in enumerate(forwards):
            n = forward.positions.numel()
            tokens = None if forward.tokens is None else forward.tokens[None]
            cache.begin_step(forward.positions[None], torch.ones(1, n, dtype=torch.bool), [n], step, tokens)
            for i, layer in enumerate(cache.layers):
                key, value = layer.update(forward.keys[i][None], forward.values[i][None])
                layer.attend(forward.queries[i][None], key, value, forward.scaling)
            cache.end_step()
            kept.append(cache.kept_positions(0))
    return kept


def tiny_model(group: int = 2, arch: str = "tiny-llama"):
    """The suite's seeded tiny model, with ``group`` query heads per KV head (two KV heads; one for group 7)."""
    from kvbench.models import build_tiny

    kv_heads = 1 if group == 7 else 2
    model, tokenizer = build_tiny(arch, num_attention_heads=kv_heads * group, num_key_value_heads=kv_heads,
                                  head_dim=16, hidden_size=16 * kv_heads * group)
    model.eval()
    return model, tokenizer


def trace_model(model, prompt: Sequence[int], press: Press, budget: int,
                max_new_tokens: int = 80) -> tuple[list[Forward], Kept]:
    """A greedy generation under ``press``: every forward's per-layer keys, values and queries as the cache got
    them, and kvbench's kept sets after each forward."""
    forwards: list[Forward] = []
    kept: Kept = []
    seen: dict[int, dict[str, torch.Tensor]] = {}
    update, attend = BudgetLayer.update, BudgetLayer.attend

    def recording_update(layer, key_states, value_states, *args, **kwargs):
        seen[layer.layer_idx] = {"keys": key_states[0].clone(), "values": value_states[0].clone()}
        return update(layer, key_states, value_states, *args, **kwargs)

    def recording_attend(layer, query, key, value, scaling):
        seen[layer.layer_idx]["queries"] = query[0].clone()
        seen[layer.layer_idx]["scaling"] = scaling
        return attend(layer, query, key, value, scaling)

    def on_step(cache, step):
        layers = [seen[i] for i in range(len(seen))]
        tokens = cache.step.token_ids
        forwards.append(Forward(cache.step.positions[0].clone(), torch.stack([s["keys"] for s in layers]),
                                torch.stack([s["values"] for s in layers]),
                                torch.stack([s["queries"] for s in layers]), layers[0]["scaling"],
                                None if tokens is None else tokens[0].clone()))
        kept.append(cache.kept_positions(0))
        seen.clear()

    with mock.patch.object(BudgetLayer, "update", recording_update), \
            mock.patch.object(BudgetLayer, "attend", recording_attend):
        generate(model, [list(prompt)], press, budget, GenerationSettings(max_new_tokens=max_new_tokens),
                 on_step=on_step)
    return forwards, kept


@dataclass
class Agreement:
    """How far two kept histories agree: compressions compared (forwards where either side dropped a position it
    held, or did not take in a new token), how many were identical in every layer and head, and the first
    difference."""

    forwards: int
    compressions: int
    identical: int
    first_difference: str | None

    def __str__(self) -> str:
        head = f"{self.identical}/{self.compressions} compressions identical over {self.forwards} forwards"
        return head if self.first_difference is None else f"{head}; first difference: {self.first_difference}"


def compare(kvbench: Kept, reference: Kept, forwards: Sequence[Forward]) -> Agreement:
    """Walk both histories until the first forward where some layer and head hold different positions."""
    compressions = identical = 0
    before_k = before_r = None
    for t, (mine, theirs) in enumerate(zip(kvbench, reference, strict=True)):
        new = set(forwards[t].positions.tolist())
        compressed = any(_dropped(before, now, new) for before, now in ((before_k, mine), (before_r, theirs)))
        compressions += compressed
        for layer, (heads_k, heads_r) in enumerate(zip(mine, theirs, strict=True)):
            for head, (a, b) in enumerate(zip(heads_k, heads_r, strict=True)):
                if a != b:
                    diff = (f"forward {t}, layer {layer}, head {head}: kvbench alone keeps {sorted(a - b)}, the "
                            f"reference alone {sorted(b - a)} (of {len(a)} and {len(b)})")
                    return Agreement(t + 1, compressions, identical, diff)
        identical += compressed
        before_k, before_r = mine, theirs
    return Agreement(len(kvbench), compressions, identical, None)


def _dropped(before: list[list[set[int]]] | None, now: list[list[set[int]]], new: set[int]) -> bool:
    if before is None:  # the prefill: a compression if some new token is not held
        return any(new - heads for layer in now for heads in layer)
    return any(b | new != n for lb, ln in zip(before, now) for b, n in zip(lb, ln))


def assert_identical(kvbench: Kept, reference: Kept, forwards: Sequence[Forward], press: str = "",
                     case: str = "", min_compressions: int = 1) -> Agreement:
    """Every kept set identical, over at least ``min_compressions`` compressions (so the rule was exercised)."""
    agreement = compare(kvbench, reference, forwards)
    log(press, case, agreement)
    assert agreement.first_difference is None, str(agreement)
    assert agreement.compressions >= min_compressions, f"only {agreement.compressions} compressions: {agreement}"
    return agreement


def log(press: str, case: str, agreement: Agreement) -> None:
    path = os.environ.get("KVBENCH_REFERENCE_LOG")
    if path and press:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"press": press, "case": case, "forwards": agreement.forwards,
                                  "compressions": agreement.compressions, "identical": agreement.identical,
                                  "first_difference": agreement.first_difference}) + "\n")
