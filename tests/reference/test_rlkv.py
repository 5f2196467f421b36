"""rlkv against RLKV's evaluation (DuoAttention's eval cache with RLKV's or DuoAttention's gates), as its own
code runs it.

Source: Kurt232/RLKV @ 6dadf85 (read with line numbers; transcribed without kvbench's press or its docs).

- ``eval/bench/pred.py``: ``seed_everything(42)`` first in ``__main__`` (269; ``np.random.seed`` 176). ``--method
  rlkv`` (237-261): the gates ``np.loadtxt(adapter_weights.tsv, dtype=float, delimiter="\\t")`` clipped to [0, 1]
  (242-247), ``sparsify_attention_heads(adapter_weight, None, sparsity=args.sparsity)`` (251-253),
  ``enable_duo_attention_eval(model, gates, sink_size, recent_size)`` (256-261). ``--method duo_attn`` (202-226)
  is the same with ``load_attn_pattern`` (``full_attention_heads.tsv``, the same ``loadtxt`` and clip) and
  ``--sink_size``/``--recent_size`` replacing the config's. ``scripts/bench.sh`` 6-12: ``--sink_size 16
  --recent_size 64``. ``get_pred`` (108-125): a prefill of all but the last ``decoding_simulation_length`` (50)
  prompt tokens, then those one by one, then greedy decoding one token per forward (128-137).
- ``base/duo_attn/utils.py`` ``sparsify_attention_heads`` (351-371): ``gates += np.random.uniform(0, 1e-6,
  gates.shape)`` (353), ``threshold = np.quantile(gates, sparsity)`` (358), 2 at ``sparsity >= 1`` (362-364), -1 at
  ``sparsity <= 0`` (365-367), full heads ``gates >= threshold`` (369). ``load_attn_pattern`` 322-332.
- ``base/patch/llama.py`` ``enable_llama_duo_attention_eval`` (374-424): each layer's 0/1 row reorders q/k/v/o
  (``base/patch/utils.py`` ``reorder_linear_weights`` 7-35: the heads ``> 0.5`` first, in order) and
  ``reorder_full_attn_heads`` (38-46). ``llama_duo_attention_forward_one_way_reordered`` (138-304): the first
  ``num_full_attn_head`` KV heads are full (182-198); the cache is two tuples, the full heads' and the streaming
  heads', each the past concatenated with the forward's keys (200-221). A first forward (``q_len ==
  kv_seq_len``) is ``flash_attn_func(causal=True)`` over every head (223-231); later forwards attend the full heads
  over their cache and the streaming heads over theirs (232-265). After *every* forward (prefill included),
  a streaming cache of more than ``sink_size + recent_size`` entries keeps its first ``sink_size`` and last
  ``recent_size`` (271-288); the full cache keeps everything. ``base/patch/qwen.py`` 94-145 installs the same
  forward for Qwen2 (12-15, 115); ``base/patch/qwen3.py`` 130-296 is the same with QK-norm.

Claim: ``make_press("rlkv", {"gates": PATH, "sparsity": s, "n_sink": S, "seed": seed})`` at ``--budget B`` is that
evaluation with ``sink_size=S``, ``recent_size=B - S``: the full heads are those ``sparsify_attention_heads``
chooses after ``np.random.seed(seed)``; every head attends the whole prompt at the prefill; after every forward a
streaming head keeps its first S and last B - S entries, a full head everything. Assumed, not checkable from the
source: no numpy draw happens between ``seed_everything(42)`` and ``sparsify_attention_heads`` (model loading is
torch's), so the noise is numpy's first draw after seeding.

Found: identical. Heads chosen: every shipped gates file (3 RLKV ``adapter_weights.tsv``, 6 DuoAttention
``full_attention_heads.tsv``) at sparsities 0, 0.2, 0.4, 0.5, 0.6, 0.8, 1: 63 of 63 identical (read from kvbench's
behaviour: which heads kept everything; 162 of 162 compressions identical); seeds 0, 1, 7, 123 on gates with many
exact ties, where the noise alone decides: identical. Kept sets: seeded (groups 1, 2, 7; B/S/prompt 12/4/24,
12/4/12, 12/4/5, 8/0/20, 20/16/30, 5/4/9, sparsity 0.5 and 0.25: 36 runs, 1422 of 1422 compressions identical) and
in situ (tiny llama, groups 1, 2, 7, a 55-token prompt, B/S 16/4 and 64/16: 6 runs, 330 of 330), and the attention
at every forward (``test_attention``). The transcription is checked against the source's own functions, executed
from the mirror (``test_selection_transcription``, ``test_transcription``). Controls (``>`` for ``>=``, no noise,
no clip, another seed, the full and streaming heads swapped, ``recent_size`` B - S + 1) are caught.

Named differences, each asserted below:

1. The decoding simulation (``test_decoding_simulation``): ``pred.py`` feeds the last 50 prompt tokens one by one
   (108-125), so during them a streaming head attends only to its first S and last B - S entries; kvbench's
   prefill attends every head over the whole prompt (as the source's first forward does, 223-231). The kept sets
   after the prompt and at every later forward are identical (keeping the first S and last B - S composes: 21 of
   21 compressions); the attention of those 50 prompt tokens in streaming heads is not -- the prompt's last token,
   from which the first answer token is predicted, among them.
2. Outside what kvbench runs: ``recent_size`` 0 (B = S) breaks the source (``[:, -0:]`` is the whole cache,
   271-275: the ``copy_`` raises, ``test_source_recent_zero``) and kvbench refuses B <= S (``test_budget_at_sink``).
   A model with one KV head per layer breaks the source too (``np.loadtxt`` returns a vector, so
   ``full_attention_heads[idx]`` is a scalar that ``reorder_full_attn_heads`` cannot slice,
   ``test_source_one_kv_head``); the noise is the same draw for [L] and [L, 1], so the group-7 tiny model (one KV
   head) is compared with the rule.

Not reproduced (no kept set depends on them): batches (``pred.py`` runs one prompt at a time), bf16 (the eviction
is by position; the 0/1 gates are exact in bf16), tensor parallelism over several GPUs (``to_device``), the
prompt's truncation to ``max_length`` (86-98) and the early stop on repetition (141-149).
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import subprocess
import types
from typing import Optional

import numpy as np
import pytest
import torch
from torch import nn

from kvbench.engine.cache import BudgetCache
from kvbench.errors import KvbenchError
from kvbench.presses import make_press
from tests.reference.harness import (
    GROUPS,
    Forward,
    assert_identical,
    compare,
    log,
    run_cache,
    synthetic_forwards,
    tiny_model,
    trace_model,
)

MIRROR = pathlib.Path("/work/.mirror/Kurt232+RLKV/repo")
COMMIT = "6dadf85"
SPARSITIES = (0, 0.2, 0.4, 0.5, 0.6, 0.8, 1)
PROMPT = "Tom has 12 apples. He buys 7 more and eats 3. How many?"
needs_mirror = pytest.mark.skipif(not MIRROR.exists(), reason="needs the Kurt232/RLKV mirror")


# --- the source's rule, in plain numpy and python ---------------------------------------------------------------


def load_gates(path) -> np.ndarray:
    """``pred.py`` 242-247 (``load_attn_pattern`` 323-328 for DuoAttention's file)."""
    return np.clip(np.loadtxt(path, dtype=float, delimiter="\t"), 0, 1)


@dataclasses.dataclass(frozen=True)
class Selection:
    """``sparsify_attention_heads`` options; all but the defaults are controls, not the source."""

    noise: bool = True
    strict: bool = False  # ``>`` for ``>=``
    clip: bool = True


def choose_full(gates: np.ndarray, sparsity: float, seed: int = 42, how: Selection = Selection()) -> np.ndarray:
    """``sparsify_attention_heads(gates, None, sparsity)`` (351-371) right after ``np.random.seed(seed)``: the full
    heads (bool, the gates' shape). ``RandomState(seed)`` draws what the seeded global generator draws."""
    gates = np.clip(gates, 0, 1) if how.clip else np.array(gates, dtype=float)
    if how.noise:
        gates = gates + np.random.RandomState(seed).uniform(0, 1e-6, gates.shape)  # 353
    threshold = np.quantile(gates, sparsity)  # 358
    if sparsity >= 1:  # 362-364
        threshold = 2
    if sparsity <= 0:  # 365-367
        threshold = -1
    return gates > threshold if how.strict else gates >= threshold  # 369


def reference(forwards, full: np.ndarray, budget: int, n_sink: int, recent: int | None = None):
    """kept[t][layer][head] of the eval cache (271-288): each head's entries in cache order, the forward's tokens
    appended; a streaming head over ``sink_size + recent_size`` keeps its first and last. ``recent`` other than
    ``budget - n_sink`` is a control."""
    sink = n_sink
    recent = budget - n_sink if recent is None else recent
    assert recent >= 1, "recent_size 0 breaks the source (271-275)"
    layers, heads = forwards[0].layers, forwards[0].keys.shape[1]
    full = np.asarray(full).reshape(layers, heads)
    caches = [[[] for _ in range(heads)] for _ in range(layers)]
    kept = []
    for forward in forwards:
        new = forward.positions.tolist()
        for layer in range(layers):
            for head in range(heads):
                cache = caches[layer][head] + new  # 208-221
                if not full[layer, head] and len(cache) > recent + sink:  # 271
                    cache = cache[:sink] + cache[-recent:]  # 272-288
                caches[layer][head] = cache
        kept.append([[set(cache) for cache in layer] for layer in caches])
    return kept


# --- kvbench ------------------------------------------------------------------------------------------------------


def press(path, sparsity, n_sink, seed=42):
    return make_press("rlkv", {"gates": str(path), "sparsity": str(sparsity), "n_sink": str(n_sink),
                               "seed": str(seed)})


def write_gates(path: pathlib.Path, gates: np.ndarray) -> pathlib.Path:
    np.savetxt(path, gates, delimiter="\t")  # the source's ``save_full_attention_heads`` format
    return path


def random_gates(seed: int, layers: int, heads: int) -> np.ndarray:
    """Gates like the shipped ones: some slightly negative (clipped to 0), some exactly 1, the rest in between; and
    a few above 1 (clipped to 1)."""
    rng = np.random.default_rng(seed)
    gates = rng.uniform(0, 1, (layers, heads))
    kind = rng.uniform(0, 1, (layers, heads))
    gates[kind < 0.3] = -rng.uniform(0, 1e-3, (layers, heads))[kind < 0.3]
    gates[kind > 0.75] = 1.0
    gates[kind > 0.95] = 1.02
    return gates


def kvbench_full(path, sparsity, layers, heads, seed=42):
    """The heads kvbench keeps whole, read from its behaviour: a 5-token prompt at budget 3 (one sink) leaves a
    full head all 5 positions and a streaming head 3; then two decoding steps. Returns (full, forwards, kept)."""
    forwards = synthetic_forwards(0, group=1, prompt=5, steps=2, layers=layers, kv_heads=heads, head_dim=2)
    kept = run_cache(press(path, sparsity, 1, seed), 3, forwards)
    sizes = np.array([[len(positions) for positions in layer] for layer in kept[0]])
    assert set(sizes.flat) <= {3, 5}, sizes
    return sizes == 5, forwards, kept


def shipped_files():
    out = subprocess.run(["git", "-C", str(MIRROR), "ls-tree", "-r", "--name-only", COMMIT, "head_dist"],
                         capture_output=True, text=True, check=True).stdout.split()
    files = [f for f in out if f.endswith(("adapter_weights.tsv", "full_attention_heads.tsv"))]
    assert len(files) == 9, files
    return files


def git_show(path: str) -> str:
    return subprocess.run(["git", "-C", str(MIRROR), "show", f"{COMMIT}:{path}"], capture_output=True, text=True,
                          check=True).stdout


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """Every shipped gates file, copied out of the mirror: (name, path, gates as the source loads them)."""
    root = tmp_path_factory.mktemp("gates")
    out = []
    for i, name in enumerate(shipped_files()):
        path = root / f"{i}.tsv"
        path.write_text(git_show(name))
        out.append((name.split("/")[1] + "/" + name.split("/")[2], path, load_gates(path)))
    return out


# --- head selection -----------------------------------------------------------------------------------------------


@needs_mirror
def test_shipped_gates(shipped):
    """Every shipped gates file at every sparsity: kvbench's full heads are the source's."""
    for name, path, gates in shipped:
        layers, heads = gates.shape
        for sparsity in SPARSITIES:
            mine, forwards, kept = kvbench_full(path, sparsity, layers, heads)
            theirs = choose_full(gates, sparsity)
            assert (mine == theirs).all(), (f"{name} sparsity {sparsity}: kvbench alone full "
                                            f"{np.argwhere(mine & ~theirs).tolist()}, the source alone "
                                            f"{np.argwhere(theirs & ~mine).tolist()}")
            assert_identical(kept, reference(forwards, theirs, 3, 1), forwards, "rlkv",
                             f"heads {name} sparsity {sparsity}", min_compressions=0 if sparsity == 0 else 1)


@needs_mirror
def test_selection_controls(shipped):
    """The head choice can fail: ``>`` for ``>=``, no noise or another seed each choose other heads on some
    shipped file and sparsity. (Clipping changes no choice there: the negative gates are fewer than a fifth.)"""
    differing = dict.fromkeys(("strict", "no noise", "seed 0"), 0)
    for _, path, gates in shipped:
        layers, heads = gates.shape
        for sparsity in (0.2, 0.5, 0.8):
            mine = kvbench_full(path, sparsity, layers, heads)[0]
            differing["strict"] += (mine != choose_full(gates, sparsity, how=Selection(strict=True))).any()
            differing["no noise"] += (mine != choose_full(gates, sparsity, how=Selection(noise=False))).any()
            differing["seed 0"] += (mine != choose_full(gates, sparsity, seed=0)).any()
    assert all(count >= 3 for count in differing.values()), differing


def test_control_clip(tmp_path):
    """Gates with 30% negatives at sparsity 0.2: the source clips them to 0 (ties the noise breaks); not clipping
    them chooses other heads."""
    path = write_gates(tmp_path / "gates.tsv", random_gates(2, 12, 8))
    raw = np.loadtxt(path, dtype=float, delimiter="\t")
    mine = kvbench_full(path, 0.2, 12, 8)[0]
    assert (mine == choose_full(raw, 0.2)).all()
    assert (mine != choose_full(raw, 0.2, how=Selection(clip=False))).any()


def test_seeds(tmp_path):
    """kvbench's ``seed`` is the source's ``np.random.seed``: gates with many exact ties (0 and 1), where the noise
    alone decides, at seeds 0, 1, 7, 123; and the choice depends on the seed."""
    gates = np.where(random_gates(5, 12, 8) > 0.5, 1.0, 0.0)
    path = write_gates(tmp_path / "ties.tsv", gates)
    chosen = []
    for seed in (0, 1, 7, 123):
        for sparsity in (0.3, 0.5, 0.7):
            mine = kvbench_full(path, sparsity, 12, 8, seed)[0]
            assert (mine == choose_full(load_gates(path), sparsity, seed)).all(), (seed, sparsity)
        chosen.append(mine)
    assert all((a != b).any() for a, b in zip(chosen, chosen[1:]))


@needs_mirror
def test_selection_transcription(shipped):
    """``choose_full`` is the source's ``sparsify_attention_heads``, executed from the mirror after
    ``np.random.seed``, and ``load_gates`` its ``load_attn_pattern`` (DuoAttention's files)."""
    source = source_functions()
    state = np.random.get_state()
    try:
        for name, path, gates in shipped:
            if name.startswith("duo_attn"):
                directory = path.parent / "duo"
                directory.mkdir(exist_ok=True)
                (directory / "full_attention_heads.tsv").write_text(path.read_text())
                (directory / "config.json").write_text('{"sink_size": 128, "recent_size": 256}')
                loaded, _, _ = source["load_attn_pattern"](str(directory))
                assert np.array_equal(loaded, gates)
            for sparsity in SPARSITIES:
                for seed in (42, 3):
                    np.random.seed(seed)  # pred.py 176
                    theirs, _ = source["sparsify_attention_heads"](gates.copy(), None, sparsity=sparsity)
                    assert np.array_equal(theirs > 0.5, choose_full(gates, sparsity, seed)), (name, sparsity, seed)
    finally:
        np.random.set_state(state)


# --- kept sets ----------------------------------------------------------------------------------------------------

#: budget, n_sink, prompt: over the budget, equal to it, under it (bench.sh's 16/64 scaled down; no sink; one recent).
CASES = [(12, 4, 24), (12, 4, 12), (12, 4, 5), (8, 0, 20), (20, 16, 30), (5, 4, 9)]


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize(("budget", "n_sink", "prompt"), CASES)
def test_seeded(budget, n_sink, prompt, group, tmp_path):
    """Three layers of three KV heads, gates seeded, sparsity 0.5 and 0.25."""
    for sparsity in (0.5, 0.25):
        gates = random_gates(budget + group, 3, 3)
        path = write_gates(tmp_path / "gates.tsv", gates)
        forwards = synthetic_forwards(group, group=group, prompt=prompt, layers=3, kv_heads=3, steps=40)
        kvbench = run_cache(press(path, sparsity, n_sink), budget, forwards)
        theirs = reference(forwards, choose_full(load_gates(path), sparsity), budget, n_sink)
        assert_identical(kvbench, theirs, forwards, "rlkv", f"seeded group {group} B/S {budget}/{n_sink} prompt "
                         f"{prompt} sparsity {sparsity}", min_compressions=10)


@pytest.mark.parametrize("group", GROUPS)
def test_in_situ(group, tmp_path):
    """The tiny llama (three layers; two KV heads, one for group 7), a 55-token prompt: over budget 16 (n_sink 4),
    under budget 64 (n_sink 16)."""
    model, tokenizer = tiny_model(group)
    kv_heads = model.config.num_key_value_heads
    path = write_gates(tmp_path / "gates.tsv", random_gates(group, model.config.num_hidden_layers, kv_heads))
    prompt = tokenizer(PROMPT)["input_ids"]
    for budget, n_sink, sparsity in ((16, 4, 0.5), (64, 16, 0.4)):
        forwards, kept = trace_model(model, prompt, press(path, sparsity, n_sink), budget, max_new_tokens=60)
        full = choose_full(load_gates(path), sparsity)
        assert 0 < full.sum() < full.size
        assert_identical(kept, reference(forwards, full, budget, n_sink), forwards, "rlkv",
                         f"tiny-llama group {group} B/S {budget}/{n_sink} sparsity {sparsity}", min_compressions=5)


def test_control_recent(tmp_path):
    """A reference keeping B - S + 1 recent entries does not pass the comparison."""
    path = write_gates(tmp_path / "gates.tsv", random_gates(0, 3, 3))
    forwards = synthetic_forwards(1, group=2, prompt=24, layers=3, kv_heads=3)
    kvbench = run_cache(press(path, 0.5, 4), 12, forwards)
    full = choose_full(load_gates(path), 0.5)
    assert compare(kvbench, reference(forwards, full, 12, 4, recent=9), forwards).first_difference
    assert compare(kvbench, reference(forwards, ~full, 12, 4), forwards).first_difference
    assert_identical(kvbench, reference(forwards, full, 12, 4), forwards, min_compressions=10)


# --- attention ----------------------------------------------------------------------------------------------------


def run_with_outputs(press_, budget, forwards):
    """``run_cache``, also returning each forward's attention output per layer [H_q, n, D]."""
    first = forwards[0]
    n_tokens = sum(f.positions.numel() for f in forwards)
    cache = BudgetCache(press_, budget, first.layers, first.keys.shape[1], n_tokens, [0],
                        max_new_tokens=len(forwards))
    outputs, kept = [], []
    with torch.inference_mode():
        for step, forward in enumerate(forwards):
            n = forward.positions.numel()
            cache.begin_step(forward.positions[None], torch.ones(1, n, dtype=torch.bool), [n], step)
            row = []
            for i, layer in enumerate(cache.layers):
                key, value = layer.update(forward.keys[i][None], forward.values[i][None])
                row.append(layer.attend(forward.queries[i][None], key, value, forward.scaling)[0])
            cache.end_step()
            outputs.append(row)
            kept.append(cache.kept_positions(0))
    return outputs, kept


def expected_output(forwards, t, layer, visible):
    """Attention of forward t's queries in ``layer`` when KV head h sees ``visible[h]`` (positions, each query also
    only those up to its own position: ``flash_attn_func(causal=True)``)."""
    keys = torch.cat([f.keys for f in forwards], dim=2)[layer]  # index = position
    values = torch.cat([f.values for f in forwards], dim=2)[layer]
    forward = forwards[t]
    queries = forward.queries[layer]
    group = forward.group
    out = torch.empty_like(queries)
    for q in range(queries.shape[0]):
        h = q // group
        for j, p in enumerate(forward.positions.tolist()):
            seen = sorted(x for x in visible[h] if x <= p)
            logits = queries[q, j] @ keys[h, seen].T * forward.scaling
            out[q, j] = torch.softmax(logits, dim=-1) @ values[h, seen]
    return out


def test_attention(tmp_path):
    """Every head attends the whole prompt causally at the prefill (223-231); at a decoding step a streaming head
    attends its kept first S and last B - S entries and the new token, a full head everything (232-265)."""
    path = write_gates(tmp_path / "gates.tsv", random_gates(3, 2, 3))
    full = choose_full(load_gates(path), 0.5)
    for group in GROUPS:
        forwards = synthetic_forwards(group, group=group, prompt=20, layers=2, kv_heads=3, steps=6)
        outputs, kept = run_with_outputs(press(path, 0.5, 2), 8, forwards)
        theirs = reference(forwards, full, 8, 2)
        assert kept == theirs
        for t, forward in enumerate(forwards):
            new = set(forward.positions.tolist())
            for layer in range(2):
                visible = [new | (set() if t == 0 else theirs[t - 1][layer][h]) for h in range(3)]
                assert torch.allclose(outputs[t][layer], expected_output(forwards, t, layer, visible), atol=1e-5)


def split_prompt(forwards, simulation):
    """``get_pred`` 108-125: the prompt's forward cut into all but its last ``simulation`` tokens, then those one
    by one."""
    first, n = forwards[0], forwards[0].positions.numel()
    cuts = [(0, n - simulation)] + [(i, i + 1) for i in range(n - simulation, n)]
    pieces = [Forward(first.positions[a:b], first.keys[:, :, a:b], first.values[:, :, a:b],
                      first.queries[:, :, a:b], first.scaling) for a, b in cuts]
    return pieces + list(forwards[1:])


def test_decoding_simulation(tmp_path):
    """Difference 1: with ``pred.py``'s last 50 prompt tokens fed one by one the kept sets from the end of the
    prompt on are kvbench's; the attention of those tokens in a streaming head is not kvbench's prefill's."""
    path = write_gates(tmp_path / "gates.tsv", random_gates(4, 2, 3))
    full = choose_full(load_gates(path), 0.5)
    assert 0 < full.sum() < full.size
    budget, n_sink, simulation = 12, 4, 50
    forwards = synthetic_forwards(6, group=2, prompt=70, layers=2, kv_heads=3, steps=20)
    outputs, kept = run_with_outputs(press(path, 0.5, n_sink), budget, forwards)
    pieces = split_prompt(forwards, simulation)
    theirs = reference(pieces, full, budget, n_sink)
    agreement = compare(kept, theirs[simulation:], forwards)
    log("rlkv", "seeded decoding simulation (pred.py 108-125)", agreement)
    assert agreement.first_difference is None and agreement.compressions >= 20, agreement
    # the source's attention of the prompt's last token: at its own one-token forward
    t = len(pieces) - len(forwards)
    group = forwards[0].group
    for layer in range(2):
        visible = [theirs[t - 1][layer][h] | {69} for h in range(3)]
        source = expected_output(pieces, t, layer, visible)[:, 0]
        mine = outputs[0][layer][:, -1]
        for h in range(3):
            same = torch.allclose(mine[h * group:(h + 1) * group], source[h * group:(h + 1) * group], atol=1e-5)
            assert same == bool(full[layer, h]), (layer, h)


# --- the transcription against the source's own code (where the mirror is at hand) ------------------------------


def source_functions() -> dict:
    """The source's ``sparsify_attention_heads``, ``load_attn_pattern``, ``enable_llama_duo_attention_eval`` and
    ``llama_duo_attention_forward_one_way_reordered`` (and ``base/patch/utils.py`` whole), executed from the mirror
    at ``COMMIT``; what they import from flash-attn and transformers stubbed (RoPE: none; attention: zeros)."""
    namespace = {
        "torch": torch, "np": np, "nn": nn, "types": types, "Optional": Optional, "Tuple": tuple,
        "LlamaForCausalLM": nn.Module, "enable_tuple_kv_cache_for_llama": lambda model: None,
        "apply_rotary_pos_emb": lambda q, k, cos, sin, unsqueeze_dim=1: (q, k),
        "flash_attn_func": lambda q, k, v, causal=True, dropout_p=0.0: torch.zeros_like(q),
    }
    exec(compile(git_show("base/patch/utils.py"), "base/patch/utils.py", "exec"), namespace)
    for file, names in (("base/duo_attn/utils.py", {"sparsify_attention_heads", "load_attn_pattern"}),
                        ("base/patch/llama.py", {"enable_llama_duo_attention_eval",
                                                 "llama_duo_attention_forward_one_way_reordered"})):
        tree = ast.parse(git_show(file))
        body = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in names]
        assert len(body) == len(names)
        exec(compile(ast.Module(body, []), file, "exec"), namespace)
    import json
    import os
    namespace.update(json=json, os=os)
    return namespace


