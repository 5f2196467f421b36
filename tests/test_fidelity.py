"""Teacher-forced fidelity: exact at budgets beyond the length, positive KL when evicting, deterministic."""

import pytest

from kvbench.presses import PRESSES
from kvbench.runs.plan import RunConfig, execute
from tests.conftest import TEST_ARGS, fail_on_call

EVICTING = [p for p in PRESSES if p != "full"]
COLUMNS = ("fidelity_kl_mean", "fidelity_kl_max", "fidelity_top1", "fidelity_rank_mean", "output_tokens")


def replay(tmp_path, budgets, name="s"):
    # RPC's published schedule keeps the whole prompt and drops a few reasoning tokens in 16: its budget variant
    args = {**TEST_ARGS, "shadowkv": {**TEST_ARGS["shadowkv"], "outlier_chunks": "0"}, "rpc": {"schedule": "budget"}}
    press_args = tuple(f"{press}.{key}={value}" for press, kv in args.items() for key, value in kv.items())
    config = RunConfig(model="tiny-llama", presses=tuple(PRESSES), budgets=budgets, press_args=press_args,
                       num_samples=2, max_new_tokens=16, store=str(tmp_path / name), kind="fidelity")
    _, cells = execute(config)
    return {(c.press.name, c.budget): c.rows for c in cells}


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    return replay(tmp_path_factory.mktemp("fidelity"), (8, 5000))


def test_budget_beyond_the_length_is_exact(cells):
    for press in PRESSES:
        for row in cells[(press, None if press == "full" else 5000)]:
            assert row["fidelity_kl_mean"] == pytest.approx(0.0, abs=1e-6), press
            assert row["fidelity_top1"] == 1.0 and row["fidelity_rank_mean"] == 0.0, press
            assert row["finish_reason"] == "forced" and row["kind"] == "fidelity"


@pytest.mark.parametrize("press", EVICTING)
def test_small_budget_has_positive_kl(cells, press):
    rows = cells[(press, 8)]
    assert len(rows) == 2 and all(r["fidelity_kl_mean"] > 0.01 for r in rows)
    if press == "shadowkv":  # evicts nothing: attends to at most the budget of the prompt, and every generated token
        assert all(r["mean_cache_len"] <= 8 + r["output_tokens"] for r in rows)
        assert all(r["mean_cache_len"] < r["prompt_tokens"] for r in rows)
    elif press == "quest":  # keeps every entry, attends a selection of them: the loss is all in the attention
        assert all(r["evicted_tokens"] == 0 for r in rows)
    else:
        assert all(r["evicted_tokens"] > 0 for r in rows)
    # the replay follows the full cache's tokens, whatever the press would have chosen
    full = {r["example_id"]: r["response"] for r in cells[("full", None)]}
    assert all(r["response"] == full[r["example_id"]] for r in rows)


def test_fidelity_is_deterministic(cells, tmp_path):
    again = replay(tmp_path, (8, 5000), name="again")
    for key, rows in cells.items():
        assert [tuple(r[c] for c in COLUMNS) for r in rows] == [tuple(r[c] for c in COLUMNS) for r in again[key]]


def test_fidelity_as_a_sweep_kind(tmp_path):
    from kvbench.runs.sweep import execute_local, read_grid
    from kvbench.store import ResultStore

    grid = tmp_path / "g.csv"
    grid.write_text("model,press,budget,dataset,num_samples,max_new_tokens,kind\n"
                    "tiny-qwen2,h2o|tova,8,arith,2,8,fidelity\ntiny-qwen2,h2o,8,arith,2,8,generate\n")
    runs = read_grid(grid, store=str(tmp_path / "s"))
    assert execute_local(runs) == 6
    rows = ResultStore(tmp_path / "s").read().to_pylist()
    assert sorted(r["kind"] for r in rows) == ["fidelity"] * 4 + ["generate"] * 2
    assert len({r["run_key"] for r in rows}) == 3


def test_a_failing_replay_is_recorded_and_the_cell_goes_on(tmp_path, monkeypatch):
    import kvbench.runs.fidelity as fidelity
    from kvbench.store import ResultStore

    fail_on_call(monkeypatch, fidelity, "replay", 1, "CUDA out of memory")
    config = RunConfig(model="tiny-llama", presses=("h2o",), budgets=(8,), num_samples=3, max_new_tokens=6,
                       store=str(tmp_path), kind="fidelity")
    _, (cell,) = execute(config)
    assert len(cell.rows) == 2
    (failure,) = ResultStore(tmp_path).failures()
    assert failure["error"] == "RuntimeError: CUDA out of memory"
    _, (cell,) = execute(config, retry_failed=True)
    assert len(cell.rows) == 3 and ResultStore(tmp_path).failures() == []
