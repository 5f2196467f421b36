"""SepLLM as a user runs it: separators found in each tokenizer, a cache that keeps only the separators it finds
(fewer than the budget) with the host's count read back, and its refusals.

The rule against the source itself: ``tests/reference/test_sepllm.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from kvbench.engine.generate import generate
from kvbench.engine.settings import GenerationSettings
from kvbench.errors import KvbenchError
from kvbench.models import build_tiny
from kvbench.presses import PressError, for_tokenizer, make_press
from kvbench.presses.sepllm import SOURCE_SEPARATORS
from tests.conftest import TEST_ARGS

TOKENIZERS = Path(__file__).parent / "fixtures" / "tokenizers"


@pytest.mark.parametrize("model", ["DeepSeek-R1-Distill-Qwen-7B", "Llama-3.1-Nemotron-Nano-8B-v1"])
def test_separators_are_the_sources_texts_in_each_tokenizer(model):
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / model)
    press = for_tokenizer(make_press("sepllm"), tokenizer)
    assert len(press.separator_ids) >= 8
    decoded = [tokenizer.decode([i]) for i in press.separator_ids]
    assert set(decoded) <= set(SOURCE_SEPARATORS) and {".", ",", "?", "!", ";", ":", "\n"} <= set(decoded)


def test_the_tiny_models_separators_are_the_suites():
    _, tokenizer = build_tiny("tiny-llama")
    assert make_press("sepllm").for_tokenizer(tokenizer).separators == TEST_ARGS["sepllm"]["separators"]


def _run(prompt: str, budget: int, args: dict, steps: int = 30):
    model, tokenizer = build_tiny("tiny-llama")
    press = for_tokenizer(make_press("sepllm", args), tokenizer)
    ids = tokenizer(prompt)["input_ids"]
    seen = []

    def record(cache, step):
        device_held = int(cache.valid[:, 0].sum(-1).amax())
        seen.append((cache.occupancy.held[0], device_held, cache.kept_positions(0)))

    (out,) = generate(model.eval(), [ids], press, budget, GenerationSettings(max_new_tokens=steps), on_step=record)
    return ids, out, seen, press


def test_it_keeps_only_the_separators_it_finds_and_the_host_knows_how_many():
    """No separator in the prompt: a compression keeps the initial and local tokens only, fewer than the budget's
    keep, and the host's count (what triggers the next compression) is the device's."""
    ids, out, seen, press = _run("abcdefghijklmnopqrstuvwxyzabcdefghij", 24,
                                 {"n_init": "2", "sep_cache_size": "5", "local_size": "8"})
    separators = set(press.separator_ids)
    assert not separators & set(ids)
    assert out.evicted_tokens > 0
    for host, device, kept in seen:
        assert host == device
        held = kept[0][0]
        assert all(positions == held for layer in kept for positions in layer)  # every layer and head alike
    after_prefill = seen[0][2][0][0]
    assert after_prefill == {0, 1, *range(len(ids) - 8, len(ids))}  # 2 initial + 8 local, no separator
    assert seen[0][0] == 10 < 2 + 5 + 8


def test_it_keeps_the_newest_separators_up_to_its_cache():
    prompt = "a.b,c?d!e;f:g.h,i?j!k;l:m.n,o?p"
    ids, _, seen, press = _run(prompt, 20, {"n_init": "2", "sep_cache_size": "3", "local_size": "6"}, steps=2)
    kept = seen[0][2][0][0]
    separators = [i for i, t in enumerate(ids) if t in press.separator_ids and 2 <= i < len(ids) - 6]
    assert kept == {0, 1, *separators[-3:], *range(len(ids) - 6, len(ids))}


def test_refusals_are_one_clear_error():
    with pytest.raises(PressError, match="separators must be 'auto' or token ids"):
        make_press("sepllm", {"separators": "13,dot"})
    with pytest.raises(KvbenchError, match="must exceed n_init"):
        make_press("sepllm").cadence(292)
    with pytest.raises(PressError, match="keeps only the entries it wants"):
        make_press("adakv:sepllm")
    model, tokenizer = build_tiny("tiny-llama")
    unresolved = make_press("sepllm", {"n_init": "1", "sep_cache_size": "2", "local_size": "4"})
    with pytest.raises(ValueError, match="separators=auto is resolved from the model's tokenizer"):
        generate(model.eval(), [tokenizer("a.b.c.d.e.f.g.h.i")["input_ids"]], unresolved, 8,
                 GenerationSettings(max_new_tokens=4))
