"""Head gates by DuoAttention's optimisation (``kvbench calibrate -p rlkv``): its streaming mask, its two-way
forward, its passkey samples and its optimisation, each against an independent computation.

Source: Kurt232/RLKV @ 6dadf85 (DuoAttention's training as RLKV's repository runs it):
``base/patch/streaming_attn.py`` 15-24 (``generate_streaming_mask``), ``base/patch/llama.py`` 31-135 (the two-way
forward: the mixed copy's attention is ``α·`` the first copy's plus ``(1 − α)·`` its own streaming attention),
``base/duo_attn/data.py`` 18-290 (``MultiplePasskeyRetrievalDataset``), ``base/duo_attn/train.py`` 66-160, 340-350
(the loss, the clamp, AdamW and its schedule).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from kvbench.cli import app
from kvbench.engine.generate import generate
from kvbench.engine.settings import GenerationSettings
from kvbench.models import build_tiny
from kvbench.presses import make_press
from kvbench.runs.calibrate import SAMPLE_TEXT
from kvbench.runs.duo_gates import GateTraining, mixed_attention, passkey_sample, streaming_mask, train_gates
from tests.conftest import prompt_ids

SMALL = GateTraining(sink=2, recent=6, steps=12, context_min=40, context_max=80, passkeys=2, passkey_length=3)


@pytest.mark.parametrize(("length", "sink", "recent"), [(16, 2, 4), (9, 0, 1), (24, 4, 30), (8, 8, 2)])
def test_streaming_mask_is_duoattentions(length, sink, recent):
    """``generate_streaming_mask`` as written (triangular masks; its rounding to a multiple of 8 cut back)."""
    size = (length + 7) // 8 * 8
    ones = torch.ones(size, size, dtype=torch.bool)
    causal = ~torch.triu(ones, diagonal=1)
    recent_mask = torch.triu(ones, diagonal=-recent + 1)
    sink_mask = ones.clone()
    sink_mask[:, sink:] = False
    source = ((recent_mask | sink_mask) & causal)[:length, :length]
    assert torch.equal(streaming_mask(length, sink, recent, "cpu"), source)


def _hidden(model, ids, gates, sink=2, recent=6):
    with mixed_attention(model, gates, sink, recent):
        return model.model(input_ids=torch.tensor([ids, ids])).last_hidden_state


def _streaming_only(model, ids, sink=2, recent=6):
    """A plain forward whose every attention is streaming: the mixed copy at α = 0, computed independently."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attend(module, query, key, value, attention_mask, scaling=None, **kwargs):
        mask = streaming_mask(query.shape[2], sink, recent, query.device)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("test-streaming", attend)
    AttentionMaskInterface.register("test-streaming", sdpa_mask)
    previous, model.config._attn_implementation = model.config._attn_implementation, "test-streaming"
    try:
        return model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    finally:
        model.config._attn_implementation = previous


def test_the_two_way_forward_mixes_as_duoattention_does():
    model, tokenizer = build_tiny("tiny-llama")
    model.eval()
    ids = prompt_ids(tokenizer)[:30]
    plain = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    with torch.no_grad():
        ones = _hidden(model, ids, torch.ones(3, 2))
        zeros = _hidden(model, ids, torch.zeros(3, 2))
    torch.testing.assert_close(ones[0], plain, atol=1e-5, rtol=1e-5)  # the first copy is the model itself
    torch.testing.assert_close(ones[1], plain, atol=1e-5, rtol=1e-5)  # α = 1: the first copy's attention
    torch.testing.assert_close(zeros[1], _streaming_only(model, ids), atol=1e-5, rtol=1e-5)  # α = 0: streaming
    assert (zeros[1] - plain).abs().max() > 1e-2


