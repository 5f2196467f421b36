"""Eviction equals masking: every step's logits equal a full forward with exactly the evicted entries masked."""

import dataclasses

import pytest
import torch

from kvbench.engine.generate import GenerationSettings, generate
from kvbench.presses import make_press
from kvbench.verify.oracle import masked_logits, masks_from_kept
from kvbench.verify.outputs import masking
from kvbench.verify.subject import Subject
from tests.conftest import ALL_PRESSES, TEST_ARGS, prompt_ids

# shadowkv and quest evict nothing (they attend a selection): their own oracles are in tests/reference/
CASES = [(name, TEST_ARGS.get(name, {})) for name in ALL_PRESSES if name not in ("full", "shadowkv", "quest")] + [
    ("h2o", {"recent_ratio": "0", "normalize": "true"}),  # the paper's H2O variant
    ("snapkv-d", {"window_size": "4", "pooling": "max", "gqa": "max"}),
    ("tova", {"per_head": "true"}),
    ("knorm", {"n_sink": "2", "recent_window": "3"}),
    ("streaming_llm", {"buffer": "3"}),
    ("scope", {"scoring": "current", "buffer": "1"}),  # SCOPE's slide
    ("rpc", {"schedule": "budget", "window_size": "5"}),
]


def run_and_record(model, prompt, press, budget, n_new):
    kept = []
    outputs = generate(
        model, [prompt], press, budget, GenerationSettings(max_new_tokens=n_new), record_logits=True,
        on_step=lambda cache, t: kept.append(cache.kept_positions(0)),
    )
    return outputs[0], kept


@pytest.mark.parametrize(("press_name", "args"), CASES, ids=[f"{n}-{a}" if a else n for n, a in CASES])
@pytest.mark.parametrize("budget", [12, 40])  # 12 < prompt (prefill compression); 40 > prompt (decode only)
def test_eviction_equals_masking(tiny, press_name, args, budget):
    """`kvbench verify`'s masking check: every step's logits equal the masked forward's, and the case evicts."""
    model, tokenizer = tiny
    outcome = masking(Subject(model, tokenizer, lambda: make_press(press_name, args)), budget)
    assert outcome.status == "pass", outcome


def test_oracle_detects_a_wrong_mask(tiny_llama):
    """The oracle is not vacuous: masking one kept entry more than the engine did changes the logits."""
    model, tokenizer = tiny_llama
    prompt = prompt_ids(tokenizer)[:30]
    out, kept = run_and_record(model, prompt, make_press("h2o"), 12, 20)
    tokens = prompt + out.tokens[:-1]
    cfg = model.config
    # Drop the sink-most kept position of layer 0, head 0 from every decode step.
    tampered = [[[set(h) for h in layer] for layer in step] for step in kept]
    for step in tampered:
        step[0][0].discard(min(step[0][0]))
    masks = masks_from_kept(tampered, len(prompt), len(tokens), cfg.num_hidden_layers, cfg.num_key_value_heads)
    expected = masked_logits(model, tokens, masks)[len(prompt) - 1:]
    assert not torch.allclose(torch.stack(out.logits), expected, atol=1e-4, rtol=1e-4)


def test_masking_check_names_the_first_wrong_step_layer_and_head(tiny_llama, monkeypatch):
    """A cache that misreports what it held (one entry of layer 1, KV head 1 left out from step 5 on) fails the
    masking check at the first decoding step that attends it, in that layer and head."""
    from kvbench.engine.cache import BudgetCache

    real = BudgetCache.kept_positions

    def misreported(self, row=0):
        kept = real(self, row)
        if self.decode_step >= 5:
            kept[1][1].discard(min(kept[1][1]))
        return kept

    monkeypatch.setattr(BudgetCache, "kept_positions", misreported)
    model, tokenizer = tiny_llama
    outcome = masking(Subject(model, tokenizer, lambda: make_press("h2o")), 12)
    assert outcome.status == "fail" and outcome.where == "step 6, layer 1, KV head 1", outcome


@pytest.mark.parametrize(("press_name", "args"), [("h2o", {}), ("snapkv-d", {}), ("streaming_llm", {}),
                                                   ("knorm", {}), ("tova", {}), ("rkv", {"buffer": "4"})])
def test_attention_loss_matches_an_independent_masked_forward(tiny, press_name, args):
    """Engine's attention loss = full causal attention mass outside the kept set, from the oracle forward."""
    from kvbench.verify.oracle import MISSED

    model, tokenizer = tiny
    prompt = prompt_ids(tokenizer)[:30]
    kept = []
    out = generate(model, [prompt], make_press(press_name, args), 12, GenerationSettings(max_new_tokens=24),
                   on_step=lambda cache, t: kept.append(cache.kept_positions(0)), measure_attention_loss=True)[0]
    tokens = prompt + out.tokens[:-1]
    cfg = model.config
    masked_logits(model, tokens, masks_from_kept(kept, len(prompt), len(tokens), cfg.num_hidden_layers,
                                                 cfg.num_key_value_heads))
    for layer in range(cfg.num_hidden_layers):
        expected = MISSED[layer][:, len(prompt):].T  # decode queries: [steps, H_kv]
        torch.testing.assert_close(out.attention_loss[layer], expected, atol=1e-5, rtol=1e-4)
    assert out.attention_loss.max() > 0.05  # the case does evict attended entries


