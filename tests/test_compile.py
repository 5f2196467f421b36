"""The compiled decoding step (``--compile``, ``kvbench.engine.compiled``): one graph for every decoding step of every
press that can compile, on the five tiny architectures, with output and kept sets equal to eager decoding.

Dynamo traces with a counting backend that runs the captured graph as it is (no code generation): that proves
``fullgraph=True`` (a graph break is an error) and counts compilations (a recompile is a second graph), in seconds.
"""

from __future__ import annotations

import pytest
import torch

from kvbench.engine.compiled import compile_refusal
from kvbench.engine.generate import generate
from kvbench.engine.settings import GenerationSettings
from kvbench.errors import KvbenchError
from kvbench.models.loading import build_tiny
from kvbench.presses import PRESSES, make_press
from kvbench.verify import ARCHITECTURES
from tests.conftest import TEST_ARGS, default_press

BUDGET = 16
PROMPTS = [[1 + (i * 7) % 50 for i in range(12)], [3 + (i * 5) % 40 for i in range(9)]]
#: 12-token prompts and a budget of 16: the first steps evict nothing, the rest evict every step (buffer 1).
STEPS = 72
COMPILABLE = sorted(name for name, cls in PRESSES.items() if compile_refusal(default_press(name), BUDGET) is None)
#: Allocation wrappers over presses that compile: their layers and heads keep different counts, given as tensors.
WRAPPED = ["adakv:snapkv-d", "pyramidkv:snapkv-d", "adakv:keydiff", "pyramidkv:scope"]


class CountingBackend:
    """A torch.compile backend that records each graph dynamo captures and runs it unchanged."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


@pytest.fixture(scope="module", params=ARCHITECTURES)
def model(request):
    model, _ = build_tiny(request.param)
    return model.eval()


def _run(model, press, backend=None, steps: int = STEPS):
    kept: list = []

    def record(cache, step):
        kept.append([cache.kept_positions(row) for row in range(len(PROMPTS))])

    outputs = generate(model, PROMPTS, press, BUDGET, GenerationSettings(max_new_tokens=steps), on_step=record,
                       compile_backend=backend)
    return outputs, kept


def test_the_compilable_presses_are_the_expected_ones():
    assert COMPILABLE == ["expected-attention", "full", "gkv", "h2o", "hott-h2o-fixed", "hott-snapkv-d-fixed",
                          "keydiff", "knorm", "morphkv", "quest", "random", "rlkv", "rpc", "scope", "sepllm",
                          "snapkv-d", "streaming_llm", "tova", "triattention"]


#: Presses that compile with other parameters than their defaults (rkv: in token order, not R-KV's cache order).
VARIANTS = {"rkv order=position": ("rkv", {**TEST_ARGS["rkv"], "order": "position"})}


@pytest.mark.parametrize("name", COMPILABLE + WRAPPED + list(VARIANTS))
def test_every_decoding_step_is_one_graph_equal_to_eager(model, name):
    """Among them: schedules that change with the sequence (keydiff, expected-attention, gkv, rpc, scope, rkv: a
    first compression at another count than the next ones), allocation (layers, heads keeping different counts),
    presses that keep fewer (sepllm, rlkv: counts read back after the graph) and a selection (quest)."""
    torch._dynamo.reset()
    # buffers and windows that evict within 72 steps
    name, args = VARIANTS.get(name, (name, TEST_ARGS.get(name.rsplit(":", 1)[-1])))
    press = make_press(name, args)
    backend = CountingBackend()
    compiled, compiled_kept = _run(model, press, backend)
    eager, eager_kept = _run(model, make_press(name, args))
    # fullgraph, and no recompilation over the 71 decoding steps: one graph for the steps at which no row evicts (the
    # cache filling), one for those at which some row does
    assert backend.graphs == (2 if press.evicts and not press.selects else 1)
    assert [o.tokens for o in compiled] == [o.tokens for o in eager]
    assert [o.finish_reason for o in compiled] == [o.finish_reason for o in eager]
    assert compiled_kept == eager_kept  # every layer and KV head, after every forward
    if press.evicts and not press.selects:
        assert all(o.evicted_tokens > 0 for o in compiled)
    if press.selects:  # the selection ran in the graph: attending to what quest chose is not the full cache
        full, _ = _run(model, make_press("full"))
        assert [o.tokens for o in compiled] != [o.tokens for o in full]


def test_steps_with_and_without_eviction_alternate_between_two_graphs_compiled_once(model):
    """Buffer 8: a sequence evicts one step in eight, the two rows at other steps; the steps at which no row evicts
    run the graph without scoring, the others the evicting one (which rows evict: a mask). No recompilation."""
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled, compiled_kept = _run(model, make_press("knorm", {"buffer": "8"}), backend)
    eager, eager_kept = _run(model, make_press("knorm", {"buffer": "8"}))
    assert backend.graphs == 2
    assert [o.tokens for o in compiled] == [o.tokens for o in eager] and compiled_kept == eager_kept


@pytest.mark.parametrize("name", sorted(set(PRESSES) - set(COMPILABLE)) + ["adakv:rkv", "pyramidkv:hott-knorm"])
def test_a_press_that_cannot_be_one_graph_is_refused_with_its_reason(name):
    """A wrapper, by its inner press's reason."""
    press = default_press(name)
    reason = compile_refusal(press, BUDGET)
    assert reason
    model, _ = build_tiny("tiny-llama")
    with pytest.raises(KvbenchError, match=f"--compile: {name} cannot decode as one graph: ") as error:
        generate(model, PROMPTS, press, BUDGET, GenerationSettings(max_new_tokens=4), compile_backend="eager")
    assert "\n" not in str(error.value)


