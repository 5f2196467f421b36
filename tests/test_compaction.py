"""The store at scale: small parts merged atomically (killed at any point: no row lost, none counted twice; beside
a concurrent writer), parts written by other tools read as kvbench's, readers projecting and filtering."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from kvbench.errors import StoreError
from kvbench.store import SCHEMA, ResultStore, compaction
from kvbench.store.compaction import compact
from tests.synthetic_store import row


def one_row_parts(path, n, run="r", start=0):
    store = ResultStore(path)
    for i in range(start, start + n):
        store.append([row("h2o", (), 64, "gsm8k", i, i % 2, run_key=run, example_id=f"e{i}")])
    return store


def keys(store):
    table = store.read(["run_key", "example_id"])
    return sorted(zip(table["run_key"].to_pylist(), table["example_id"].to_pylist()))


def test_compaction_merges_the_small_parts_into_one_and_keeps_every_row(tmp_path):
    store = one_row_parts(tmp_path, 30)
    one_row_parts(tmp_path, 5, run="other")
    before = store.read().sort_by([("run_key", "ascending"), ("example_id", "ascending")])
    done = compact(store)
    assert (done.parts, done.merged, done.rows) == (35, 35, 35) and len(store.parts()) == 1
    after = store.read().sort_by([("run_key", "ascending"), ("example_id", "ascending")])
    assert after.equals(before)
    assert store.done("r") == {(f"e{i}", 0) for i in range(30)}
    assert not (tmp_path / "compactions").exists() or not list((tmp_path / "compactions").iterdir())
    assert compact(store).merged == 0  # one part: nothing to do


def test_many_one_row_parts_merge_into_few_row_groups_scanned_in_slices(tmp_path, monkeypatch):
    # a row group per one-row part held each group's metadata in memory: 20,000 parts took 6 GB (now 0.5 GB)
    monkeypatch.setattr(compaction, "SCAN_PARTS", 7)  # several scan slices, one of them short
    store = one_row_parts(tmp_path, 40)
    before = keys(store)
    assert compact(store).rows == 40
    (merged,) = store.parts()
    assert pq.read_metadata(merged).num_row_groups == 1 and keys(store) == before


def test_row_groups_are_bounded_by_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(compaction, "ROW_GROUP_BYTES", 1)  # every batch fills a group
    store = one_row_parts(tmp_path, 5)
    compact(store)
    assert pq.read_metadata(store.parts()[0]).num_row_groups == 5


def test_a_run_compacts_only_its_own_parts(tmp_path):
    store = one_row_parts(tmp_path, 4, run="a")
    one_row_parts(tmp_path, 3, run="b")
    assert compact(store, {"a"}).merged == 4
    assert sorted(pq.read_metadata(p).num_rows for p in store.parts()) == [1, 1, 1, 4]


@pytest.mark.parametrize("stop_after", ["journal", "rename", "one deletion"])
def test_a_compaction_killed_at_any_step_loses_and_duplicates_nothing(tmp_path, monkeypatch, stop_after):
    store = one_row_parts(tmp_path, 6)
    expected = keys(store)
    real_replace, real_unlink = os.replace, os.unlink
    calls = {"replace": 0, "unlink": 0}

    class Killed(BaseException):
        pass

    def replace(src, dst):
        calls["replace"] += 1
        if stop_after == "journal" and calls["replace"] == 2:  # the journal is in place, the merged part is not
            raise Killed
        real_replace(src, dst)
        if stop_after == "rename" and calls["replace"] == 2:  # merged part in place, nothing deleted
            raise Killed

    def unlink(path, *args, **kwargs):
        calls["unlink"] += 1
        real_unlink(path, *args, **kwargs)
        if stop_after == "one deletion":
            raise Killed

    monkeypatch.setattr(compaction.os, "replace", replace)
    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(Killed):
        compact(store)
    monkeypatch.undo()
    assert keys(store) == expected and sorted(store.done("r")) == [(f"e{i}", 0) for i in range(6)]
    assert compact(store).rows in (0, 6)  # finishes what the killed one left, then merges what remains
    assert keys(store) == expected and len(store.parts()) == 1 and not list((tmp_path / "compactions").iterdir())


def test_kill_9_during_compaction_beside_a_writer(tmp_path):
    """A real ``kill -9`` at random moments of compactions of 1,500 one-row parts while another process appends:
    after each kill every row is read exactly once; at the end, after a finishing compaction, too."""
    one_row_parts(tmp_path, 1500)
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys; sys.path.insert(0, '.'); from tests.test_compaction import one_row_parts\n"
        f"one_row_parts({str(tmp_path)!r}, 300, run='w')")], cwd=os.getcwd())
    store = ResultStore(tmp_path)
    for delay in (0.3, 0.7, 1.1, 0.5, 0.9):
        merger = subprocess.Popen([sys.executable, "-c", (
            "from kvbench.store.compaction import compact; from kvbench.store import ResultStore\n"
            f"compact(ResultStore({str(tmp_path)!r}))")])
        time.sleep(delay)
        merger.send_signal(signal.SIGKILL)
        merger.wait()
        found = keys(store)
        assert len(found) == len(set(found)) and {k for k in found if k[0] == "r"} == {("r", f"e{i}")
                                                                                      for i in range(1500)}
    writer.wait()
    assert writer.returncode == 0
    compact(store)
    found = keys(store)
    assert len(found) == len(set(found)) == 1800 and len(store.parts()) == 1


def test_parts_written_by_other_tools_read_as_kvbenchs(tmp_path):
    store = one_row_parts(tmp_path, 3)
    original = store.read()
    pandas_part, large_part = tmp_path / "part-9-pandas.parquet", tmp_path / "part-9-large.parquet"
    frame = pd.read_parquet(store.parts()[0])
    frame["example_id"] = "p0"
    frame.to_parquet(pandas_part)  # pandas 3 writes strings as large_string, timestamps in its own unit
    table = pq.read_table(store.parts()[1]).set_column(list(SCHEMA.names).index("example_id"), "example_id",
                                                       pa.array(["l0"]))
    large = pa.schema([pa.field(f.name, pa.large_string()) if pa.types.is_string(f.type) else f for f in SCHEMA])
    pq.write_table(table.cast(large).drop_columns(["retention_profile"]), large_part)  # and an older part
    store.check_writable()
    assert {pq.read_schema(large_part).field("run_key").type, pq.read_schema(pandas_part).field("run_key").type} \
        >= {pa.large_string()}
    read = store.read()
    assert read.schema.equals(SCHEMA) and read.num_rows == 5
    assert set(read["example_id"].to_pylist()) == {"e0", "e1", "e2", "p0", "l0"}
    assert ResultStore.read_part(pandas_part).schema.equals(SCHEMA)
    compact(store)
    merged = store.read()
    assert merged.num_rows == 5 and merged.select(["correct", "output_tokens"]).num_rows == 5
    assert original.num_rows == 3


def test_a_column_of_another_kind_is_refused_with_one_line(tmp_path):
    store = one_row_parts(tmp_path, 2)
    table = pq.read_table(store.parts()[0])
    bad = table.set_column(list(SCHEMA.names).index("correct"), "correct", pa.array(["yes"]))
    pq.write_table(bad, tmp_path / "part-9-bad.parquet")
    with pytest.raises(StoreError, match=r"part-9-bad.parquet: column correct is string, not bool; move it out"):
        store.check_writable()
    with pytest.raises(StoreError, match="part-9-bad.parquet: column correct is string"):
        compact(store)
    assert len(store.parts()) == 3  # nothing merged, nothing lost


def test_readers_project_and_filter(tmp_path):
    store = one_row_parts(tmp_path, 6)
    one_row_parts(tmp_path, 2, run="other")
    table = store.read(["run_key", "correct"], where=ds.field("run_key") == "other")
    assert table.column_names == ["run_key", "correct"] and table.num_rows == 2
    assert {r["example_id"] for r in store.rows_of({"other"})} == {"e0", "e1"}


def test_a_journal_that_is_not_json_is_named(tmp_path):
    store = one_row_parts(tmp_path, 2)
    (tmp_path / "compactions").mkdir()
    (tmp_path / "compactions" / "x.json").write_text("not json")
    with pytest.raises(StoreError, match=r"compactions/x.json: not a kvbench compaction journal .*move it out"):
        store.parts()
