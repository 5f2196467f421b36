"""Decoding settings of the protocols: repetition penalty, top-k and top-p against transformers' own processors,
and generation with them against Hugging Face ``generate``; batched equals batch 1."""

import pytest
import torch
from transformers import DynamicCache
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kvbench.engine.generate import GenerationSettings, cache_argument, generate, sampling_probs
from kvbench.engine.loops import RepetitionStop
from kvbench.presses import make_press

from .conftest import prompt_ids


def test_sampling_distribution_equals_transformers_processors():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 300, generator=generator) * 3
    input_ids = torch.randint(0, 300, (3, 40), generator=generator)
    seen = torch.zeros(3, 300, dtype=torch.bool).scatter_(1, input_ids, True)
    for temperature, top_k, top_p, penalty in ((0.7, 50, 0.9, 1.2), (1.0, 0, 0.5, 1.0), (1.3, 7, 1.0, 0.8)):
        settings = GenerationSettings(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
        ours = sampling_probs(logits, settings, seen)
        scores = logits.clone()
        processors = [RepetitionPenaltyLogitsProcessor(penalty), TemperatureLogitsWarper(temperature)]
        processors += [TopKLogitsWarper(top_k)] if top_k else []
        processors += [TopPLogitsWarper(top_p)] if top_p < 1 else []
        for processor in processors:
            scores = processor(input_ids, scores)
        theirs = torch.softmax(scores, dim=-1)
        torch.testing.assert_close(ours / ours.sum(-1, keepdim=True), theirs, atol=1e-6, rtol=1e-5)


def test_greedy_with_repetition_penalty_equals_hf_generate(tiny_llama):
    model, tokenizer = tiny_llama
    ids = prompt_ids(tokenizer)
    settings = GenerationSettings(max_new_tokens=40, repetition_penalty=1.3, eos_token_ids=())
    (ours,) = generate(model, [ids], make_press("full"), None, settings)
    with torch.no_grad():
        theirs = model.generate(torch.tensor([ids]), max_new_tokens=40, min_new_tokens=40, do_sample=False,
                                repetition_penalty=1.3, **{cache_argument(model): DynamicCache(config=model.config)})
    assert ours.tokens == theirs[0, len(ids):].tolist()
    (plain,) = generate(model, [ids], make_press("full"), None, GenerationSettings(max_new_tokens=40))
    assert plain.tokens != ours.tokens  # the penalty changed the output


@pytest.mark.parametrize("press", ["full", "snapkv-d"])
def test_sampling_with_penalty_and_top_k_batched_equals_batch_one(tiny_llama, press):
    model, tokenizer = tiny_llama
    prompts = [prompt_ids(tokenizer, t) for t in ("Count: 1 2 3", "Name three colours.", "x" * 30)]
    settings = GenerationSettings(max_new_tokens=25, temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.2,
                                  seed=4)
    batched = generate(model, prompts, make_press(press), 24, settings, seeds=[4, 5, 6])
    single = [generate(model, [p], make_press(press), 24, settings, seeds=[s])[0] for p, s in zip(prompts, (4, 5, 6))]
    assert [o.tokens for o in batched] == [o.tokens for o in single]


def test_repetition_stop_ends_a_loop_at_the_forks_token(tiny_llama, monkeypatch):
    import kvbench.engine.decode as engine

    model, tokenizer = tiny_llama
    script = [3, 4, 5, 6, 7, 8] + [5, 9] * 40
    state = {"t": 0}

    def scripted(logits, settings, generators, seen=None):
        state["t"] += 1
        return torch.tensor([script[state["t"] - 1]])

    monkeypatch.setattr(engine, "next_tokens", scripted)
    settings = GenerationSettings(max_new_tokens=80, repetition_stop=RepetitionStop())
    (out,) = generate(model, [prompt_ids(tokenizer)], make_press("full"), None, settings)
    assert out.finish_reason == "repetition" and out.tokens == script[:16]  # "5 9" five times back to back
    state["t"] = 0
    (free,) = generate(model, [prompt_ids(tokenizer)], make_press("full"), None, GenerationSettings(max_new_tokens=80))
    assert free.finish_reason == "length" and len(free.tokens) == 80