class PositionAttention(nn.Module):
    """A llama attention module (head_dim 2) whose keys and values are [position, KV head]: the hidden state of
    token p is (p, 1, 0, ...), ``k_proj``/``v_proj`` read head h as (p, h)."""

    def __init__(self, kv_heads: int, group: int):
        super().__init__()
        hidden = kv_heads * group * 2
        self.config = types.SimpleNamespace(num_attention_heads=kv_heads * group, num_key_value_heads=kv_heads,
                                            hidden_size=hidden)
        self.head_dim, self.num_key_value_groups = 2, group
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * 2, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * 2, bias=False)
        with torch.no_grad():
            for proj in (self.q_proj, self.o_proj, self.k_proj, self.v_proj):
                proj.weight.zero_()
            for proj in (self.k_proj, self.v_proj):
                for h in range(kv_heads):
                    proj.weight[2 * h, 0] = 1.0
                    proj.weight[2 * h + 1, 1] = float(h)


def source_kept(forwards, full: np.ndarray, budget: int, n_sink: int, group: int):
    """kept[t][layer][head] of the source's own eval cache: ``enable_llama_duo_attention_eval`` on a model of
    ``PositionAttention`` layers, each forward through ``llama_duo_attention_forward_one_way_reordered``."""
    source = source_functions()
    layers, heads = full.shape
    model = nn.Module()
    model.config = types.SimpleNamespace(model_type="llama")
    model.model = nn.Module()
    model.model.layers = nn.ModuleList()
    for _ in range(layers):
        block = nn.Module()
        block.self_attn = PositionAttention(heads, group)
        model.model.layers.append(block)
    source["enable_llama_duo_attention_eval"](model, full.astype(float), n_sink, budget - n_sink)
    past = [None] * layers
    kept = []
    with torch.no_grad():
        for forward in forwards:
            n = forward.positions.numel()
            hidden = torch.zeros(1, n, heads * group * 2)
            hidden[0, :, 0] = forward.positions.float()
            hidden[0, :, 1] = 1.0
            row = []
            for i, block in enumerate(model.model.layers):
                _, _, past[i] = block.self_attn.forward(hidden, (None, None), None, past[i], use_cache=True)
                sets = [None] * heads
                for cache in past[i]:  # (full, streaming): [2 x bsz, heads, seq, 2], keys first
                    for j in range(cache.shape[1]):
                        entries = cache[0, j]
                        head = int(entries[0, 1])
                        assert bool((entries[:, 1] == head).all())
                        sets[head] = set(entries[:, 0].long().tolist())
                row.append(sets)
            kept.append(row)
    return kept


