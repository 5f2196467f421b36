"""Engine correctness on tiny seeded models: equivalence with the full cache and HF generate, and invariants."""

import dataclasses

import pytest
import torch

from kvbench.engine.generate import GenerationSettings, generate
from kvbench.presses import make_press
from kvbench.verify.outputs import full_cache
from kvbench.verify.subject import Subject
from tests.conftest import ALL_PRESSES, default_press, prompt_ids

N_NEW = 40


@pytest.mark.parametrize("press_name", ALL_PRESSES)
def test_budget_at_least_length_equals_full_and_hf_generate(tiny, press_name):
    """`kvbench verify`'s full-cache check: a budget no sequence reaches evicts nothing and changes nothing."""
    model, tokenizer = tiny
    outcome = full_cache(Subject(model, tokenizer, lambda: default_press(press_name)))
    assert outcome.status == "pass", outcome


def test_small_budget_changes_output(tiny):
    """The equivalence above is not vacuous: a small budget does change the generated tokens."""
    model, tokenizer = tiny
    prompt = prompt_ids(tokenizer)[:40]
    settings = GenerationSettings(max_new_tokens=N_NEW)
    full = generate(model, [prompt], make_press("full"), None, settings)[0]
    small = generate(model, [prompt], make_press("streaming_llm"), 8, settings)[0]
    assert small.tokens != full.tokens


CAPACITY_CASES = [("h2o", {}), ("snapkv-d", {}), ("rkv", {"buffer": "5"}), ("streaming_llm", {"buffer": "3"}),
                  ("knorm", {}), ("tova", {}), ("random", {}), ("scope", {"buffer": "4"})]


@pytest.mark.parametrize(("press_name", "args"), CAPACITY_CASES)
@pytest.mark.parametrize("budget", [10, 50])
def test_physical_cache_never_exceeds_budget_plus_buffer(tiny_llama, press_name, args, budget):
    model, tokenizer = tiny_llama
    press = make_press(press_name, args)
    seen = []

    def check(cache, step):
        for layer in cache.layers:
            assert layer.keys.shape[2] <= budget + press.buffer
            held = int(layer.valid.sum(dim=-1).max())
            # After a step's compression at most `budget`; between compressions at most budget + buffer - 1.
            assert held <= budget + press.buffer - 1
            seen.append(held)

    out = generate(model, [prompt_ids(tokenizer)[:30]], press, budget, GenerationSettings(max_new_tokens=60),
                   on_step=check)[0]
    assert out.evicted_tokens > 0
    assert out.peak_kv_bytes == (budget + press.buffer) * 3 * 2 * (16 + 16) * 4  # layers x heads x (k+v) x fp32


PROTECTION_CASES = [
    ("streaming_llm", {"n_sink": "4"}, lambda t: set(range(4)) | {t}),
    ("snapkv-d", {"window_size": "6"}, lambda t: set(range(t - 5, t + 1))),
    ("h2o", {"recent_ratio": "0.5"}, lambda t: set(range(t - 9, t + 1))),  # budget 20 -> 10 recent
    ("knorm", {"n_sink": "2", "recent_window": "3"}, lambda t: {0, 1} | set(range(t - 2, t + 1))),
    ("rkv", {"buffer": "4", "window_size": "5"}, lambda t: set(range(t - 4, t + 1))),
]


@pytest.mark.parametrize(("press_name", "args", "protected"), PROTECTION_CASES)
def test_protected_tokens_always_present(tiny_llama, press_name, args, protected):
    model, tokenizer = tiny_llama
    prompt = prompt_ids(tokenizer)[:30]
    checked = []

    def check(cache, step):
        newest = int(cache.query_position[0])
        for layer_kept in cache.kept_positions(0):
            for head_kept in layer_kept:
                assert protected(newest) <= head_kept, (step, newest, sorted(head_kept))
        checked.append(step)

    generate(model, [prompt], make_press(press_name, args), 20, GenerationSettings(max_new_tokens=40), on_step=check)
    assert len(checked) == 40


@dataclasses.dataclass
class PermutedInLayer:
    """Wraps a press; in one layer, its scores are reversed (a permutation of the slots' scores)."""

    inner: object
    layer: int

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def score(self, view):
        scores = self.inner.score(view)
        return scores.flip(-1) if view.layer_idx == self.layer else scores


