"""Bad input, table-driven: exit 2, exactly one line on stderr, no model loaded, and the store left as it was."""

import sys

import pytest

import kvbench.models
from kvbench.cli import main

GRIDS = {
    "repeated_column.csv": "model,press,press,dataset\ntiny-llama,full,h2o,arith\n",
    "header_only.csv": "model,press,dataset,budget\n",
    "not_text.csv": b"model,press,dataset\n\xff\xfe\xfa,full,arith\n",
}

CASES = [
    # (arguments, a phrase of the one error line)
    (["run", "-p", "h2o", "-b", "64", "-a", "gqa=bogus"], "gqa must be one of mean, max"),
    (["run", "-p", "pyramidkv:snapkv-d", "-b", "64", "-a", "beta=nan"], "must be a finite number"),
    (["run", "-p", "rkv", "-b", "64", "-a", "threshold=inf"], "must be a finite number"),
    (["run", "-p", "streaming_llm", "-b", "64", "-a", "n_sink=-5"], "n_sink must be >= 0"),
    (["run", "-p", "knorm", "-b", "64", "-a", "recent_window=-1"], "recent_window must be >= 0"),
    (["run", "--temperature", "nan"], "must be finite"),
    (["run", "-p", ","], "give at least one press"),
    (["run", "-d", "../kvbench/datasets_cfg/gsm8k"], "unknown dataset"),
    (["run", "-d", "arith", "--dataset-revision", "main"], "does not apply"),
    (["sweep", "GRID/repeated_column.csv"], "column 'press' appears twice"),
    (["sweep", "GRID/header_only.csv"], "no runs"),
    (["sweep", "GRID/not_text.csv"], "not UTF-8 or UTF-16"),
    (["run", "-n", "1", "--store", "GRID/a_file"], "is a file, not a directory"),
    (["run", "-n", "1", "--store", "GRID/foreign"], "not a kvbench result part"),
    (["run", "-n", "1", "--store", "GRID/clash"], "column budget is string, not int64"),
    (["bench", "--warmup", "-1"], "--warmup must be >= 0"),
    (["run", "--dtype", "float64"], "unknown --dtype 'float64'"),
    (["run", "--model", "GRID/broken_model"], "config.json is not valid JSON"),
    (["run", "--device", "gpu7"], "bad --device 'gpu7'"),
    (["run", "-p", "h2o", "-b", "99999999999999999999"], "--budget must be >= 1 and <= 2^31"),
    (["report", "GRID", "--out", "GRID"], "is a directory"),
    (["report", "GRID", "--plots", "GRID/a_file"], "is a file"),
    (["score", "GRID/store", "-d", "nosuch"], "unknown dataset 'nosuch'"),
    (["bench", "-f", "bogus"], "unknown --format 'bogus'"),
    (["bench", "--store", "GRID/a_file"], "cannot write in"),
]


def _bad_stores(root):
    """A file where the store should be, a store holding a foreign Parquet file, one with a clashing column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "a_file").write_text("not a directory")
    (root / "broken_model").mkdir()
    (root / "broken_model" / "config.json").write_text("{not json")
    for name, table in (("foreign", pa.table({"x": [1, 2]})),
                        ("clash", pa.table({"run_key": ["k"], "example_id": ["e"], "sample": [0], "budget": ["big"]}))):
        (root / name).mkdir()
        pq.write_table(table, root / name / "part-0.parquet")


@pytest.fixture
def no_model_load(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded for bad input")

    monkeypatch.setattr(kvbench.models, "load", forbidden)


@pytest.mark.parametrize(("args", "phrase"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_one_line_and_exit_2(args, phrase, tmp_path, monkeypatch, capsys, no_model_load):
    for name, content in GRIDS.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    store = tmp_path / "store"
    store.mkdir()
    (store / "README").write_text("kept")
    _bad_stores(tmp_path)
    args = [a.replace("GRID", str(tmp_path)) for a in args]
    if "--store" not in args and args[0] in {"run", "sweep", "bench"}:
        args += ["--store", str(store)]
    monkeypatch.setattr(sys, "argv", ["kvbench", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and phrase in err, err
    assert sorted(p.name for p in store.iterdir()) == ["README"]
    assert all([p.name for p in (tmp_path / name).iterdir()] == ["part-0.parquet"] for name in ("foreign", "clash"))


def test_spreadsheet_grids_read_like_plain_utf8(tmp_path):
    from kvbench.sweep import read_grid

    text = "model,press,dataset,num_samples\ntiny-llama,full,arith,2\n"
    (tmp_path / "plain.csv").write_text(text)
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())  # Excel's "CSV UTF-8"
    (tmp_path / "utf16.csv").write_bytes(text.encode("utf-16"))
    plans = [read_grid(tmp_path / name) for name in ("plain.csv", "bom.csv", "utf16.csv")]
    assert [p.config for p in plans[0]] == [p.config for p in plans[1]] == [p.config for p in plans[2]]


def test_stale_failure_records_and_temp_files_are_cleared(tmp_path):
    """A kill between storing a row and clearing its failure leaves a record; a killed write leaves a temp file."""
    import os
    import time

    from kvbench.store import ResultStore
    from tests.synthetic_store import row

    store = ResultStore(tmp_path / "s")
    store.record_failure("k", "gsm8k-0", 0, "RuntimeError: out of memory", {})
    store.record_failure("k", "gsm8k-1", 0, "RuntimeError: out of memory", {})
    store.append([row("full", (), None, "gsm8k", 0, 1, run_key="k")])  # gsm8k-0 stored after all
    assert [f["example_id"] for f in store.failures("k")] == ["gsm8k-1"]
    store.clear_stale_failures("k")
    assert len(list((tmp_path / "s" / "failures").glob("*.json"))) == 1
    old, fresh = tmp_path / "s" / ".part-old.parquet.tmp", tmp_path / "s" / ".part-new.parquet.tmp"
    old.write_text("x")
    fresh.write_text("x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    store.append([row("full", (), None, "gsm8k", 1, 1, run_key="k")])
    assert not old.exists() and fresh.exists()  # a write in flight elsewhere is left alone
