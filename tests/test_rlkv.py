"""RLKV as a user runs it: the gates files it reads, what the run reports as held (full heads grow, compressed
heads hold sinks + recent), and its refusals.

The rule against the source itself: ``tests/reference/test_rlkv.py``.
"""

from __future__ import annotations

import pytest

from kvbench.engine.generate import generate
from kvbench.engine.settings import GenerationSettings
from kvbench.errors import KvbenchError
from kvbench.models import build_tiny
from kvbench.presses import PressError, make_press
from tests.conftest import TINY_GATES, prompt_ids


def _gates(tmp_path, rows: list[list[float]]) -> str:
    path = tmp_path / "adapter_weights.tsv"
    path.write_text("\n".join("\t".join(str(g) for g in row) for row in rows) + "\n")
    return str(path)


def test_full_heads_keep_everything_and_the_run_reports_what_is_held(tmp_path):
    """Gates 1 on layer 0's head 1 and layer 2's head 0 (sparsity 4/6 compresses the other four): those two keep
    every entry, the others 2 sinks + 6 recent; the entries reported are the mean over heads and layers."""
    gates = _gates(tmp_path, [[0.1, 0.9], [0.2, 0.3], [0.95, 0.05]])
    model, tokenizer = build_tiny("tiny-llama")
    press = make_press("rlkv", {"gates": gates, "sparsity": str(4 / 6), "n_sink": "2"})
    prompt = prompt_ids(tokenizer)[:20]
    seen = []

    def record(cache, step):
        seen.append((cache.kept_positions(0), cache.occupancy.entries(0)))

    (out,) = generate(model.eval(), [prompt], press, 8, GenerationSettings(max_new_tokens=10), on_step=record)
    for step, (kept, entries) in enumerate(seen):
        tokens = len(prompt) + step
        compressed = {0, 1, *range(tokens - 6, tokens)}
        assert kept == [[compressed, set(range(tokens))], [compressed, compressed], [set(range(tokens)), compressed]]
        assert entries == pytest.approx((2 * tokens + 4 * 8) / 6)
    assert out.evicted_tokens == pytest.approx(4 * (len(prompt) + 9 - 8) / 6)


def test_gates_of_another_model_are_one_clear_error(tmp_path):
    model, tokenizer = build_tiny("tiny-llama")
    press = make_press("rlkv", {"gates": _gates(tmp_path, [[0.5, 0.5, 0.1]] * 4), "n_sink": "2"})
    with pytest.raises(KvbenchError, match="gates for 4 layers x 3 KV heads; this model has 3 x 2"):
        generate(model.eval(), [prompt_ids(tokenizer)], press, 8, GenerationSettings(max_new_tokens=4))


@pytest.mark.parametrize(("args", "message"), [
    ({}, "give its gates, -a gates=FILE"),
    ({"gates": "/nonexistent/adapter_weights.tsv"}, "no gates file"),
    ({"gates": TINY_GATES, "sparsity": "1.5"}, "sparsity must be in [0, 1]"),
    ({"gates": TINY_GATES, "buffer": "4"}, "buffer does not apply"),
])
def test_bad_arguments_are_refused(args, message):
    with pytest.raises(PressError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_press("rlkv", args)


def test_bad_files_and_budgets_are_refused(tmp_path):
    ragged = tmp_path / "ragged.tsv"
    ragged.write_text("0.1\t0.2\n0.3\n")
    with pytest.raises(PressError, match="one row of finite gates per layer"):
        make_press("rlkv", {"gates": str(ragged)})
    with pytest.raises(KvbenchError, match="must exceed n_sink 16"):
        make_press("rlkv", {"gates": TINY_GATES}).cadence(16)
    with pytest.raises(PressError, match="keeps only the entries it wants"):
        make_press("pyramidkv:rlkv", {"gates": TINY_GATES})


def test_a_gates_file_rewritten_at_the_same_path_is_a_new_run(tmp_path):
    """The run key holds the gates file's contents, not only its path: stored rows of other gates are not reused."""
    from kvbench.runs.plan import RunConfig, execute

    path = _gates(tmp_path, [[0.1, 0.9], [0.2, 0.3], [0.95, 0.05]])
    config = RunConfig(model="tiny-llama", presses=("rlkv",), budgets=(8,), press_args=(f"gates={path}", "n_sink=2"),
                       num_samples=1, max_new_tokens=4, store=str(tmp_path / "store"))
    runs = []

    def count():
        made = []
        execute(config, on_example=lambda cell, example: made.append(example))
        runs.append(len(made))

    count()
    count()
    _gates(tmp_path, [[0.9, 0.1], [0.3, 0.2], [0.05, 0.95]])
    count()
    assert runs == [1, 0, 1]