def test_between_the_mixed_copy_reads_the_first_copys_attention():
    """At α = 0.5 the mixed copy's attention is half the *first* copy's attention output (the model's own
    trajectory, captured in a separate forward) and half its own streaming attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    model, tokenizer = build_tiny("tiny-llama")
    model.eval()
    ids = prompt_ids(tokenizer)[:30]
    captured = {}

    def record(module, query, key, value, attention_mask, scaling=None, **kwargs):
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        captured[module.layer_idx] = out
        return out.transpose(1, 2).contiguous(), None

    def half_and_half(module, query, key, value, attention_mask, scaling=None, **kwargs):
        mask = streaming_mask(query.shape[2], 2, 6, query.device)
        own = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
        return (0.5 * own + 0.5 * captured[module.layer_idx]).transpose(1, 2).contiguous(), None

    reference = None
    for name, function in (("test-record", record), ("test-half", half_and_half)):
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, sdpa_mask)
        previous, model.config._attn_implementation = model.config._attn_implementation, name
        with torch.no_grad():
            reference = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        model.config._attn_implementation = previous
    with torch.no_grad():
        mixed = _hidden(model, ids, torch.full((3, 2), 0.5))
    torch.testing.assert_close(mixed[1], reference, atol=1e-5, rtol=1e-5)


def test_a_passkey_sample_follows_duoattentions_template():
    _, tokenizer = build_tiny("tiny-llama")
    haystack = tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    ids, labels = passkey_sample(tokenizer, haystack, 60, SMALL, random.Random(3))
    text = tokenizer.decode(ids)
    assert text.count("passkey to the vault: ") == 2 and "This is a very long story book: <book> " in text
    first = labels.index(next(x for x in labels if x != -100))
    assert all(x == -100 for x in labels[:first]) and labels[first:] == ids[first:]  # every QA token, no other
    answered = tokenizer.decode(ids[first:])
    assert answered.startswith("Based on the content of the book, what is the first passkey to the vault?\nPasskey:")
    needles = [text.split("it's the first passkey to the vault: ")[1].split("\n\n")[0],
               text.split("it's the second passkey to the vault: ")[1].split("\n\n")[0]]
    for needle in needles:
        assert len(needle.split()) == 3 and needle in answered


def test_the_optimisation_lowers_unneeded_gates_within_bounds_and_is_seeded():
    model, tokenizer = build_tiny("tiny-llama")
    gates, losses = train_gates(model.eval(), tokenizer, SAMPLE_TEXT, SMALL)
    again, _ = train_gates(model, tokenizer, SAMPLE_TEXT, SMALL)
    assert torch.equal(gates, again)
    assert gates.shape == (3, 2) and float(gates.min()) >= 0 and float(gates.max()) <= 1
    assert float(gates.max()) < 1  # the L1 penalty moves every gate off its initial 1
    assert losses[0] == pytest.approx(SMALL.reg_weight)  # at α = 1 the two copies agree: the penalty alone
    assert all(torch.isfinite(torch.tensor(losses)))


def test_calibrate_writes_gates_that_rlkv_runs_with(tmp_path):
    text = tmp_path / "haystack.txt"
    text.write_text(SAMPLE_TEXT)
    out = tmp_path / "gates.tsv"
    result = CliRunner().invoke(app, ["calibrate", "-p", "rlkv", "-m", "tiny-llama", "--text", str(text), "--out",
                                      str(out), "--steps", "6", "--sink", "2", "--recent", "6", "--context-min",
                                      "40", "--context-max", "80", "--passkeys", "2", "--passkey-length", "3"])
    assert result.exit_code == 0, result.output
    assert "gates of 3 layers x 2 KV heads" in result.output
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(len(row) == 2 for row in rows)
    model, tokenizer = build_tiny("tiny-llama")
    press = make_press("rlkv", {"gates": str(out), "n_sink": "2"})
    (run,) = generate(model.eval(), [prompt_ids(tokenizer)[:20]], press, 8, GenerationSettings(max_new_tokens=6))
    assert run.evicted_tokens > 0
