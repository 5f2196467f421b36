"""The window attention kept between decoding steps equals the one recomputed from the window's queries."""

from dataclasses import dataclass, field

import pytest
import torch

from kvbench.engine.attention import attention_probs
from kvbench.engine.generate import GenerationSettings, generate
from kvbench.presses import make_press
from kvbench.presses.snapkv_d import SnapKVDecodingPress
from tests.conftest import prompt_ids

WINDOW_PRESSES = [("snapkv-d", None), ("snapkv-d", {"gqa": "max", "window_size": "4"}), ("tova", None),
                  ("rkv", {"buffer": "4"})]


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


def test_cache_keeps_window_attention_only_when_asked(tiny_llama):
    model, tokenizer = tiny_llama
    caches = {}
    for keep in (False, True):
        generate(model, [prompt_ids(tokenizer)[:20]], make_press("snapkv-d"), 16, GenerationSettings(max_new_tokens=4),
                 keep_window_attention=keep, on_step=lambda cache, t, keep=keep: caches.setdefault(keep, cache))
    assert caches[False].kept_window is None
    weights = caches[True].kept_window.weights
    assert weights is not None and weights.dtype == torch.float32