class SlowBackend(CountingBackend):
    """Compiles for a second: what a compiling forward costs, so that it shows where it is counted."""

    def __call__(self, graph_module, example_inputs):
        import time

        time.sleep(1.0)
        return super().__call__(graph_module, example_inputs)


def test_the_forward_that_compiles_is_left_out_of_the_decoding_time():
    torch._dynamo.reset()
    model, _ = build_tiny("tiny-llama")
    settings = GenerationSettings(max_new_tokens=8)
    compiled = generate(model, PROMPTS, make_press("h2o"), BUDGET, settings, compile_backend=SlowBackend())
    eager = generate(model, PROMPTS, make_press("h2o"), BUDGET, settings)
    for out in compiled:  # both graphs compiled while both rows ran: the first step's, and the first eviction's
        assert out.compile_s >= 2.0
        assert out.decode_s < 1.0 and out.tokens_per_s == pytest.approx((out.output_tokens - 2) / out.decode_s)
    assert [o.compile_s for o in eager] == [None, None]
    assert [o.tokens for o in compiled] == [o.tokens for o in eager]


def test_attention_loss_is_not_measured_in_a_compiled_step():
    model, _ = build_tiny("tiny-llama")
    with pytest.raises(KvbenchError, match="attention loss"):
        generate(model, PROMPTS, make_press("h2o"), BUDGET, GenerationSettings(max_new_tokens=4),
                 measure_attention_loss=True, compile_backend="eager")


@pytest.mark.parametrize("name", ["snapkv-d", "keydiff", "sepllm", "adakv:snapkv-d"])
def test_continuous_batching_joins_run_in_the_same_graphs(name):
    """Five prompts through two rows: three joins after the first, each into the running batch's rows (its bucket),
    two graphs throughout (with and without eviction, each compiled once), outputs equal to eager continuous
    batching. keydiff's rows, joining at other steps, are at other points of its schedule (each row's count is a
    tensor); sepllm's token ids are spliced with the row."""
    from kvbench.engine.continuous import generate_continuous

    torch._dynamo.reset()
    model, _ = build_tiny("tiny-qwen2")
    prompts = [[1 + (i * k) % 50 for i in range(n)] for k, n in ((7, 12), (5, 9), (3, 20), (11, 6), (13, 15))]
    settings = GenerationSettings(max_new_tokens=40, eos_token_ids=(26,))  # ends four of the five early
    backend = CountingBackend()
    args = TEST_ARGS.get(name.rsplit(":", 1)[-1])
    compiled = generate_continuous(model, prompts, make_press(name, args), BUDGET, settings, 2,
                                   compile_backend=backend)
    eager = generate_continuous(model, prompts, make_press(name, args), BUDGET, settings, 2)
    assert backend.graphs == 2  # with and without eviction, each compiled once
    assert [o.tokens for o in compiled] == [o.tokens for o in eager]
    assert [o.evicted_tokens for o in compiled] == [o.evicted_tokens for o in eager]
    assert len({len(o.tokens) for o in compiled}) > 1  # sequences end at different steps: rows free and rejoin