@pytest.mark.parametrize("press_name", ["full", "h2o", "snapkv-d", "rkv"])
def test_attention_loss_is_zero_without_eviction(tiny_llama, press_name):
    model, tokenizer = tiny_llama
    prompt = prompt_ids(tokenizer)[:30]
    budget = None if press_name == "full" else 200
    out = generate(model, [prompt], make_press(press_name), budget, GenerationSettings(max_new_tokens=20),
                   measure_attention_loss=True)[0]
    assert out.attention_loss.shape == (3, 19, 2) and float(out.attention_loss.abs().max()) == 0.0


def _oracle_forward(model, prompt, out, kept):
    tokens = prompt + out.tokens[:-1]
    cfg = model.config
    masked_logits(model, tokens, masks_from_kept(kept, len(prompt), len(tokens), cfg.num_hidden_layers,
                                                 cfg.num_key_value_heads))
    return cfg.num_attention_heads // cfg.num_key_value_heads


@pytest.mark.parametrize("budget", [12, 40])
def test_h2o_accumulated_attention_matches_the_oracle(tiny, budget):
    """Every held entry's accumulated attention = the sum of what each query put on it, in the oracle forward."""
    from kvbench.verify.oracle import PROBS

    model, tokenizer = tiny
    prompt = prompt_ids(tokenizer)[:30]
    kept, caches = [], []

    def on_step(cache, t):
        kept.append(cache.kept_positions(0))
        caches[:] = [cache]

    settings = GenerationSettings(max_new_tokens=30)
    out = generate(model, [prompt], make_press("h2o"), budget, settings, on_step=on_step)[0]
    assert out.evicted_tokens > 0
    group = _oracle_forward(model, prompt, out, kept)
    cache = caches[0]
    for layer in range(len(cache.layers)):
        received = PROBS[layer].view(-1, group, *PROBS[layer].shape[1:]).mean(1).sum(1)  # [H_kv, L]: GQA mean
        valid = cache.valid[layer, 0]
        positions = cache.positions[layer, 0][valid].view(valid.shape[0], -1)
        ours = cache.state["accumulated"][layer, 0][valid].view(valid.shape[0], -1)
        torch.testing.assert_close(ours, received.gather(1, positions), atol=1e-5, rtol=1e-4)



def test_scope_pins_the_prompt_tokens_with_the_most_prefill_attention(tiny):
    """SCOPE's pinned prompt = the last recent_ratio of its prefill budget + the heavy hitters by the attention
    the prompt's queries placed on them, in an independent forward (GQA mean)."""
    from kvbench.verify.oracle import PROBS

    model, tokenizer = tiny
    prompt = prompt_ids(tokenizer)[:16]
    press, budget = make_press("scope", {"prefill_budget": "9", "buffer": "4"}), 20
    kept = []
    out = generate(model, [prompt], press, budget, GenerationSettings(max_new_tokens=40),
                   on_step=lambda cache, t: kept.append(cache.kept_positions(0)))[0]
    assert out.evicted_tokens > 0
    group = _oracle_forward(model, prompt, out, kept)
    n_recent = int(press.recent_ratio * 9)
    for layer, layer_kept in enumerate(kept[-1]):
        n = len(prompt)
        received = PROBS[layer][:, :n, :n].reshape(-1, group, n, n).mean(1).sum(1)  # [H_kv, n]
        for head, head_kept in enumerate(layer_kept):
            heavy = received[head, : n - n_recent].argsort(descending=True)[: 9 - n_recent].tolist()
            assert {p for p in head_kept if p < n} == set(heavy) | set(range(n - n_recent, n))


@dataclasses.dataclass
class RecordingPress:
    """Wraps a press and records, at every decoding eviction, the slots and the attention the press saw."""

    inner: object
    seen: list = dataclasses.field(default_factory=list)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def score(self, view):
        if view.layer_idx is None:  # the decoding path: every layer at once
            self.seen.append((view.positions.clone(), view.valid.clone(), view.attention(gqa="mean").clone()))
        return self.inner.score(view)


