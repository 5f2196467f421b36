"""Loops (detector, flag, --stop-on-loop) and the cost metrics (KV footprint over time, per correct answer)."""

import random

import pytest
import torch

from kvbench.engine.generate import GenerationSettings, generate
from kvbench.engine.loops import LoopDetector
from kvbench.presses import make_press
from tests.conftest import prompt_ids

DETECT = LoopDetector()


@pytest.mark.parametrize(("tokens", "period"), [
    ([7] * 40, 1),
    ([1, 2, 3] * 11, 3),
    ([5, 9] + [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 4, 10),
    ([1, 2, 3] * 9, None),  # 27 tokens: too short to call a loop
    ([1, 2] * 30 + [3], None),  # the repetition must reach the end
    (random.Random(0).choices(range(300), k=400), None),
])
def test_detector_on_token_lists(tokens, period):
    assert DETECT.period(tokens) == period


def test_detector_on_texts(tiny_llama):
    _, tokenizer = tiny_llama
    repetitive = "Let me check again. " + "The answer is 5, so the answer is 5. " * 6
    normal = ("Tom starts with 12 apples. He buys 7 more, so he has 19. He gives 5 to Ann, which leaves 14. "
              "Therefore Tom has 14 apples now, and the answer is 14.")
    assert DETECT.looped(tokenizer(repetitive)["input_ids"])
    assert not DETECT.looped(tokenizer(normal)["input_ids"])


def force_cycle(model):
    """Make every next token 100 + (last token mod 3): the output is a period-3 loop from the start."""
    def hook(module, args, kwargs, output):
        last = kwargs["input_ids"][:, -1]
        forced = torch.full_like(output.logits[:, -1], -1e4)
        forced[torch.arange(len(last)), 100 + last % 3] = 0.0
        output.logits[:, -1] = forced
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


def test_stop_on_loop_ends_generation_early(tiny_llama):
    model, tokenizer = tiny_llama
    prompt = prompt_ids(tokenizer)[:30]
    handle = force_cycle(model)
    try:
        free = generate(model, [prompt], make_press("h2o"), 16, GenerationSettings(max_new_tokens=60))[0]
        capped = generate(model, [prompt], make_press("h2o"), 16,
                          GenerationSettings(max_new_tokens=60, stop_on_loop=True))[0]
    finally:
        handle.remove()
    assert free.looped and free.loop_start == 32 and free.finish_reason == "length" and free.output_tokens == 60
    assert capped.looped and capped.finish_reason == "loop" and capped.output_tokens == 32
    assert capped.tokens == free.tokens[:32]


def test_kv_footprint_is_the_sum_of_held_bytes_over_steps(tiny_llama):
    model, tokenizer = tiny_llama
    prompt = prompt_ids(tokenizer)[:30]
    per_entry = 3 * 2 * (16 + 16) * 4  # layers x KV heads x (key + value dims) x fp32
    settings = GenerationSettings(max_new_tokens=40)
    full = generate(model, [prompt], make_press("full"), None, settings)[0]
    evicting = generate(model, [prompt], make_press("h2o"), 16, settings)[0]
    steps = 39  # decode forwards after the prefill
    assert full.kv_byte_steps == sum(30 + t for t in range(1, steps + 1)) * per_entry
    assert evicting.kv_byte_steps == steps * 16 * per_entry  # held after each step's eviction
    assert not full.looped and full.loop_start is None


def test_cost_and_length_metrics_in_reports(tmp_path):
    from kvbench.results.report import aggregate, load
    from tests.synthetic_store import build

    df = load(build(tmp_path / "s"))

    def cell(metric, press, dataset, budget):
        long = aggregate(df, metric)
        chosen = long[(long.press_label == press) & (long.dataset_label == dataset)]
        chosen = chosen[chosen.budget.isna()] if budget is None else chosen[chosen.budget == budget]
        return chosen["mean"].item()

    # output tokens 100, 110, 120, 130 in every cell
    assert cell("tokens_per_correct", "full", "gsm8k", None) == 115  # 460 tokens / 4 correct
    assert cell("tokens_per_correct", "h2o", "gsm8k", 64) == 230  # 460 / 2
    assert cell("seconds_per_correct", "h2o", "gsm8k", 64) == pytest.approx(4 * 1.1 / 2)
    assert cell("median_output_tokens", "snapkv-d", "folio", 128) == 115
    assert cell("length_ratio", "h2o", "folio", 64) == 1.0
    assert pd_isnan(cell("tokens_per_correct", "snapkv-d", "folio", 64))  # no correct answer: undefined


def pd_isnan(value):
    return value != value
