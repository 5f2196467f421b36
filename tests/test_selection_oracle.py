"""Selection equals masking: Quest keeps every entry, and each decoding step's logits equal an independent forward in
which each query head sees exactly the positions the press selected for it (the engine's attention does the rest)."""

from unittest import mock

import pytest
import torch

from kvbench.engine.generate import GenerationSettings, generate
from kvbench.models import build_tiny
from kvbench.presses import make_press
from kvbench.verify.oracle import masked_logits
from tests.conftest import ARCHS, prompt_ids

TOLERANCE = 1e-4


def _recorded_selections(model, prompt, press, budget, n_new):
    """The engine's logits, and per decoding forward and layer the positions [H_q, positions] each query head
    attended (None: every position, a dense layer)."""
    seen: list[dict] = []
    real = type(press).select

    def recording(self, queries, keys, positions, valid, budget, layer_idx):
        chosen = real(self, queries, keys, positions, valid, budget, layer_idx)
        if layer_idx == 0:
            seen.append({})
        if chosen is not None:
            b, h, g, s = chosen.shape
            heads = [set(positions[0, kv][chosen[0, kv, j]].tolist()) for kv in range(h) for j in range(g)]
            seen[-1][layer_idx] = heads
        return chosen

    with mock.patch.object(type(press), "select", recording):
        out = generate(model, [prompt], press, budget, GenerationSettings(max_new_tokens=n_new),
                       record_logits=True)[0]
    return out, seen


def _masks(seen, prompt_len, total, layers, query_heads):
    masks = {}
    for layer in range(layers):
        m = torch.ones(query_heads, total, total, dtype=torch.bool).tril()
        for step, chosen in enumerate(seen):
            q = prompt_len + step  # decoding forward step + 1 reads the token at this position
            if layer in chosen:
                m[:, q] = False
                for head, positions in enumerate(chosen[layer]):
                    m[head, q, sorted(positions)] = True
        masks[layer] = m
    return masks


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("budget", [8, 16])
def test_quest_selection_equals_masking(arch, budget):
    model, tokenizer = build_tiny(arch)
    model.eval()
    prompt = prompt_ids(tokenizer)[:30]
    press = make_press("quest", {"chunk_size": "4", "dense_layers": "1"})
    out, seen = _recorded_selections(model, prompt, press, budget, 24)
    assert out.evicted_tokens == 0 and len(seen) == len(out.tokens) - 1
    layers, query_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    assert 0 not in seen[0] and set(seen[0]) == set(range(1, layers))  # layer 0 dense, the others selected
    held = [len(prompt) + step + 1 for step in range(len(seen))]
    assert all(len(p) < n for step, n in zip(seen, held) for heads in step.values() for p in heads)  # a selection
    tokens = prompt + out.tokens[:-1]
    expected = masked_logits(model, tokens, _masks(seen, len(prompt), len(tokens), layers, query_heads))
    ours = torch.stack(out.logits)
    assert ours.shape == expected[len(prompt) - 1:].shape
    deviation = (ours - expected[len(prompt) - 1:]).abs()
    assert float(deviation.max()) < TOLERANCE * (1 + float(expected.abs().max()))


def test_the_oracle_fails_when_a_selection_is_misrecorded():
    """Control: drop one selected position of one head at one step from the masks, and the logits part."""
    model, tokenizer = build_tiny("tiny-llama")
    model.eval()
    prompt = prompt_ids(tokenizer)[:30]
    press = make_press("quest", {"chunk_size": "4", "dense_layers": "1"})
    out, seen = _recorded_selections(model, prompt, press, 8, 12)
    layer = max(seen[0])
    seen[0][layer][0] = set(sorted(seen[0][layer][0])[1:])
    tokens = prompt + out.tokens[:-1]
    expected = masked_logits(model, tokens, _masks(seen, len(prompt), len(tokens), model.config.num_hidden_layers,
                                                   model.config.num_attention_heads))
    assert float((torch.stack(out.logits) - expected[len(prompt) - 1:]).abs().max()) > 1e-3
