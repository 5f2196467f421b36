"""Plug-in presses: a class named by module path or file, or installed under the `kvbench.presses` entry points,
runs wherever a press name is accepted and is labelled and keyed by what it is."""

import json
import os
from pathlib import Path

import pytest

from kvbench.presses import make_press, plugins, press_parameters
from kvbench.store import ResultStore
from tests.test_cli import kvbench

ROOT = Path(__file__).parents[1]
MODULE = "tests.plugin_presses:RecencyPress"
FILE = "examples/my_press.py:ValueNormAttentionPress"


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """A package installed on sys.path whose metadata declares the press `recency` (the test module's class)."""
    site = tmp_path / "site"
    info = site / "kvbench_test_plugins-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kvbench-test-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[kvbench.presses]\nrecency = {MODULE}\n")
    monkeypatch.syspath_prepend(str(site))
    plugins.installed.cache_clear()
    yield {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    plugins.installed.cache_clear()


def test_a_class_by_module_path_or_file_is_labelled_by_that_name_and_keyed_by_its_class():
    press = make_press(MODULE, {"n_sink": "3"})
    assert (press.name, press.origin, press.n_sink) == (MODULE, MODULE, 3)
    by_file = make_press(FILE)
    assert by_file.name == FILE
    assert by_file.origin == os.path.normpath("examples/my_press.py") + ":ValueNormAttentionPress"
    wrapped = make_press(f"adakv:{FILE}", {"window_size": "4"})
    assert wrapped.name == f"adakv:{FILE}" and wrapped.origin == by_file.origin and wrapped.inner.window_size == 4
    assert [p[0] for p in press_parameters(MODULE)] == ["buffer", "n_sink"]


def test_an_entry_point_press_is_found_by_name_and_listed(installed):
    press = make_press("recency")
    assert press.name == "recency" and press.origin == MODULE
    listing = kvbench("presses", env=installed)
    assert listing.returncode == 0, listing.stderr
    assert "recency" in listing.stdout and f"plug-in {MODULE}" in listing.stdout


def test_plugin_presses_run_in_run_sweep_and_bench(tmp_path, installed):
    store = tmp_path / "s"
    common = ["--model", "tiny-llama", "-n", "1", "--max-new-tokens", "24", "--store", str(store)]
    ran = kvbench("run", "-p", f"recency,{MODULE},{FILE}", "-b", "12", *common, env=installed)
    assert ran.returncode == 0, ran.stderr
    grid = tmp_path / "grid.csv"
    grid.write_text(f"model,press,dataset,budget,num_samples,max_new_tokens,press_args\n"
                    f"tiny-llama,recency,arith,12,1,24,n_sink=1\ntiny-llama,adakv:{FILE},arith,12,1,24,\n")
    swept = kvbench("sweep", str(grid), "--store", str(store), env=installed)
    assert swept.returncode == 0, swept.stderr
    rows = ResultStore(store).read().to_pylist()
    by_press = {(r["press"], json.loads(r["press_args"]).get("n_sink")): r for r in rows}
    assert set(by_press) == {("recency", 2), (MODULE, 2), (FILE, 4), ("recency", 1), (f"adakv:{FILE}", 4)}
    assert all(r["evicted_tokens"] > 0 for r in rows)
    # the same class under two names is stored twice, with different keys: its label says how it was named
    assert by_press[("recency", 2)]["run_key"] != by_press[(MODULE, 2)]["run_key"]
    assert by_press[("recency", 2)]["response"] == by_press[(MODULE, 2)]["response"]
    benched = kvbench("bench", "--model", "tiny-llama", "-p", f"recency,{FILE}", "-b", "8", "--prompt-len", "10",
                      "--gen-len", "16", "--warmup", "1", "-f", "csv", env=installed)
    assert benched.returncode == 0, benched.stderr
    assert "recency" in benched.stdout and FILE in benched.stdout


def test_a_report_never_pools_a_plugin_it_cannot_import_across_parameters():
    from kvbench.results.report import _press_label

    assert _press_label(MODULE, '{"buffer": 1, "n_sink": 2}', "kvbench")[0] == MODULE  # its defaults
    assert _press_label(MODULE, '{"buffer": 1, "n_sink": 5}', "kvbench")[0] == f"{MODULE}(n_sink=5)"
    gone = [_press_label("gone_module:MyPress", json.dumps({"buffer": 1, "k": k}), "kvbench")[0] for k in (1, 2)]
    assert gone == ["gone_module:MyPress(buffer=1, k=1)", "gone_module:MyPress(buffer=1, k=2)"]