@pytest.mark.parametrize("press_name", ["h2o", "snapkv-d", "knorm", "tova"])
def test_per_layer_state_is_independent(tiny_llama, press_name):
    """Permuting one layer's scores at prefill changes that layer's kept set and no other layer's."""
    model, tokenizer = tiny_llama
    prompt = prompt_ids(tokenizer)[:40]
    settings = GenerationSettings(max_new_tokens=1)

    def kept_after_prefill(press):
        kept = []
        generate(model, [prompt], press, 16, settings, on_step=lambda c, t: kept.append(c.kept_positions(0)))
        return kept[0]

    base = kept_after_prefill(make_press(press_name))
    permuted = kept_after_prefill(PermutedInLayer(make_press(press_name), layer=1))
    assert permuted[0] == base[0] and permuted[2] == base[2]
    assert permuted[1] != base[1]


def test_batch_of_one_padded_prompt_matches_unpadded(tiny_llama):
    """Left padding is never attended: a short prompt batched with a long one decodes as it does alone."""
    model, tokenizer = tiny_llama
    short, long = prompt_ids(tokenizer)[:20], prompt_ids(tokenizer)[:45]
    settings = GenerationSettings(max_new_tokens=20)
    for name, budget in (("full", None), ("h2o", 24), ("snapkv-d", 24), ("streaming_llm", 24)):
        alone = [generate(model, [p], make_press(name), budget, settings)[0].tokens for p in (short, long)]
        batched = [o.tokens for o in generate(model, [short, long], make_press(name), budget, settings)]
        assert batched == alone, name


def test_sampling_is_seeded(tiny_llama):
    model, tokenizer = tiny_llama
    prompt = prompt_ids(tokenizer)[:30]
    settings = GenerationSettings(max_new_tokens=30, temperature=1.0, top_p=0.9, seed=3)
    a = generate(model, [prompt], make_press("h2o"), 16, settings)[0].tokens
    b = generate(model, [prompt], make_press("h2o"), 16, settings)[0].tokens
    c = generate(model, [prompt], make_press("h2o"), 16, dataclasses.replace(settings, seed=4))[0].tokens
    assert a == b and a != c


def test_eos_and_stop_strings_end_generation(tiny_llama):
    model, tokenizer = tiny_llama
    prompt = prompt_ids(tokenizer)[:30]
    free = generate(model, [prompt], make_press("full"), None, GenerationSettings(max_new_tokens=30))[0]
    assert free.finish_reason == "length" and free.output_tokens == 30
    eos = free.tokens[9]
    stopped = generate(model, [prompt], make_press("full"), None,
                       GenerationSettings(max_new_tokens=30, eos_token_ids=(eos,)))[0]
    assert stopped.finish_reason == "eos" and stopped.tokens == free.tokens[:free.tokens.index(eos) + 1]
    text = tokenizer.decode(free.tokens[:12])
    out = generate(model, [prompt], make_press("full"), None,
                   GenerationSettings(max_new_tokens=30, stop_strings=(text[-3:],)),
                   detokenize=lambda ids: tokenizer.decode(ids))[0]
    assert out.finish_reason == "stop" and out.output_tokens <= 12


def test_sliding_window_models_are_refused():
    from kvbench.errors import KvbenchError
    from kvbench.models import build_tiny

    model, tokenizer = build_tiny("tiny-qwen2")
    model.config.layer_types = ["sliding_attention", "full_attention", "full_attention"]
    with pytest.raises(KvbenchError, match="sliding_attention"):
        generate(model, [[1, 2, 3]], make_press("h2o"), 8, GenerationSettings(max_new_tokens=2))


def test_sliding_window_attention_is_refused_unless_the_run_fits_in_the_window():
    from kvbench.errors import KvbenchError
    from kvbench.models import build_tiny

    model, _ = build_tiny("tiny-mistral")
    settings = GenerationSettings(max_new_tokens=10)
    plain = generate(model, [[1, 2, 3, 4]], make_press("h2o"), 8, settings)[0].tokens
    model.config.sliding_window = 64  # wider than the 14 tokens of the run: attention is the full one
    assert generate(model, [[1, 2, 3, 4]], make_press("h2o"), 8, settings)[0].tokens == plain
    model.config.sliding_window = 8
    with pytest.raises(KvbenchError, match="sliding-window attention \\(8 tokens\\)"):
        generate(model, [[1, 2, 3, 4]], make_press("h2o"), 8, settings)