@needs_mirror
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize(("budget", "n_sink", "prompt"), [(12, 4, 24), (8, 0, 5), (20, 16, 30)])
def test_transcription(budget, n_sink, prompt, group):
    """``reference`` holds what the source's own eval cache holds after every forward: the harness's forwards, and
    ``pred.py``'s shape of them (the prompt's last 4 tokens one by one, for its 50); sparsities 0, 0.5 and 1."""
    gates = random_gates(7, 3, 3)
    forwards = synthetic_forwards(0, group=group, prompt=prompt, layers=3, kv_heads=3, steps=30, head_dim=2)
    for sparsity in (0, 0.5, 1):
        full = choose_full(gates, sparsity)
        for stream in (forwards, split_prompt(forwards, min(prompt - 1, 4))):
            assert source_kept(stream, full, budget, n_sink, group) == reference(stream, full, budget, n_sink)


def test_budget_at_sink(tmp_path):
    """Difference 2: kvbench refuses B <= S, where the source's ``recent_size`` is 0 or less."""
    path = write_gates(tmp_path / "gates.tsv", np.array([[1.0, 0.0]]))
    forwards = synthetic_forwards(0, group=1, prompt=6, layers=1, kv_heads=2, steps=1, head_dim=2)
    for budget in (4, 3):
        with pytest.raises(KvbenchError, match="must exceed n_sink"):
            run_cache(press(path, 0.5, 4), budget, forwards)


