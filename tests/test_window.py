"""The window attention kept between decoding steps equals the one recomputed from the window's queries."""

from dataclasses import dataclass, field

import pytest
import torch

from kvbench.engine.generate import GenerationSettings, generate
from kvbench.engine.scores import attention_probs
from kvbench.presses import make_press
from kvbench.presses.snapkv_d import SnapKVDecodingPress
from tests.conftest import prompt_ids

# Presses whose compressions come more often than once per query window (the kept attention's condition).
WINDOW_PRESSES = [("snapkv-d", None), ("snapkv-d", {"gqa": "max", "window_size": "4"}), ("rkv", {"buffer": "4"}),
                  ("rpc", {"schedule": "budget", "buffer": "3", "window_size": "6"})]


@dataclass
class CheckedSnapKV(SnapKVDecodingPress):
    """SnapKV-D that, at every eviction, also recomputes the window attention and records the largest gap."""

    gaps: list = field(default_factory=list)

    def score(self, view):
        if view.attention_override is not None:
            w = view.window
            recomputed = attention_probs(w.queries, w.positions, w.valid, view.keys, view.positions, view.valid,
                                         w.scaling, reduce="mean", gqa=self.gqa)
            kept = view.attention(gqa=self.gqa)
            self.gaps.append((kept - recomputed).abs().max().item())
        return super().score(view)


def prompts_and_settings(tokenizer):
    ids = prompt_ids(tokenizer)
    return [ids[:31], ids[5:14], ids[:22], ids[3:7]], GenerationSettings(max_new_tokens=40, seed=3)


@pytest.mark.parametrize("gqa", ["mean", "max"])
def test_kept_window_attention_equals_recomputed_at_every_eviction(tiny, gqa):
    model, tokenizer = tiny
    prompts, settings = prompts_and_settings(tokenizer)
    press = CheckedSnapKV(window_size=6, gqa=gqa)
    generate(model, prompts, press, 16, settings, keep_window_attention=True)
    assert len(press.gaps) > 30  # the kept path ran at (nearly) every decoding step
    assert max(press.gaps) < 1e-6


@pytest.mark.parametrize(("press_name", "args"), WINDOW_PRESSES)
@pytest.mark.parametrize("budget", [14, 28])
def test_kept_window_evicts_what_recomputing_evicts(tiny, press_name, args, budget):
    """Same tokens, same evictions, same slots held, with frozen (finished) rows beside running ones."""
    model, tokenizer = tiny
    prompts, settings = prompts_and_settings(tokenizer)
    free = generate(model, prompts, make_press(press_name, args), budget, settings, keep_window_attention=False)
    eos = next(t for t in free[1].tokens[5:] if any(t not in o.tokens for o in free))
    settings = GenerationSettings(max_new_tokens=40, seed=3, eos_token_ids=(eos,))
    held = {}

    def run(keep):
        held[keep] = []
        return generate(model, prompts, make_press(press_name, args), budget, settings, keep_window_attention=keep,
                        on_step=lambda cache, t: held[keep].append(
                            [cache.kept_positions(row) for row in range(len(prompts))]))

    recomputed, kept = run(False), run(True)
    assert any(o.finish_reason == "eos" for o in kept) and any(o.finish_reason == "length" for o in kept)
    assert [o.tokens for o in kept] == [o.tokens for o in recomputed]
    assert [o.evicted_tokens for o in kept] == [o.evicted_tokens for o in recomputed]
    assert sum(o.evicted_tokens for o in kept) > 0
    assert held[True] == held[False]


def test_cache_keeps_window_attention_only_when_asked_and_worth_it(tiny_llama):
    """Kept only when asked and when compressions come more often than once per window (buffer < window)."""
    model, tokenizer = tiny_llama
    caches = {}
    cases = {"off": ("snapkv-d", None, False), "on": ("snapkv-d", None, True),
             "rare": ("rkv", {"buffer": "8", "window_size": "8"}), "tova": ("tova", None)}
    for case, (name, args, *keep) in cases.items():
        generate(model, [prompt_ids(tokenizer)[:20]], make_press(name, args), 16, GenerationSettings(max_new_tokens=4),
                 keep_window_attention=keep[0] if keep else True,
                 on_step=lambda cache, t, case=case: caches.setdefault(case, cache))
    assert caches["off"].kept_window is None
    assert caches["rare"].kept_window is None and caches["tova"].kept_window is None  # window 1, buffer 1
    weights = caches["on"].kept_window.weights
    assert weights is not None and weights.dtype == torch.float32


@pytest.mark.parametrize("gqa", ["mean", "max"])
def test_attention_probs_chunked_over_rows_equals_one_chunk(monkeypatch, gqa):
    """The score tensor's bound over rows (for large GPU batches) does not change the attention."""
    from kvbench.engine import scores as attention

    generator = torch.Generator().manual_seed(0)
    rows, hq, h, w, s, d = 7, 4, 2, 5, 11, 8
    query = torch.randn(rows, hq, w, d, generator=generator)
    query_positions = torch.arange(s - w, s).repeat(rows, 1)
    query_valid = torch.rand(rows, w, generator=generator) > 0.2
    keys = torch.randn(rows, h, s, d, generator=generator)
    key_positions = torch.stack([torch.randperm(s, generator=generator) for _ in range(rows * h)]).view(rows, h, s)
    key_valid = torch.rand(rows, h, s, generator=generator) > 0.2
    args = (query, query_positions, query_valid, keys, key_positions, key_valid, 0.35)
    whole = attention.attention_probs(*args, reduce="mean", gqa=gqa)
    monkeypatch.setattr(attention, "_SCORE_ELEMENTS", hq * w * s * 2)  # two rows per chunk: 4 chunks
    chunked = attention.attention_probs(*args, reduce="mean", gqa=gqa)
    assert torch.allclose(chunked, whole, atol=1e-7) and whole.abs().sum() > 0