@pytest.mark.parametrize(("kwarg", "message"), [("softcap", "soft-capping"), ("s_aux", "attention sinks")])
def test_attention_variants_kvbench_does_not_implement_are_refused(kwarg, message):
    from kvbench.engine.attention import _refuse_unsupported
    from kvbench.errors import KvbenchError

    with pytest.raises(KvbenchError, match=message):
        _refuse_unsupported(torch.nn.Identity(), {kwarg: 30.0}, 100)
    _refuse_unsupported(torch.nn.Identity(), {kwarg: None, "sliding_window": None}, 100)


def test_multimodal_models_are_refused(tiny_llama):
    from kvbench.errors import KvbenchError

    model, _ = tiny_llama
    model.config.vision_config = {"model_type": "siglip_vision_model"}
    try:
        with pytest.raises(KvbenchError, match="multimodal"):
            generate(model, [[1, 2, 3]], make_press("h2o"), 8, GenerationSettings(max_new_tokens=2))
    finally:
        del model.config.vision_config


@pytest.mark.parametrize(("args", "interval"), [({"buffer": "4", "window_size": "5"}, 4), ({"window_size": "5"}, 6)])
def test_rpc_budget_schedule_keeps_the_prompt_and_never_holds_more_than_its_budget(tiny_llama, args, interval):
    """RPC, schedule=budget: the prompt and the query window's tokens stay; the cache cycles between budget -
    buffer and budget."""
    args = {**args, "schedule": "budget"}
    model, tokenizer = tiny_llama
    prompt = prompt_ids(tokenizer)[:12]
    budget, held = 24, []  # buffer 0 (default) = a quarter of the budget: 6

    def check(cache, step):
        newest = int(cache.query_position[0])
        for layer in cache.layers:
            assert layer.keys.shape[2] == budget
        for layer_kept in cache.kept_positions(0):
            for head_kept in layer_kept:
                assert set(range(12)) | set(range(newest - 4, newest + 1)) <= head_kept
                assert len(head_kept) <= budget
        held.append(cache.entries(0))

    out = generate(model, [prompt], make_press("rpc", args), budget, GenerationSettings(max_new_tokens=50),
                   on_step=check)[0]
    assert out.evicted_tokens > 0
    assert min(held[12:]) == budget - interval and max(held) == budget - 1
    assert out.peak_kv_bytes == budget * 3 * 2 * (16 + 16) * 4


