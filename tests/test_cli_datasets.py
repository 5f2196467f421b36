"""`kvbench score` and `kvbench datasets` end to end."""

import json

import pyarrow.parquet as pq

from kvbench.store import ResultStore
from kvbench.tasks.hub import files_digest
from tests.conftest import SHARED_DATA, require_shared_data
from tests.test_cli import kvbench


def test_score_rescores_stored_rows_and_counts_changes(tmp_path):
    store = tmp_path / "store"
    result = kvbench("run", "--model", "tiny-llama", "-p", "full", "-n", "3", "--max-new-tokens", "6",
                     "--store", str(store))
    assert result.returncode == 0, result.stderr
    # Simulate rows scored by an older, broken scorer: every row claims a wrong extraction.
    parts = sorted(store.glob("part-*.parquet"))
    for part in parts:
        rows = pq.read_table(part).to_pylist()
        for row in rows:
            row.update(extracted="999999", correct=True, metrics="{}")
        ResultStore(store).replace_part(part, rows)
    before = ResultStore(store).read().to_pylist()

    dry = kvbench("score", str(store), "--dry-run")
    assert dry.returncode == 0 and "3 would change" in dry.stdout and "0 parts rewritten" in dry.stdout
    assert ResultStore(store).read().to_pylist() == before

    done = kvbench("score", str(store))
    assert done.returncode == 0 and "re-scored 3 rows: 3 changed" in done.stdout, done.stdout
    after = ResultStore(store).read().to_pylist()
    assert all(r["extracted"] != "999999" for r in after)
    assert [r["response"] for r in after] == [r["response"] for r in before]  # nothing regenerated
    again = kvbench("score", str(store))
    assert "0 changed" in again.stdout


def test_score_leaves_teacher_forced_replays_alone(tmp_path):
    """A store with `kvbench fidelity` rows beside generations (as `make run`'s): replays have no score of their own;
    `score` used to stop on them with a traceback (found by the README-commands test)."""
    store = tmp_path / "store"
    for command in ("run", "fidelity"):
        result = kvbench(command, "--model", "tiny-llama", "-p", "full,h2o", "-b", "16", "-n", "2",
                         "--max-new-tokens", "6", "--store", str(store))
        assert result.returncode == 0, result.stderr
    before = ResultStore(store).read().to_pylist()
    replays = [r for r in before if r["kind"] == "fidelity"]
    assert replays and all(r["correct"] is None for r in replays)
    done = kvbench("score", str(store))
    assert done.returncode == 0, done.stderr
    assert "re-scored 4 rows: 0 changed" in done.stdout  # the 4 generations; the 4 replays untouched
    after = {(r["run_key"], r["example_id"]): r for r in ResultStore(store).read().to_pylist()}
    assert all(after[(r["run_key"], r["example_id"])]["correct"] is None for r in replays)


def test_score_on_an_empty_store_fails_clearly(tmp_path):
    result = kvbench("score", str(tmp_path))
    assert result.returncode == 2 and "no results in" in result.stderr


def test_datasets_list_show_validate():
    listing = kvbench("datasets", "list")
    assert listing.returncode == 0
    for name in ("gsm8k", "math500", "drop", "folio", "strategyqa", "arith"):
        assert name in listing.stdout
    env = {"KVBENCH_DATA_DIR": str(require_shared_data())}
    shown = kvbench("datasets", "show", "openbookqa", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "loaded 500 examples" in shown.stdout and "A. " in shown.stdout and "The answer is X" in shown.stdout
    fork = kvbench("datasets", "show", "openbookqa", "--protocol", "hott", env=env)
    assert fork.returncode == 0, fork.stderr
    assert "raw text (protocol hott" in fork.stdout and "Choices:\nA. " in fork.stdout
    assert "hott_exact_ci" in fork.stdout
    require_shared_data("drop/dev.jsonl")
    valid = kvbench("datasets", "validate", env=env)
    assert valid.returncode == 0, valid.stdout
    assert valid.stdout.count(" ok ") == 12


def test_datasets_validate_fails_on_missing_data(tmp_path):
    result = kvbench("datasets", "validate", "--data-dir", str(tmp_path))
    assert result.returncode == 1 and "failed" in result.stdout and "arith" in result.stdout


def test_run_on_a_real_dataset_stores_metrics(tmp_path):
    require_shared_data("drop/dev.jsonl")
    result = kvbench("run", "--model", "tiny-qwen2", "-d", "drop", "-n", "2", "--max-new-tokens", "4",
                     "-p", "snapkv-d", "-b", "16", "--store", str(tmp_path), env={"KVBENCH_DATA_DIR": str(SHARED_DATA)})
    assert result.returncode == 0, result.stderr
    rows = ResultStore(tmp_path).read().to_pylist()
    assert len(rows) == 2 and all(r["dataset"] == "drop" and r["split"] == "dev" for r in rows)
    digest = files_digest(SHARED_DATA / "drop" / "dev.jsonl")
    assert all(r["dataset_revision"] == f"local:sha256:{digest}" for r in rows)
    assert all(json.loads(r["metrics"]) in ({}, {"f1": json.loads(r["metrics"]).get("f1")}) for r in rows)


def test_run_works_for_every_dataset(tmp_path, monkeypatch):
    from kvbench.runs.plan import RunConfig, execute
    from kvbench.tasks import available

    require_shared_data("drop/dev.jsonl")
    monkeypatch.setenv("KVBENCH_DATA_DIR", str(SHARED_DATA))
    for name in available():
        _, cells = execute(RunConfig(model="tiny-llama", presses=("h2o",), budgets=(32,), dataset=name,
                                     num_samples=1, max_new_tokens=3, store=str(tmp_path / name)))
        (row,) = cells[0].rows
        assert row["dataset"] == name and 1 <= row["output_tokens"] <= 3 and row["prompt_tokens"] > 32, name