@pytest.mark.parametrize(("press_name", "args"), [("snapkv-d", {"window_size": "4"}), ("tova", {})])
def test_window_attention_matches_the_oracle(tiny, press_name, args):
    """During decoding (all layers scored at once), a press's window attention equals softmax(q.K) recomputed
    from the oracle forward's queries and keys, over the entries held, for the last W queries."""
    from kvbench.verify.oracle import KEYS, QUERIES

    model, tokenizer = tiny
    prompt = prompt_ids(tokenizer)[:30]
    press = RecordingPress(make_press(press_name, args))
    kept, steps = [], []
    out = generate(model, [prompt], press, 40, GenerationSettings(max_new_tokens=24),
                   on_step=lambda c, t: (kept.append(c.kept_positions(0)), steps.append(len(press.seen))))[0]
    assert len(press.seen) > 5
    group = _oracle_forward(model, prompt, out, kept)
    window = press.query_window
    n_layers = len(KEYS)
    scaling = model.config.head_dim**-0.5 if getattr(model.config, "head_dim", None) else \
        (model.config.hidden_size // model.config.num_attention_heads) ** -0.5
    for t, count in enumerate(steps):
        if t == 0 or count == steps[t - 1]:
            continue  # no decoding eviction at this forward
        positions, valid, attention = press.seen[count - 1]
        query = len(prompt) + t - 1
        for layer in range(n_layers):
            for head in range(positions.shape[1]):
                pos = positions[layer, head][valid[layer, head]]
                keys = KEYS[layer][head, pos]  # [S, D]
                qs = QUERIES[layer][head * group:(head + 1) * group, query - window + 1: query + 1]  # [G, W, D]
                window_pos = torch.arange(query - window + 1, query + 1)
                logits = (qs @ keys.T * scaling).masked_fill(pos[None, None, :] > window_pos[None, :, None], -torch.inf)
                expected = torch.softmax(logits, -1).mean(dim=(0, 1))
                ours = attention[layer, head][valid[layer, head]]
                torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


SHADOW_ARGS = {"chunk_size": "4", "local_window": "4", "outlier_chunks": "1"}


def _attended(cache) -> list[list[set[int]]]:
    """Per layer, per KV head: the positions the last decoding step attended (sequence 0)."""
    out = []
    for layer in cache.layers:
        positions, visible = layer.last_attended
        out.append([{p for p, v in zip(ph.tolist(), vh.tolist()) if v} for ph, vh in zip(positions[0], visible[0])])
    return out


@pytest.mark.parametrize("generated", ["exact", "projected"])
@pytest.mark.parametrize("budget", [19, 27])
def test_shadowkv_attention_over_the_selected_tokens_equals_a_masked_forward(tiny, budget, generated):
    """At full rank the rebuilt keys are exact: every step's logits equal an independent forward in which each
    query sees exactly the tokens ShadowKV attended (outliers, selected chunks, local window; every generated
    token, as ShadowKV, unless they are projected)."""
    from kvbench.verify.oracle import KEYS, QUERIES

    model, tokenizer = tiny
    prompt = prompt_ids(tokenizer)[:30]
    press = make_press("shadowkv", {**SHADOW_ARGS, "generated": generated})
    attended, ends, caches = [], [], []

    def on_step(cache, t):
        attended.append(_attended(cache) if t else None)
        ends.append(cache.chunk_end[0])  # chunks formed up to here when the next step attends
        caches[:] = [cache]

    out = generate(model, [prompt], press, budget, GenerationSettings(max_new_tokens=36), record_logits=True,
                   on_step=on_step)[0]
    tokens = prompt + out.tokens[:-1]
    cfg = model.config
    n, total = len(prompt), len(tokens)
    masks = {}
    for layer in range(cfg.num_hidden_layers):
        m = torch.zeros(cfg.num_key_value_heads, total, total, dtype=torch.bool)
        m[:, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
        for q in range(n, total):
            for h, seen in enumerate(attended[q - n + 1][layer]):
                assert q in seen and max(seen) <= q
                if generated == "exact":  # the budget bounds the prompt; every generated token is attended
                    assert len({p for p in seen if p < n}) <= budget and set(range(n, q + 1)) <= seen
                else:
                    assert len(seen) <= budget
                m[h, q, sorted(seen)] = True
        masks[layer] = m
    assert any(len(s) < q for q in range(n, total) for s in attended[q - n + 1][0]), "nothing was left out"
    expected = masked_logits(model, tokens, masks)
    torch.testing.assert_close(torch.stack(out.logits), expected[n - 1:], atol=1e-4, rtol=1e-4)
    # The chunks chosen are those whose landmark (mean post-RoPE key) scores highest by ShadowKV's rule (each query
    # head's softmax over the chunks of logits / sqrt(128), the group's maximum), recomputed from the oracle's own
    # queries and keys; the outlier chunk is attended whatever.
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    c, last, chunked = 4, total - 1, ends[-2] // 4
    for layer in range(cfg.num_hidden_layers):
        keys, query = KEYS[layer], QUERIES[layer][:, last]  # [H_kv, L, D], [H_q, D]
        outlier_positions = caches[0].layers[layer].outlier_positions[0]
        for h, seen in enumerate(attended[-1][layer]):
            assert set(range(ends[-2], last + 1)) <= seen  # the ring
            landmarks = keys[h, : chunked * c].view(chunked, c, -1).mean(1)
            outliers = {p // c for p in outlier_positions[h].tolist() if p >= 0}
            logits = query[h * group:(h + 1) * group] @ landmarks.T / 128**0.5  # outliers do not compete
            logits[:, sorted(outliers)] = -torch.inf
            scores = torch.softmax(logits, -1).amax(0).tolist()
            chosen = {j for j in range(chunked) if set(range(j * c, j * c + c)) <= seen} - outliers
            others = set(range(chunked)) - chosen - outliers
            assert outliers <= {p // c for p in seen} and chosen and others
            assert min(scores[j] for j in chosen) >= max(scores[j] for j in others) - 1e-5