def rpc_code_cache_lengths(prompt, steps, period, window, ratio):
    """RPC's code by hand (qwen2_custom.py): before each decoding step's update, target = cache - prompt -
    compressions * P/c - R; at target P - 1 the cache becomes prompt + (k + 1) P/c + R, else it grows by one."""
    cache, compressions, lengths = prompt, 0, []
    for _ in range(steps):
        if cache - prompt - compressions * (period // ratio) - window == period - 1:
            cache = prompt + (compressions + 1) * (period // ratio) + window
            compressions += 1
        else:
            cache += 1
        lengths.append(cache)
    return lengths


def test_rpc_growth_schedule_grows_the_kept_reasoning_as_its_code_does(tiny_llama):
    model, tokenizer = tiny_llama
    prompt = prompt_ids(tokenizer)[:12]
    period, window, held = 16, 4, []  # P = 16, R = 4, c = 4: P/c = 4 more reasoning tokens per compression

    def check(cache, step):
        held.append(cache.entries(0))
        newest = int(cache.query_position[0])
        for layer_kept in cache.kept_positions(0):
            for head_kept in layer_kept:
                assert set(range(12)) | set(range(newest - window + 1, newest + 1)) <= head_kept
                assert len(head_kept) == held[-1]  # the device holds what the host counts

    out = generate(model, [prompt], make_press("rpc", {"window_size": str(window)}), period,
                   GenerationSettings(max_new_tokens=90), on_step=check)[0]
    assert held[1:] == rpc_code_cache_lengths(12, 89, period, window, 4)
    # by hand: the 20th step brings 12 + 4 + 16 = 32 entries and compresses to 12 + 4 + 4 = 20; then 16 steps later
    # 36 -> 12 + 8 + 4 = 24, then 40 -> 28: the kept reasoning grows by P/c = 4 at every compression
    assert (held[19], held[20], held[35], held[36], held[51], held[52]) == (31, 20, 35, 24, 39, 28)
    compressions = sum(1 for before, after in zip(held, held[1:]) if after < before)
    assert compressions == 5 and out.evicted_tokens == compressions * (16 - 4)



@pytest.mark.parametrize(("prompt_length", "args"),
                         [(12, {"buffer": "4"}), (30, {"prefill_budget": "8", "buffer": "3"})])
def test_scope_pins_its_prefill_budget_and_gives_the_rest_to_generated_tokens(tiny_llama, prompt_length, args):
    """SCOPE: the prompt ends at exactly its prefill budget and never loses a pinned token; recent tokens stay."""
    model, tokenizer = tiny_llama
    prompt = prompt_ids(tokenizer)[:prompt_length]
    press, budget = make_press("scope", args), 20
    pinned_n = press.prompt_budget(budget)
    recent = int(press.recent_ratio * (budget - pinned_n))
    prompt_held, held = [], []

    def check(cache, step):
        newest = int(cache.query_position[0])
        kept = [head for layer in cache.kept_positions(0) for head in layer]
        prompt_held.append([{p for p in head if p < prompt_length} for head in kept])
        for head in kept:
            assert len(head) <= budget + press.buffer
            if step > 0:
                assert set(range(newest - recent + 1, newest + 1)) <= head
        held.append(cache.entries(0))

    out = generate(model, [prompt], press, budget, GenerationSettings(max_new_tokens=40), on_step=check)[0]
    assert out.evicted_tokens > 0
    final = prompt_held[-1]
    assert all(len(head) == pinned_n for head in final)
    for step_held in prompt_held:  # the pinned tokens are there from the prefill to the end
        assert all(pinned <= head for pinned, head in zip(final, step_held))
    cycling = held[held.index(budget):]
    assert min(cycling) == budget and max(cycling) == budget + press.buffer - 1


def test_pyramidkv_layers_hold_their_own_budgets_which_add_up_to_the_total(tiny_llama):
    """Each layer holds min(tokens, its budget) per head after every compression; in all, layers x budget."""
    model, tokenizer = tiny_llama
    press, budget, prompt = make_press("pyramidkv:snapkv-d", {"window_size": "4"}), 16, prompt_ids(tokenizer)[:10]
    layer_budgets = press.layer_budgets(budget, 3)
    sizes = []

    def check(cache, step):
        tokens = int(cache.query_position[0]) + 1
        held = [[len(head) for head in layer] for layer in cache.kept_positions(0)]
        if tokens >= budget + press.buffer:  # compressing at every step from here
            assert held == [[min(tokens, b)] * 2 for b in layer_budgets]
        assert cache.entries(0) == sum(map(sum, held)) / 6  # the host's count, without a synchronisation
        sizes.append(held)

    out = generate(model, [prompt], press, budget, GenerationSettings(max_new_tokens=60), on_step=check)[0]
    assert sum(layer[0] for layer in sizes[-1]) == 3 * budget and sizes[-1][0][0] > budget > sizes[-1][-1][0]
    assert out.evicted_tokens == (70 - 1) - budget and out.mean_cache_len < 70
    assert out.peak_kv_bytes == (budget + press.buffer) * 3 * 2 * (16 + 16) * 4


def test_adakv_heads_share_each_layers_budget(tiny_llama):
    """After every compression each layer holds heads x budget in all, every head at least alpha x budget."""
    model, tokenizer = tiny_llama
    press, budget = make_press("adakv:snapkv-d", {"window_size": "4", "alpha": "0.25"}), 16
    uneven = []

    def check(cache, step):
        if int(cache.query_position[0]) + 1 < budget + press.buffer:
            return
        assert cache.entries(0) == sum(len(head) for layer in cache.kept_positions(0) for head in layer) / 6
        for layer in cache.kept_positions(0):
            counts = [len(head) for head in layer]
            assert sum(counts) == 2 * budget and min(counts) >= 4 and max(counts) <= press.head_capacity(budget, 2)
            uneven.append(len(set(counts)) > 1)

    out = generate(model, [prompt_ids(tokenizer)[:10]], press, budget, GenerationSettings(max_new_tokens=60),
                   on_step=check)[0]
    assert any(uneven), "the heads never held different numbers: the test would not see a uniform split"
    assert out.peak_kv_bytes == (budget + press.buffer) * 3 * 2 * (16 + 16) * 4
