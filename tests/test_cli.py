"""`kvbench run` end to end on a tiny model: Parquet rows with the documented schema, resume, bad input."""

import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from kvbench.runs.plan import RunConfig, execute, summarize
from kvbench.store import SCHEMA, ResultStore


def kvbench(*args, env=None):
    return subprocess.run([sys.executable, "-m", "kvbench", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_run_writes_rows_with_schema_and_resumes(tmp_path):
    store = tmp_path / "store"
    result = kvbench("run", "--model", "tiny-llama", "-p", "full,h2o", "-b", "24", "-n", "2",
                     "--max-new-tokens", "12", "--store", str(store))
    assert result.returncode == 0, result.stderr
    chatter = [ln for ln in result.stderr.splitlines() if ln.strip() and not ln.startswith(("loading", "generating"))]
    assert chatter == []  # kvbench's progress bar only, no library warnings: an error would be the only line
    assert "h2o" in result.stdout and "accuracy" in result.stdout
    parts = sorted(store.glob("part-*.parquet"))
    # one atomic part per (cell, example), each finished cell's parts then merged into one
    assert len(parts) == 2 and sorted(pq.read_metadata(p).num_rows for p in parts) == [2, 2]
    table = ResultStore(store).read()
    assert table.schema.equals(SCHEMA)
    assert pq.read_schema(parts[0]).names == SCHEMA.names
    rows = table.to_pylist()
    assert {r["press"] for r in rows} == {"full", "h2o"}
    assert {r["budget"] for r in rows} == {None, 24}
    for row in rows:
        assert row["output_tokens"] == 12 and row["finish_reason"] == "length"
        assert row["prompt_tokens"] > 24 and row["response"] is not None
        assert row["peak_kv_bytes"] > 0 and row["kvbench_version"]
    h2o = [r for r in rows if r["press"] == "h2o"]
    assert all(r["peak_kv_bytes"] == 25 * 3 * 2 * 32 * 4 for r in h2o)  # budget + buffer entries, fp32
    # a second identical run generates nothing new
    again = kvbench("run", "--model", "tiny-llama", "-p", "full,h2o", "-b", "24", "-n", "2",
                    "--max-new-tokens", "12", "--store", str(store))
    assert again.returncode == 0, again.stderr
    assert sorted(store.glob("part-*.parquet")) == parts


def test_execute_returns_scored_cells(tmp_path):
    config = RunConfig(model="tiny-qwen2", presses=("snapkv-d", "streaming_llm"), budgets=(16, 32),
                       num_samples=2, max_new_tokens=8, store=str(tmp_path))
    task, cells = execute(config)
    assert [(c.press.name, c.budget) for c in cells] == [("snapkv-d", 16), ("snapkv-d", 32),
                                                          ("streaming_llm", 16), ("streaming_llm", 32)]
    for cell in cells:
        summary = summarize(cell)
        assert summary["n"] == 2 and 0.0 <= summary["accuracy"] <= 1.0
    assert len({c.run_key for c in cells}) == 4


@pytest.mark.parametrize(("args", "message"), [
    (["-p", "nope", "-b", "8"], "unknown press 'nope'"),
    (["-p", "h2o", "-b", "0"], "--budget must be >= 1"),
    (["-p", "h2o", "-b", "x"], "is not an integer"),
    (["-p", "h2o"], "give at least one --budget"),
    (["-p", "h2o", "-b", "8", "-a", "recent_ratio"], "is not key=value"),
    (["-p", "h2o", "-b", "8", "-a", "recent_ratio=lots"], "not a valid float"),
    (["-p", "h2o", "-b", "8", "-a", "window_size=4"], "no selected press has a parameter 'window_size'"),
    (["-p", "h2o", "-b", "8", "-a", "snapkv-d.window_size=4"], "not selected"),
    (["-p", "h2o", "-b", "8", "-a", "recent_ratio=2"], "recent_ratio must be in [0, 1]"),
    (["-p", "h2o", "-b", "8", "-d", "nope"], "unknown dataset 'nope'"),
    (["-p", "h2o", "-b", "8", "--model", "not-a-model"], "model 'not-a-model' not found"),
    (["-p", "h2o", "-b", "8", "-n", "0"], "--num-samples must be >= 1"),
    (["-p", "rpc", "-b", "8", "-a", "buffer=8", "-a", "schedule=budget"], "rpc: buffer 8 must be below the budget 8"),
    (["-p", "rpc", "-b", "8", "-a", "pooling=median"], "pooling must be 'avg' or 'max'"),
    (["-p", "scope", "-b", "8", "-a", "prefill_budget=8"], "scope: prefill_budget 8 must be below the budget 8"),
    (["-p", "adakv", "-b", "8"], "'adakv' is a wrapper: adakv:snapkv-d"),
    (["-p", "adakv:full", "-b", "8"], "adakv: the 'full' press does not evict"),
    (["-p", "pyramidkv:h2o", "-b", "8", "-a", "beta=0.5"], "pyramidkv: beta must be >= 1"),
    (["-p", "adakv:shadowkv", "-b", "80"], "adakv: 'shadowkv' evicts nothing"),
    (["-p", "shadowkv", "-b", "40"], "shadowkv: budget 40 is below the 63 tokens"),
    (["-p", "shadowkv", "-b", "80", "--measure", "retention"], "shadowkv evicts nothing: --measure retention"),
    (["--protocol", "paper"], "unknown --protocol 'paper'"),
    (["--protocol", "hott"], "dataset arith has no 'hott' prompt"),
    (["--protocol", "hott", "-d", "gsm8k", "--system-prompt", "x"], "raw text without a chat template"),
    (["--temperature", "nan"], "must be finite numbers"),
    (["--repetition-penalty", "0"], "--repetition-penalty > 0"),
    (["--top-k", "-3"], "--top-k must be >= 0"),
])
def test_bad_input_fails_with_one_line(tmp_path, args, message):
    result = kvbench("run", "--model", "tiny-llama", *args, "--store", str(tmp_path / "s"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "s").exists()


def test_missing_local_data_names_the_fix(tmp_path):
    result = kvbench("run", "--model", "tiny-llama", "-d", "gsm8k", "-n", "1", "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert "gsm8k/test.jsonl not found" in result.stderr and "KVBENCH_DATA_DIR" in result.stderr


def test_presses_lists_every_press_with_defaults():
    result = kvbench("presses")
    assert result.returncode == 0
    for name in ("full", "streaming_llm", "h2o", "snapkv-d", "knorm", "rkv", "random", "tova"):
        assert name in result.stdout
    assert "window_size=32" in result.stdout and "buffer=128" in result.stdout


def test_run_key_separates_data_sources(monkeypatch):
    from kvbench.presses import make_press
    from kvbench.runs.plan import Cell, run_key
    from kvbench.tasks import load_task

    task = load_task("folio")
    cell = Cell(press=make_press("h2o"), budget=64)
    monkeypatch.delenv("KVBENCH_DATA_DIR", raising=False)
    hub = run_key(RunConfig(dataset="folio"), task, cell, None)
    local = run_key(RunConfig(dataset="folio", data_dir="/somewhere"), task, cell, None)
    assert hub != local
    assert hub == run_key(RunConfig(dataset="folio"), task, cell, None)


def test_run_key_comes_from_resolved_settings():
    """Settings that resolve to the same values are one run (one key: no rows pooled as replicates); ``auto`` on a
    CPU and on a GPU are not."""
    from kvbench.presses import make_press
    from kvbench.runs.plan import Cell, run_key
    from kvbench.tasks import load_task

    task, cell = load_task("arith"), Cell(press=make_press("h2o"), budget=64)
    keys = {dtype: run_key(RunConfig(dtype=dtype, device="cpu"), task, cell, None)
            for dtype in ("auto", "float32", "fp32", "bfloat16", "bf16")}
    assert keys["auto"] == keys["float32"] == keys["fp32"] != keys["bfloat16"] == keys["bf16"]
    assert run_key(RunConfig(temperature=0.0, device="cpu"), task, cell, None) == keys["auto"]
    assert run_key(RunConfig(top_p=0.5, device="cpu"), task, cell, None) == keys["auto"]  # greedy: top-p is moot


def test_batched_run_stores_the_same_rows_as_batch_one(tmp_path):
    """Static and continuous batching store what batch 1 stores, each row labelled with how it was batched."""
    def responses(batch_size, batching):
        config = RunConfig(model="tiny-llama", presses=("h2o", "snapkv-d"), budgets=(24,), num_samples=5,
                           max_new_tokens=16, store=str(tmp_path / f"b{batch_size}{batching}"), batch_size=batch_size,
                           batching=batching)
        _, cells = execute(config)
        assert {(r["batch_size"], r["batching"]) for c in cells for r in c.rows} == {
            (batch_size, "static" if batch_size == 1 else batching)}
        return {(c.press.name, r["example_id"]): (r["response"], r["output_tokens"], r["evicted_tokens"],
                                                  r["peak_kv_bytes"]) for c in cells for r in c.rows}

    single = responses(1, "continuous")
    assert len(single) == 10
    assert responses(3, "static") == single
    assert responses(3, "continuous") == single


def test_run_measures_attention_loss_into_the_store_and_report(tmp_path):
    import json

    from kvbench.results.plots import plot
    from kvbench.results.report import render

    config = RunConfig(model="tiny-llama", presses=("full", "h2o"), budgets=(16,), num_samples=2,
                       max_new_tokens=20, store=str(tmp_path / "s"), measure=("attention-loss",))
    _, cells = execute(config)
    full, h2o = cells
    assert all(r["attention_loss_mean"] == 0.0 == r["attention_loss_max"] for r in full.rows)
    for r in h2o.rows:
        assert 0.0 < r["attention_loss_mean"] <= r["attention_loss_max"] <= 1.0
        profile = json.loads(r["attention_loss_profile"])
        assert len(profile["per_layer"]) == 3 and len(profile["heatmap"]) == 3 and profile["bin_steps"] == 1
    text = render(tmp_path / "s", metric="attention_loss", fmt="markdown")
    assert "| full | 0.0 |" in text
    paths = plot(tmp_path / "s", tmp_path / "plots")
    assert (tmp_path / "plots" / "attention_loss__tiny-llama__arith__b16.png") in paths
    # without --measure the columns stay empty and the run key is unchanged from before the option existed
    plain = RunConfig(model="tiny-llama", presses=("h2o",), budgets=(16,), num_samples=2, max_new_tokens=20,
                      store=str(tmp_path / "p"))
    _, (cell,) = execute(plain)
    assert all(r["attention_loss_mean"] is None for r in cell.rows) and cell.run_key != h2o.run_key


def test_unknown_measurement_is_refused(tmp_path):
    result = kvbench("run", "--model", "tiny-llama", "-p", "h2o", "-b", "8", "--measure", "vibes",
                     "--store", str(tmp_path))
    assert result.returncode == 2 and "--measure 'vibes' is unknown" in result.stderr


def test_run_key_changes_with_a_press_revision(monkeypatch):
    """A press whose choices changed (knorm, random: revision 2) never reuses rows stored by its old code."""
    from kvbench.presses import make_press
    from kvbench.presses.knorm import KNormPress
    from kvbench.runs.plan import Cell, run_key
    from kvbench.tasks import load_task

    task = load_task("arith")
    cell = Cell(press=make_press("knorm"), budget=64)
    current = run_key(RunConfig(), task, cell, None)
    monkeypatch.setattr(KNormPress, "revision", 1)
    assert run_key(RunConfig(), task, cell, None) != current


def test_new_methods_run_into_the_store_and_report_device_and_host_bytes_apart(tmp_path):
    """ShadowKV's rows carry its host bytes; a wrapped press is its own label; the report shows both metrics."""
    from kvbench.results.report import render

    store = tmp_path / "s"
    config = RunConfig(model="tiny-llama", presses=("full", "shadowkv", "adakv:snapkv-d", "scope"), budgets=(64,),
                       num_samples=2, max_new_tokens=40, store=str(store))
    _, cells = execute(config)
    rows = {c.press.name: c.rows for c in cells}
    assert set(rows) == {"full", "shadowkv", "adakv:snapkv-d", "scope"}
    assert all(r["host_kv_bytes"] > 0 for r in rows["shadowkv"])
    assert all(r["host_kv_bytes"] == 0 for name in ("full", "adakv:snapkv-d", "scope") for r in rows[name])
    assert all(r["evicted_tokens"] > 0 for name in ("adakv:snapkv-d", "scope") for r in rows[name])
    host = render(str(store), metric="host_kv_mib", fmt="markdown")
    assert "shadowkv" in host and "adakv:snapkv-d" in render(str(store), metric="peak_kv_mib", fmt="markdown")


def test_hott_protocol_runs_the_forks_prompt_and_subset(tmp_path):
    import datasets

    from tests.conftest import SHARED_DATA, require_shared_data

    require_shared_data()
    store = tmp_path / "store"
    common = ["--model", "tiny-llama", "-d", "gsm8k", "-n", "2", "--max-new-tokens", "6", "--store", str(store),
              "--data-dir", str(SHARED_DATA)]
    for protocol in ("hott", "kvbench"):
        result = kvbench("run", "--protocol", protocol, *common)
        assert result.returncode == 0, result.stderr
        assert f"protocol {protocol}" in result.stdout
    rows = ResultStore(store).read().to_pylist()
    hott = [r for r in rows if r["protocol"] == "hott"]
    ours = [r for r in rows if r["protocol"] == "kvbench"]
    assert len(hott) == len(ours) == 2 and len({r["run_key"] for r in rows}) == 2
    drawn = datasets.Dataset.from_dict({"i": list(range(1319))}).shuffle(seed=42).select(range(2))["i"]
    assert {r["example_id"] for r in hott} == {f"gsm8k-{i}" for i in drawn}
    assert all("<|im_start|>" not in r["prompt"] and r["prompt"].endswith('"\\boxed{}".') for r in hott)
    assert all(r["prompt"].startswith("<|im_start|>user") for r in ours)
    rescored = kvbench("score", str(store))
    assert rescored.returncode == 0 and "re-scored 4 rows: 0 changed" in rescored.stdout, rescored.stdout
