"""A decoding step ready for a GPU, checked on the CPU: bfloat16, the real models' head geometry, the operators
one step launches, and shapes that never change once the cache is full."""

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kvbench.bench.opcount import hf_generate_step, kvbench_step
from kvbench.engine.generate import GenerationSettings, generate
from kvbench.models import build_tiny, byte_tokenizer
from kvbench.presses import make_press
from kvbench.presses.source_order import STATE
from kvbench.verify.invariants import bounded
from kvbench.verify.oracle import masked_logits, masks_from_kept
from kvbench.verify.outputs import batched, full_cache, masking
from kvbench.verify.subject import Subject
from tests.conftest import ALL_PRESSES, TEST_ARGS, default_press, prompt_ids

SHAPES = Path(__file__).parents[1] / "kvbench" / "shapes"


@pytest.fixture(scope="module")
def tiny_bf16():
    """Qwen2's shape (GQA, projection biases) in bfloat16; the float32 suite covers the five architectures."""
    model, tokenizer = build_tiny("tiny-qwen2")
    return model.to(torch.bfloat16).eval(), tokenizer


@pytest.mark.parametrize("press_name", [p for p in ALL_PRESSES if p != "shadowkv"])
def test_bf16_budget_at_least_length_equals_the_full_cache(tiny_bf16, press_name):
    """In bfloat16 too a budget no sequence reaches changes nothing: the same tokens as kvbench's full cache (HF's
    bf16 kernels round differently, so the fp32 suite compares with HF generate). ShadowKV is left out: it attends
    keys rebuilt from their SVD, exact at full rank in float32 only (in bf16 the rebuilt keys round)."""
    model, tokenizer = tiny_bf16
    prompt, settings = prompt_ids(tokenizer)[:40], GenerationSettings(max_new_tokens=40)
    ours = generate(model, [prompt], default_press(press_name), 80, settings)[0]
    full = generate(model, [prompt], make_press("full"), None, settings)[0]
    assert ours.evicted_tokens == 0 and ours.tokens == full.tokens


@pytest.mark.parametrize(("press_name", "args"), [("h2o", {}), ("snapkv-d", {}), ("rkv", {"buffer": "4"}),
                                                  ("adakv:snapkv-d", {}), ("scope", {"buffer": "4"})])
def test_bf16_cache_stays_within_its_bound(tiny_bf16, press_name, args):
    model, tokenizer = tiny_bf16
    outcome = bounded(Subject(model, tokenizer, lambda: make_press(press_name, args)), 10)
    assert outcome.status == "pass", outcome


def _deviation(model, prompt, press, budget, drop_sink=False):
    """Largest |logit| difference between a bf16 run and the masked forward of what it kept (bf16 too)."""
    kept = []
    out = generate(model, [prompt], press, budget, GenerationSettings(max_new_tokens=36), record_logits=True,
                   on_step=lambda cache, t: kept.append(cache.kept_positions(0)))[0]
    if drop_sink:  # the control: one attended entry masked that the engine kept
        for step in kept:
            step[0][0].discard(min(step[0][0]))
    tokens = prompt + out.tokens[:-1]
    cfg = model.config
    masks = masks_from_kept(kept, len(prompt), len(tokens), cfg.num_hidden_layers, cfg.num_key_value_heads)
    expected = masked_logits(model, tokens, masks)[len(prompt) - 1:]
    return float((torch.stack(out.logits) - expected).abs().max())


@pytest.mark.parametrize("press_name", ["h2o", "snapkv-d", "streaming_llm", "knorm", "tova"])
def test_bf16_eviction_equals_masking_within_bf16s_own_disagreement(tiny_bf16, press_name):
    """The tolerance is derived, not chosen: the engine's full cache (no eviction) and the oracle's masked forward
    are two bf16 computations of the same attention, and already disagree by ``baseline`` (about 5 bf16 ulps of
    logits near 6: 0.1-0.14 here). Eviction may add rounding of its own (a different number of slots summed) but
    no error of substance: its deviation stays within twice the baseline, where masking one entry the engine kept
    (the control) moves the logits far beyond it."""
    model, tokenizer = tiny_bf16
    prompt = prompt_ids(tokenizer)[:30]
    baseline = _deviation(model, prompt, make_press("full"), None)
    assert 0 < baseline < 0.25
    for budget in (12, 40):
        assert _deviation(model, prompt, make_press(press_name), budget) <= 2 * baseline
    assert _deviation(model, prompt, make_press(press_name), 12, drop_sink=True) > 4 * baseline


@pytest.mark.parametrize(("press_name", "args"), [("h2o", {}), ("snapkv-d", {}), ("tova", {}), ("rkv", {"buffer": "4"}),
                                                  ("adakv:snapkv-d", {})])
def test_scores_and_press_state_stay_float32_in_bf16(tiny_bf16, press_name, args):
    model, tokenizer = tiny_bf16
    press = make_press(press_name, args)
    seen = defaultdict(set)
    real_score = type(press).score

    def recording_score(self, view):
        scores = real_score(self, view)
        seen["scores"].add(scores.dtype)
        seen["attention"].add(view.attention(gqa="mean").dtype) if self.query_window else None
        seen["state"].update(t.dtype for t in view.state.values())
        return scores

    type(press).score = recording_score
    try:
        generate(model, [prompt_ids(tokenizer)[:30]], press, 12, GenerationSettings(max_new_tokens=30),
                 on_step=lambda cache, t: seen["cache state"].update(s.dtype for s in cache.state.values()))
    finally:
        type(press).score = real_score
    assert seen["scores"] == {torch.float32}
    assert seen["state"] <= {torch.float32} and seen["cache state"] <= {torch.float32}
    if press.query_window:
        assert seen["attention"] == {torch.float32}