@needs_mirror
def test_source_one_kv_head(tmp_path):
    """Difference 2: with one KV head per layer the source's ``np.loadtxt`` gives a vector and its eval setup
    raises; the heads it would choose are the rule's on the [L, 1] gates."""
    path = write_gates(tmp_path / "gates.tsv", np.array([[0.2], [0.9], [0.5]]))
    gates = load_gates(path)
    assert gates.shape == (3,)
    source = source_functions()
    state = np.random.get_state()
    try:
        np.random.seed(42)
        theirs, _ = source["sparsify_attention_heads"](gates.copy(), None, sparsity=0.5)
    finally:
        np.random.set_state(state)
    assert np.array_equal(theirs[:, None] > 0.5, choose_full(gates.reshape(3, 1), 0.5))
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList()
    for _ in range(3):
        block = nn.Module()
        block.self_attn = PositionAttention(1, 7)
        model.model.layers.append(block)
    with pytest.raises(IndexError):
        source["enable_llama_duo_attention_eval"](model, theirs, 4, 8)


@needs_mirror
def test_source_recent_zero():
    """Difference 2: ``recent_size`` 0 (B = S) raises in the source's compression (271-275)."""
    forwards = synthetic_forwards(0, group=1, prompt=6, layers=1, kv_heads=2, steps=1, head_dim=2)
    with pytest.raises(RuntimeError):
        source_kept(forwards, np.array([[True, False]]), 4, 4, 1)