def test_run_and_fidelity_compiled_store_what_eager_stores(tmp_path):
    """`run --compile` (batch 1, static and continuous batching) and `fidelity --compile` store the rows eager
    decoding stores, labelled with the backend (and keyed apart: a compiled graph may round differently)."""
    from kvbench.runs.plan import RunConfig, execute

    def rows(kind, compile, batch_size=1, batching="continuous"):
        config = RunConfig(model="tiny-llama", presses=("h2o", "snapkv-d"), budgets=(24,), num_samples=3,
                           max_new_tokens=16, store=str(tmp_path / f"{kind}{compile}{batch_size}{batching}"),
                           kind=kind, compile=compile, batch_size=batch_size, batching=batching)
        _, cells = execute(config)
        assert {r["compile"] for c in cells for r in c.rows} == {compile}
        assert all((r["compile_s"] is None) == (compile is None) for c in cells for r in c.rows)
        return {(c.press.name, r["example_id"]): (r["response"], r["evicted_tokens"], r["fidelity_top1"],
                                                  r["fidelity_kl_mean"]) for c in cells for r in c.rows}

    eager = rows("generate", None)
    assert len(eager) == 6
    assert rows("generate", "eager") == eager
    assert rows("generate", "eager", 2, "static") == eager
    assert rows("generate", "eager", 2, "continuous") == eager
    compiled, plain = rows("fidelity", "eager"), rows("fidelity", None)
    # the full cache's reference attends over its slots rounded up to LENGTH_BUCKET: the same tokens and top-1,
    # KL equal to float rounding (the masked slots change the order of the softmax's sums)
    assert {k: v[:3] for k, v in compiled.items()} == {k: v[:3] for k, v in plain.items()}
    assert [v[3] for v in compiled.values()] == pytest.approx([plain[k][3] for k in compiled], rel=1e-5)


@pytest.mark.parametrize("args, message", [
    (["-p", "shadowkv", "-b", "80"], "--compile: shadowkv cannot decode as one graph: its sparse attention"),
    (["-p", "rkv", "-b", "24"], "--compile: rkv cannot decode as one graph: it replays its source's physical cache"),
    (["-p", "adakv:hott-h2o", "-b", "24"], "--compile: adakv:hott-h2o cannot decode as one graph"),
    (["-p", "h2o", "-b", "24", "--measure", "attention-loss"], "--compile: --measure attention-loss"),
    (["-p", "h2o", "-b", "24", "--compile-backend", "tvm"], "--compile-backend 'tvm' is unknown"),
])
def test_compile_refusals_are_one_line_before_the_model_loads(tmp_path, args, message):
    from tests.test_cli import kvbench

    result = kvbench("run", "--model", "tiny-llama", *args, "--compile", "--store", str(tmp_path / "s"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("command", [["run", "-p", "h2o", "-b", "24"], ["bench", "-p", "h2o", "-b", "24"]])
def test_a_compile_backend_without_compile_is_refused_not_ignored(tmp_path, command):
    from tests.test_cli import kvbench

    result = kvbench(*command, "--model", "tiny-llama", "--compile-backend", "eager", "--store", str(tmp_path / "s"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: --compile-backend eager applies with --compile (give both)"], result.stderr
    assert not (tmp_path / "s").exists()