def _real_geometry(alias: str):
    """Two layers of ``alias``'s attention as shipped (heads, KV heads, head dim 128), with small MLP and vocab."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = json.loads((SHAPES / f"{alias}.json").read_text())
    tokenizer = byte_tokenizer()
    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    config = AutoConfig.for_model(
        shape["model_type"], hidden_size=heads * 8, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=shape["hidden_size"] // heads,
        vocab_size=len(tokenizer), max_position_embeddings=4096, initializer_range=0.2, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval(), tokenizer


@pytest.mark.parametrize("alias", ["r1-qwen-7b", "llama-3.1-8b"])  # GQA 7:1 and 4:1, head dim 128
def test_oracles_hold_at_the_real_head_geometry(alias):
    model, tokenizer = _real_geometry(alias)
    assert model.config.head_dim == 128
    for press_name in ("h2o", "snapkv-d", "adakv:snapkv-d"):
        subject = Subject(model, tokenizer, lambda name=press_name: make_press(name))
        checks = (masking(subject, 12), batched(subject, 14)) + ((full_cache(subject),) if press_name == "h2o" else ())
        for outcome in checks:
            assert outcome.status == "pass", (press_name, outcome)


def test_a_decoding_step_launches_about_what_hf_generate_launches_and_never_more_as_it_goes(tiny_llama):
    """Operators per decoding step, counted by a dispatch mode (machine independent): the full cache within 10% of
    transformers' generate with its DynamicCache; one host synchronisation per step (the stopping check) for
    kvbench's presses (the paper's bug-compatible ones reproduce its code's host reads, and a press that keeps its
    source's cache order, rkv, or that chooses how many it keeps, sepllm and rlkv, reads the entries held once per
    compression); the count does not depend on the batch and, once the cache is full, does not grow with the
    generated length (sepllm with no separator cache, so that its compressions come every other step)."""
    model, tokenizer = tiny_llama
    prompt = prompt_ids(tokenizer)[:30]
    reference = hf_generate_step(model, [prompt])
    full = kvbench_step(model, [prompt], make_press("full"), None)
    assert abs(full.ops - reference.ops) <= 0.1 * reference.ops and full.syncs == 1 and full.growth == 0
    for press_name in ALL_PRESSES:
        fixed = {"rpc": {"schedule": "budget"},
                 "sepllm": {"sep_cache_size": "0", "local_size": "14"}}.get(press_name, {})
        press = make_press(press_name, {**TEST_ARGS.get(press_name, {}), **fixed})
        one = kvbench_step(model, [prompt], press, 16)
        assert one.growth == 0, (press_name, one)
        reads_back = (STATE in press.state_names or press.keeps_fewer) and one.syncs <= 2
        assert one.syncs == 1 or press_name.startswith("hott-") or press.sparse or reads_back, (press_name, one)
        if press_name in ("snapkv-d", "h2o", "adakv:snapkv-d"):
            assert kvbench_step(model, [prompt] * 4, press, 16) == one, press_name


class _ShapeLog(TorchDispatchMode):
    """Every operator's name and output shapes, per decoding step."""

    def __init__(self):
        super().__init__()
        self.steps: list[list] = [[]]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = tuple(tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else (out,))
                       if isinstance(t, torch.Tensor))
        self.steps[-1].append((func.overloadpacket.__name__, shapes))
        return out


def _shapes_per_step(model, prompt, press, budget, static):
    log = _ShapeLog()
    with log:
        out = generate(model, [prompt], press, budget, GenerationSettings(max_new_tokens=48), static_shapes=static,
                       on_step=lambda cache, t: log.steps.append([]))[0]
    return out.tokens, log.steps


@pytest.mark.parametrize(("press_name", "budget"), [("full", None), ("h2o", 16), ("snapkv-d", 16),
                                                     ("streaming_llm", 16), ("knorm", 16)])
def test_static_shapes_repeat_every_step_and_change_no_output(tiny_llama, press_name, budget):
    """With static shapes every decoding step, once the cache is full, runs the same operators on the same shapes
    (what a CUDA graph captures), and generates what the dynamic path generates."""
    model, tokenizer = tiny_llama
    prompt = prompt_ids(tokenizer)[:30]
    static_tokens, steps = _shapes_per_step(model, prompt, make_press(press_name), budget, static=True)
    dynamic_tokens, dynamic_steps = _shapes_per_step(model, prompt, make_press(press_name), budget, static=False)
    assert static_tokens == dynamic_tokens
    decoding = steps[20:-1]  # steps 20..47: the cache is full (16 + buffer) for every press
    assert all(step == decoding[0] for step in decoding)
    if press_name == "full":  # the control: without static shapes the full cache's steps grow
        assert dynamic_steps[20] != dynamic_steps[21]
