"""Continuous batching gives what batch 1 gives, token for token and eviction for eviction, and stores each row as
its example finishes."""

import pytest
import torch

from kvbench.engine.continuous import ContinuousGeneration, generate_continuous
from kvbench.engine.decode import Hooks
from kvbench.engine.generate import GenerationSettings, generate
from kvbench.models import build_tiny
from kvbench.presses import make_press
from tests.conftest import ALL_PRESSES, ARCHS, TEST_ARGS, default_press, prompt_ids

BUDGET = 12


def _prompts(tokenizer) -> list[list[int]]:
    """Seven prompts of different lengths, some above the budget (compressed at their prefill)."""
    ids = (prompt_ids(tokenizer) * 3)[:31]
    return [ids[:31], ids[5:14], ids[:22], ids[3:7], ids[2:25], ids[:11], ids[7:30]]


def _telemetry(out) -> tuple:
    return (out.tokens, out.finish_reason, out.prompt_tokens, out.evicted_tokens, out.peak_kv_bytes,
            out.mean_cache_len, out.kv_byte_steps, out.looped)


def _compare(model, tokenizer, press_name: str, settings: GenerationSettings, batch_size: int = 3,
             measure: bool = True) -> list:
    prompts = _prompts(tokenizer)
    make = lambda: make_press(press_name, TEST_ARGS.get(press_name))  # noqa: E731
    critical = [[1, 2, 3, 5] for _ in prompts] if measure else None
    alone = [generate(model, [p], make(), BUDGET, settings, seeds=[i], measure_attention_loss=measure,
                      critical_positions=None if critical is None else [critical[i]])[0]
             for i, p in enumerate(prompts)]
    together = generate_continuous(model, prompts, make(), BUDGET, settings, batch_size, seeds=range(len(prompts)),
                                   hooks=Hooks(attention_loss=measure, critical_positions=critical))
    for i, (a, c) in enumerate(zip(alone, together)):
        assert _telemetry(c) == _telemetry(a), f"sequence {i}"
        if measure:
            torch.testing.assert_close(c.attention_loss, a.attention_loss, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(c.retention, a.retention, equal_nan=True)
    return alone


def _early_eos(model, tokenizer, press_name: str, n_new: int) -> tuple[int, ...]:
    """An EOS that ends some sequences early, so rows free up at different steps."""
    press = make_press(press_name, TEST_ARGS.get(press_name))
    free = [o.tokens for o in generate(model, _prompts(tokenizer), press, BUDGET,
                                       GenerationSettings(max_new_tokens=n_new))]
    eos = next((t for t in free[1][4:] if sum(t in other for other in free) < len(free)), None)
    return () if eos is None else (eos,)


@pytest.mark.parametrize("press_name", [p for p in ALL_PRESSES
                                        if not default_press(p).sparse and default_press(p).batch_invariant])
def test_continuous_equals_batch_one_for_every_press(tiny_llama, press_name):
    model, tokenizer = tiny_llama
    settings = GenerationSettings(max_new_tokens=40, seed=1, eos_token_ids=_early_eos(model, tokenizer, press_name, 40))
    alone = _compare(model, tokenizer, press_name, settings)
    lengths = {len(o.tokens) for o in alone}
    assert len(lengths) > 1, "every sequence ran equally long: no row was ever freed early"
    if default_press(press_name).evicts and not default_press(press_name).selects:
        assert sum(o.evicted_tokens for o in alone) > 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("press_name", ["snapkv-d", "adakv:snapkv-d", "random"])
def test_continuous_equals_batch_one_on_every_architecture(arch, press_name):
    model, tokenizer = build_tiny(arch)
    model.eval()
    settings = GenerationSettings(max_new_tokens=30, seed=1, eos_token_ids=_early_eos(model, tokenizer, press_name, 30))
    _compare(model, tokenizer, press_name, settings, batch_size=2, measure=False)


def test_continuous_sampling_and_repetition_penalty_equal_batch_one(tiny_llama):
    model, tokenizer = tiny_llama
    settings = GenerationSettings(max_new_tokens=24, temperature=0.9, top_p=0.9, top_k=50, repetition_penalty=1.3,
                                  seed=7, eos_token_ids=_early_eos(model, tokenizer, "h2o", 24))
    _compare(model, tokenizer, "h2o", settings, batch_size=4, measure=False)


def test_continuous_teacher_forcing_equals_batch_one(tiny_llama):
    model, tokenizer = tiny_llama
    prompts = _prompts(tokenizer)
    forced = [prompt_ids(tokenizer)[: 5 + 4 * i] for i in range(len(prompts))]
    settings = GenerationSettings(max_new_tokens=40)
    alone = [generate(model, [p], make_press("snapkv-d"), BUDGET, settings, forced_tokens=[forced[i]],
                      record_logits=True)[0] for i, p in enumerate(prompts)]
    together = generate_continuous(model, prompts, make_press("snapkv-d"), BUDGET, settings, 3, forced_tokens=forced,
                                   hooks=Hooks(record_logits=True))
    for a, c in zip(alone, together):
        assert _telemetry(c) == _telemetry(a) and c.finish_reason == "forced"
        torch.testing.assert_close(torch.stack(c.logits), torch.stack(a.logits), atol=1e-4, rtol=1e-4)


def test_rows_leave_and_join_the_running_batch(tiny_llama):
    """A short sequence's row takes the next prompt while the long ones go on; each output comes out as it ends."""
    model, tokenizer = tiny_llama
    prompts = _prompts(tokenizer)
    forced = [prompt_ids(tokenizer)[:n] for n in (30, 3, 30, 3, 3, 30, 3)]
    admitted: list[int] = []
    stream = ContinuousGeneration(model, prompts, make_press("h2o"), BUDGET, GenerationSettings(max_new_tokens=30),
                                  3, forced_tokens=forced, on_admit=admitted.append)
    order = [index for finished in stream.steps() for index, _ in finished]
    assert sorted(order) == list(range(7))
    # 1, 3 and 4 pass through one row while 0 and 2 go on; 5 takes that row next, 6 the row 0 leaves
    assert order == [1, 3, 4, 0, 2, 6, 5]
    assert admitted == list(range(7))
    assert len(stream.decoder.rows) == 1  # nothing left to join: finished rows left the batch, 5 decodes alone
    assert stream.decoder.step <= 3 + 3 + 3 + 30  # static batches of three would take 30 + 30 + 3 forwards


def test_continuous_refuses_what_it_cannot_splice(tiny_llama):
    model, tokenizer = tiny_llama
    with pytest.raises(ValueError, match="continuous batching"):
        ContinuousGeneration(model, [[1, 2]], make_press("shadowkv"), 16, GenerationSettings(), 2)
    with pytest.raises(ValueError, match="continuous batching"):
        ContinuousGeneration(model, [[1, 2]], make_press("h2o"), 16, GenerationSettings(), 2,
                             hooks=Hooks(on_step=lambda cache, step: None))


def test_run_stores_each_row_as_it_finishes_and_a_failure_loses_only_rows_in_flight(tmp_path, monkeypatch):
    from kvbench.engine.cache import BudgetCache
    from kvbench.runs.plan import RunConfig, execute
    from kvbench.store import ResultStore
    from tests.conftest import fail_on_call

    def config(store, batch_size):
        return RunConfig(model="tiny-llama", presses=("h2o",), budgets=(16,), num_samples=6, max_new_tokens=12,
                         store=str(tmp_path / store), batch_size=batch_size)

    rows_seen = []
    store = ResultStore(tmp_path / "s")
    fail_on_call(monkeypatch, BudgetCache, "splice_row", 5, "CUDA out of memory. Tried to allocate 2.00 GiB")
    execute(config("s", 3), on_example=lambda cell, example: rows_seen.append(len(store.parts())))
    failed = {f["example_id"] for f in store.failures()}
    stored = store.read(["example_id"]).column("example_id").to_pylist()
    # Only the examples decoding when the fifth one was taken in failed; the sixth began afterwards and finished.
    assert 1 <= len(failed) <= 4 and len(stored) == 6 - len(failed) and not failed & set(stored)
    assert rows_seen[-1] == len(stored) and rows_seen == sorted(rows_seen)  # stored one by one, as each finished
    monkeypatch.undo()
    execute(config("s", 3), retry_failed=True)

    def rows(path):
        table = ResultStore(tmp_path / path).read(["example_id", "response", "evicted_tokens", "peak_kv_bytes"])
        return sorted(tuple(r.values()) for r in table.to_pylist())

    execute(config("one", 1))
    assert rows("s") == rows("one") and not ResultStore(tmp_path / "s").failures()


def test_a_failure_before_any_example_begins_fails_the_chunk_and_ends(tmp_path, monkeypatch):
    import kvbench.engine.continuous as continuous
    from kvbench.runs.plan import RunConfig, execute
    from kvbench.store import ResultStore
    from tests.conftest import fail_on_call

    fail_on_call(monkeypatch, continuous, "build_cache", 1, "CUDA out of memory. Tried to allocate 9.00 GiB")
    execute(RunConfig(model="tiny-llama", presses=("h2o",), budgets=(16,), num_samples=4, max_new_tokens=8,
                      store=str(tmp_path / "s"), batch_size=2))
    assert len(ResultStore(tmp_path / "s").failures()) == 4 and not ResultStore(tmp_path / "s").parts()


def test_a_press_that_is_not_batch_invariant_runs_one_sequence_at_a_time(tmp_path):
    from kvbench.runs.plan import RunConfig, execute
    from kvbench.store import ResultStore

    def rows(batch_size):
        store = str(tmp_path / f"b{batch_size}")
        execute(RunConfig(model="tiny-llama", presses=("hott-knorm", "knorm"), budgets=(16,), num_samples=3,
                          max_new_tokens=12, store=store, batch_size=batch_size))
        table = ResultStore(store).read(["press", "example_id", "response", "batch_size", "batching"]).to_pylist()
        return sorted(tuple(r.values()) for r in table)

    three, one = rows(3), rows(1)
    assert {(r[0], r[3], r[4]) for r in three} == {("hott-knorm", 1, "static"), ("knorm", 3, "continuous")}
    assert [r[:3] for r in three] == [r[:3] for r in one]
