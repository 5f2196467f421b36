"""Sweeps: grid expansion and validation, sharding, kill/resume, concurrent writers, failures, Ray."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvbench.errors import ConfigError
from kvbench.runs.sweep import execute_local, read_grid, shard, status
from kvbench.store import ResultStore
from tests.conftest import fail_on_call

HEADER = "model,press,budget,dataset,num_samples,max_new_tokens,seed,batch_size,press_args\n"


def grid(tmp_path, body, name="grid.csv"):
    path = tmp_path / name
    path.write_text(HEADER + body)
    return path


def planned_keys(runs):
    return {(s.run_key, f"arith-{i}") for s in status(runs) for i in range(s.examples)}


def stored_keys(store):
    rows = ResultStore(store).read(columns=["run_key", "example_id"]).to_pylist()
    return [(r["run_key"], r["example_id"]) for r in rows]


def test_grid_expansion(tmp_path):
    runs = read_grid(grid(tmp_path, "tiny-llama,full,,arith,2,4,0,1,\n"
                                    "tiny-llama,h2o|snapkv-d,16|32|64,arith,2,4,0,1,\n"
                                    "tiny-llama,h2o,16,arith,2,4,0|1,1,recent_ratio=0;normalize=true\n"
                                    "tiny-llama,h2o,16,arith,2,4,0,1,\n"))  # a duplicate of one expanded run
    assert len(runs) == 1 + 6 + 2
    labels = [(r.config.presses[0], r.config.budgets[0], r.config.seed, r.config.press_args) for r in runs]
    assert labels[0] == ("full", None, 0, ())
    assert ("snapkv-d", 64, 0, ()) in labels
    assert ("h2o", 16, 1, ("recent_ratio=0", "normalize=true")) in labels
    assert [r.line for r in runs] == [2] + [3] * 6 + [4] * 2


def test_shards_partition_the_plan_stably(tmp_path):
    path = grid(tmp_path, "tiny-llama,h2o|snapkv-d|knorm|tova|random,8|16|32,arith,2,4,0,1,\n")
    runs = read_grid(path)
    for n in (1, 2, 3, 4, 7):
        parts = [shard(runs, i, n) for i in range(n)]
        assert sorted((r for p in parts for r in p), key=runs.index) == runs  # each run exactly once
        assert [shard(read_grid(path), i, n) for i in range(n)] == parts  # the same on every read


@pytest.mark.parametrize(("body", "message"), [
    ("tiny-llama,h2o,16,arith,2,4,0,1,\n", None),
    ("tiny-llama,nope,16,arith,2,4,0,1,\n", "line 2, column 'press': unknown press 'nope'"),
    ("tiny-llama,h2o,16|0,arith,2,4,0,1,\n", "line 2, column 'budget': --budget must be >= 1"),
    ("tiny-llama,h2o,16,arith,two,4,0,1,\n", "line 2, column 'num_samples': 'two' is not a valid num_samples"),
    ("tiny-llama,h2o,,arith,2,4,0,1,\n", "line 2, column 'budget': press 'h2o' evicts: give a budget"),
    ("tiny-llama,h2o,16,nope,2,4,0,1,\n", "line 2, column 'dataset': unknown dataset 'nope'"),
    ("tiny-llama,h2o,16,arith,2,4,0,1,window=3\n", "line 2, column 'press_args'"),
    ("tiny-llama,h2o,16,arith,2,4,0,1,,extra\n", "line 2: more cells than columns"),
])
def test_malformed_grid_fails_before_generation(tmp_path, body, message):
    path = grid(tmp_path, "tiny-llama,full,,arith,2,4,0,1,\n" + body)
    if message is None:
        assert len(read_grid(path)) == 2
        return
    with pytest.raises(ConfigError, match=message.replace("2,", "3,").replace("line 2", "line 3")
                       .replace("(", r"\(").replace(")", r"\)")):
        read_grid(path)


def test_unknown_column_is_named(tmp_path):
    path = tmp_path / "g.csv"
    path.write_text("model,press,budget,dataset,colour\ntiny-llama,h2o,16,arith,red\n")
    with pytest.raises(ConfigError, match="unknown column 'colour'"):
        read_grid(path)


def sweep_cmd(*args):
    return [sys.executable, "-m", "kvbench", "sweep", *map(str, args)]


def test_kill_and_resume_stores_every_planned_row_exactly_once(tmp_path):
    path = grid(tmp_path, "tiny-llama,full|h2o|snapkv-d|streaming_llm,16,arith,4,24,0,1,\n")
    store = tmp_path / "store"
    proc = subprocess.Popen(sweep_cmd(path, "--store", store), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(store.glob("part-*.parquet"))) < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-way, no chance to clean up
    proc.wait()
    interrupted = len(stored_keys(store))
    assert 0 < interrupted < 16
    resumed = subprocess.run(sweep_cmd(path, "--store", store), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    keys = stored_keys(store)
    assert len(keys) == len(set(keys)) == 16  # no duplicates, no loss
    assert set(keys) == planned_keys(read_grid(path, store=str(store)))
    assert not list(store.glob(".*.tmp")) or all(p.name.startswith(".") for p in store.glob(".*.tmp"))


def test_two_concurrent_shards_on_one_store(tmp_path):
    path = grid(tmp_path, "tiny-llama,full|h2o|tova,8|16,arith,3,12,0,1,\n")
    store = tmp_path / "store"
    procs = [subprocess.Popen(sweep_cmd(path, "--store", store, "--shard", f"{i}/2"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    keys = stored_keys(store)
    planned = planned_keys(read_grid(path, store=str(store)))
    assert len(keys) == len(set(keys)) and set(keys) == planned  # union complete, no duplicates


def test_the_same_plan_twice_at_once_never_duplicates(tmp_path):
    path = grid(tmp_path, "tiny-llama,h2o|snapkv-d,8,arith,3,12,0,1,\n")
    store = tmp_path / "store"
    procs = [subprocess.Popen(sweep_cmd(path, "--store", store), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0
    keys = stored_keys(store)
    assert len(keys) == len(set(keys)) == 6


def test_failures_are_recorded_and_retried(tmp_path, monkeypatch):
    import kvbench.engine.generate as engine

    runs = read_grid(grid(tmp_path, "tiny-llama,h2o,16,arith,4,6,0,1,\n"), store=str(tmp_path / "s"))
    fail_on_call(monkeypatch, engine, "generate", 2, "CUDA out of memory. Tried to allocate 2.00 GiB")
    assert execute_local(runs) == 3  # the sweep went on past the failure
    (state,) = status(runs)
    assert (state.stored, state.failed, state.pending) == (3, 1, 0)
    (failure,) = ResultStore(tmp_path / "s").failures()
    assert failure["error"].startswith("RuntimeError: CUDA out of memory")
    assert execute_local(runs) == 0  # a plain rerun leaves recorded failures alone
    assert execute_local(runs, retry_failed=True) == 1
    (state,) = status(runs)
    assert (state.stored, state.failed, state.pending) == (4, 0, 0)
    keys = stored_keys(tmp_path / "s")
    assert len(keys) == len(set(keys)) == 4


def test_ray_executor_on_a_local_cluster(tmp_path):
    pytest.importorskip("ray")
    path = grid(tmp_path, "tiny-llama,full|h2o,8,arith,2,6,0,1,\ntiny-qwen2,snapkv-d,8,arith,2,6,0,1,\n")
    store = tmp_path / "store"
    result = subprocess.run(sweep_cmd(path, "--store", store, "--executor", "ray"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    keys = stored_keys(store)
    assert len(keys) == len(set(keys)) == 6
    assert set(keys) == planned_keys(read_grid(path, store=str(store)))


def test_shipped_grids_validate(monkeypatch):
    from pathlib import Path

    from tests.conftest import SHARED_DATA, require_shared_data

    root = Path(__file__).resolve().parents[1]
    assert len(read_grid(root / "grids" / "cpu-small.csv")) == 9
    require_shared_data("drop/dev.jsonl")  # the paper grid's datasets need the local data here (no hub access)
    monkeypatch.setenv("KVBENCH_DATA_DIR", str(SHARED_DATA))
    runs = read_grid(root / "grids" / "paper.csv")
    assert len(runs) == 4 * 8 * (1 + 5 * 4)
    assert {r.config.max_new_tokens for r in runs} == {2048} and {r.config.num_samples for r in runs} == {100}


@pytest.mark.parametrize(("grid", "protocol", "presses"), [
    ("paper.csv", "kvbench", {"full", "hott-h2o-fixed", "knorm", "hott-rkv-fixed", "hott-snapkv-d-fixed",
                              "streaming_llm"}),
    ("paper-hott.csv", "hott", {"full", "hott-h2o", "hott-knorm", "hott-rkv", "hott-snapkv-d", "hott-streaming_llm"}),
])
def test_paper_grids_validate(monkeypatch, tmp_path, grid, protocol, presses):
    """The paper's settings: 4 models x 8 datasets x (full + 5 presses x 4 budgets), 100 questions, 2048 tokens."""
    from kvbench.results.references import RowIdentity, comparable
    from tests.conftest import SHARED_DATA, require_shared_data

    require_shared_data()
    monkeypatch.setenv("KVBENCH_DATA_DIR", str(SHARED_DATA))
    runs = read_grid(Path(__file__).parents[1] / "grids" / grid, store=str(tmp_path))
    configs = [r.config for r in runs]
    assert len(configs) == 4 * 8 * (1 + 5 * 4) == 672
    assert {c.protocol for c in configs} == {protocol} and {c.presses[0] for c in configs} == presses
    assert {(c.num_samples, c.max_new_tokens, c.temperature) for c in configs} == {(100, 2048, None)}
    matched = {comparable(RowIdentity(p, True, protocol)) for p in presses}
    papers = {"full", "h2o", "knorm", "rkv", "snapkv-d", "streaming_llm"}
    assert matched == ({None} if protocol == "kvbench" else papers)
