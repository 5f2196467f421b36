"""Bad input, table-driven: exit 2, exactly one line on stderr, no model loaded, and the store left as it was."""

import sys
from pathlib import Path

import pytest

import kvbench.models
from kvbench.cli import main

GRIDS = {
    "repeated_column.csv": "model,press,press,dataset\ntiny-llama,full,h2o,arith\n",
    "header_only.csv": "model,press,dataset,budget\n",
    "not_text.csv": b"model,press,dataset\n\xff\xfe\xfa,full,arith\n",
    "bad_dtype.csv": "model,press,dataset,dtype\ntiny-llama,full,arith,float32|float64\n",
    "bad_device.csv": "model,press,dataset,device\ntiny-llama,full,arith,gpu7\n",
    "bad_value.csv": "model,press,dataset,budget,press_args\ntiny-llama,h2o,arith,64,gqa=bogus\n",
    "broken_plugin.py": "from kvbench.presses.base import Press\nclass MyPress(Press:\n",
    "bad_plugins.py": (
        "from dataclasses import dataclass\nimport torch\nfrom kvbench.presses.base import Press\n\n"
        "@dataclass\nclass Raises(Press):\n    def score(self, view):\n        return {}['missing']\n\n"
        "@dataclass\nclass ReturnsNone(Press):\n    def score(self, view):\n        return None\n\n"
        "@dataclass\nclass ReturnsList(Press):\n    def score(self, view):\n        return [0.0]\n\n"
        "@dataclass\nclass WrongShape(Press):\n    def score(self, view):\n        return view.positions[0].float()\n\n"
        "@dataclass\nclass Integers(Press):\n    def score(self, view):\n        return view.positions\n\n"
        "@dataclass\nclass GivesNaN(Press):\n    def score(self, view):\n"
        "        return torch.full(view.valid.shape, float('nan'))\n\n"
        "@dataclass\nclass Unresolved(Press):\n    window: 'NoSuchType' = 1\n"
        "    def score(self, view):\n        return view.positions.float()\n\n"
        "@dataclass\nclass Listed(Press):\n    weights: list = None\n"
        "    def score(self, view):\n        return view.positions.float()\n"),
    "notes.txt": "not python at all: (\n",
    "empty.txt": "  \n",
    "gates43.tsv": "0.1\t0.2\t0.3\n" * 4,
    "empty_press.csv": "model,press,dataset\ntiny-llama,,arith\n",
    "plugin_grid.csv": "model,press,dataset,budget,press_args\ntiny-llama,"
                       f"{Path(__file__).parents[1] / 'examples' / 'my_press.py'}:ValueNormAttentionPress,arith,8,"
                       "window_size=abc\n",
}

ARITH = (Path(__file__).parents[1] / "datasets_cfg" / "arith.yaml").read_text()
#: dataset configs, each malformed in one way (written under $KVBENCH_DATASETS_CFG beside a good arith.yaml)
CONFIGS = {
    "badgen": ARITH.replace("name: arith", "name: badgen").replace("generator: arith", "generator: nosuch"),
    "badsize": ARITH.replace("name: arith", "name: badsize").replace("size: 200", "size: ten"),
    "badbrace": ARITH.replace("name: arith", "name: badbrace").replace("{question}", "{question"),
    "badversion": ARITH.replace("name: arith", "name: badversion").replace("version: 1", "version: one"),
    "badname": ARITH,  # says name: arith
    "badfield": ARITH.replace("name: arith", "name: badfield").replace("{question}", "{passage}"),
    "repeated": ARITH.replace("name: arith", "name: repeated").replace(
        "builtin: {generator: arith, seed: 0, size: 200, fields: {id: id, question: question, gold: answer}}",
        "local: {dir: repeated, split: test, fields: {id: id, question: question, gold: answer}}"),
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
    (["run", "-d", "../datasets_cfg/gsm8k"], "unknown dataset"),
    (["run", "-d", "arith", "--dataset-revision", "main"], "does not apply"),
    (["sweep", "GRID/repeated_column.csv"], "column 'press' appears twice"),
    (["sweep", "GRID/header_only.csv"], "no runs"),
    (["sweep", "GRID/not_text.csv"], "not UTF-8 or UTF-16"),
    (["run", "-n", "1", "--store", "GRID/a_file"], "is a file, not a directory"),
    (["run", "-n", "1", "--store", "GRID/foreign"], "not a kvbench result part"),
    (["run", "-n", "1", "--store", "GRID/clash"], "column budget is string, not int64"),
    (["bench", "--warmup", "-1"], "--warmup must be >= 0"),
    (["bench", "--workload", "runs"], "--workload must be step or run"),
    (["bench", "--workload", "run"], "every --batch-size >= 2"),
    (["bench", "--workload", "run", "--batch-size", "4", "--examples", "0"], "--examples >= 1"),
    (["bench", "--workload", "run", "--batch-size", "4", "--ops"], "apply to --workload step"),
    (["bench", "--workload", "run", "--batch-size", "4", "-p", "shadowkv"], "cannot take a sequence"),
    (["run", "--batching", "dynamic"], "--batching 'dynamic' is unknown"),
    (["run", "--dtype", "float64"], "unknown --dtype 'float64'"),
    (["run", "--model", "GRID/broken_model"], "config.json is not valid JSON"),
    (["run", "--device", "gpu7"], "bad --device 'gpu7'"),
    (["run", "-p", "h2o", "-b", "99999999999999999999"], "--budget must be >= 1 and <= 2^31"),
    (["report", "GRID", "--out", "GRID"], "is a directory"),
    (["report", "GRID", "--plots", "GRID/a_file"], "is a file"),
    (["score", "GRID/store", "-d", "nosuch"], "unknown dataset 'nosuch'"),
    (["bench", "-f", "bogus"], "unknown --format 'bogus'"),
    (["bench", "--store", "GRID/a_file"], "cannot write in"),
    # press values
    (["run", "-p", "snapkv-d", "-b", "64", "-a", "pooling=bogus"], "pooling must be"),
    (["run", "-p", "rkv", "-b", "64", "-a", "window_size=0"], "window_size and kernel_size must be >= 1"),
    (["run", "-p", "rkv", "-b", "64", "-a", "mix_lambda=nan"], "must be a finite number"),
    (["fidelity", "-p", "h2o", "-b", "64", "-a", "gqa=bogus"], "gqa must be one of mean, max"),
    # generation settings
    (["run", "--top-p", "0"], "--top-p in (0, 1]"),
    (["run", "--top-k", "-1"], "--top-k must be >= 0"),
    (["run", "--repetition-penalty", "0"], "--repetition-penalty > 0"),
    (["run", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["run", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["run", "--measure", "bogus"], "--measure 'bogus' is unknown"),
    (["run", "--protocol", "hott", "--system-prompt", "be brief"], "--system-prompt does not apply"),
    # grids: settings checked for every run before the first
    (["sweep", "GRID/bad_dtype.csv"], "unknown --dtype 'float64'"),
    (["sweep", "GRID/bad_device.csv"], "bad --device 'gpu7'"),
    (["sweep", "GRID/bad_value.csv"], "column 'press_args'"),
    (["sweep", "GRID/header_only.csv", "--dry-run"], "no runs"),
    (["sweep", "GRID/bad_dtype.csv", "--store", "GRID/clash"], "column budget is string"),
    # dataset configs
    (["run", "-d", "badgen"], "unknown generator 'nosuch'"),
    (["run", "-d", "badsize"], "size must be a positive integer"),
    (["run", "-d", "badbrace"], "write a literal brace"),
    (["run", "-d", "badversion"], "version must be a positive integer"),
    (["run", "-d", "badname"], "is not the file's name"),
    (["run", "-d", "badfield"], "uses passage, which the builtin layout lacks"),
    (["run", "-d", "repeated", "--data-dir", "GRID/data"], "example id 'a' appears 2 times"),
    (["datasets", "show", "badgen"], "unknown generator 'nosuch'"),
    (["score", "GRID/store", "-d", "badversion"], "version must be a positive integer"),
    # stores and outputs
    (["score", "GRID/foreign"], "not a kvbench result part"),
    (["report", "GRID/clash"], "column budget is string"),
    (["report", "GRID/store", "-f", "bogus"], "bogus"),
    (["report", "GRID/store", "-m", "bogus"], "bogus"),
    (["report", "GRID/store", "--reference", "bogus"], "bogus"),
    (["report", "GRID/bench_corrupt", "--bench"], "unreadable Parquet part"),
    (["bench", "--store", "GRID/bench_corrupt"], "unreadable Parquet part"),
    (["bench", "--store", "GRID/bench_foreign"], "not a kvbench bench part"),
    (["run", "-n", "1", "--store", "GRID/truncated"], "unreadable Parquet part"),
    (["bench", "-p", "nosuch"], "unknown press 'nosuch'"),
    (["bench", "--batch-size", "0"], "--batch-size"),
    (["bench", "--dtype", "float64"], "unknown --dtype 'float64'"),
    (["bench", "--model", "r1-qwen-7b"], "use it with --random-weights"),
    (["report", "GRID/bench_corrupt", "--bench", "-f", "bogus"], "unknown --format 'bogus'"),
    (["score", "GRID/store"], "no results in"),
    # plug-in presses and `kvbench verify`
    (["run", "-p", "nosuch_module_x:MyPress", "-b", "8"], "cannot import 'nosuch_module_x'"),
    (["run", "-p", "kvbench.presses.base:Press", "-b", "8"], "evicts but does not define score(view)"),
    (["run", "-p", "kvbench.presses.base:protect", "-b", "8"], "protect is not a subclass"),
    (["run", "-p", "GRID/broken_plugin.py:MyPress", "-b", "8"], "failed: SyntaxError"),
    (["sweep", "GRID/plugin_grid.csv"], "not a valid int"),
    (["bench", "-p", "GRID/nofile.py:MyPress"], "no file"),
    (["verify", "nosuch"], "unknown press 'nosuch'"),
    (["verify", "h2o", "--check", "bogus"], "--check 'bogus' is unknown"),
    (["verify", "h2o", "--arch", "gpt2"], "--arch 'gpt2' is not a tiny model"),
    (["verify", "h2o", "-a", "recent_ratio=nan"], "must be a finite number"),
    # plug-in presses that misbehave: refused at their first call, on a made-up cache, before any model loads
    (["run", "-p", "GRID/bad_plugins.py:Raises", "-b", "8"], "score() raised KeyError"),
    (["run", "-p", "GRID/bad_plugins.py:ReturnsNone", "-b", "8"], "must return a tensor"),
    (["run", "-p", "GRID/bad_plugins.py:ReturnsList", "-b", "8"], "returned list"),
    (["run", "-p", "GRID/bad_plugins.py:WrongShape", "-b", "8"], "returned shape (2, 12), expected (1, 2, 12)"),
    (["run", "-p", "GRID/bad_plugins.py:Integers", "-b", "8"], "torch.int64 scores"),
    (["run", "-p", "GRID/bad_plugins.py:GivesNaN", "-b", "8"], "returned NaN for a valid slot"),
    (["bench", "-p", "GRID/bad_plugins.py:GivesNaN"], "returned NaN for a valid slot"),
    (["run", "-p", "adakv:GRID/bad_plugins.py:Raises", "-b", "8"], "score() raised KeyError"),
    (["run", "-p", "GRID/bad_plugins.py:Unresolved", "-b", "8", "-a", "window=3"], "annotations do not resolve"),
    (["run", "-p", "GRID/bad_plugins.py:Listed", "-b", "8", "-a", "weights=1"], "cannot set"),
    (["run", "-p", "GRID/notes.txt:Press", "-b", "8"], "notes.txt"),
    # outputs, values and usage
    (["inspect", "--out", "GRID/a_file/sub"], "is a file, not a directory"),
    (["inspect", "--out", "GRID/inspect_dir"], "inspect.html is a directory"),
    (["run", "--batch-size", "99999999999999999999"], "--batch-size must be >= 1 and <= 2^31"),
    (["run", "--max-new-tokens", "99999999999999999999"], "--max-new-tokens must be >= 1 and <= 2^31"),
    (["run", "--protocol", ""], "unknown --protocol ''"),
    (["run", "-n", "abc"], "Invalid value for '--num-samples'"),
    (["run", "--batch-size", "abc"], "Invalid value for '--batch-size'"),
    (["inspect", "--example", "abc"], "Invalid value for '--example'"),
    (["report", "GRID/store", "extra"], "unexpected extra argument"),
    (["sweep", "GRID/empty_press.csv"], "line 2: the 'press' cell is empty"),
    (["run", "--model", "GRID/unknown_type"], "model_type 'nosuchtype' is not one transformers"),
    # store internals
    (["run", "-n", "1", "--store", "GRID/locks_file"], "is a file where kvbench keeps its locks folder"),
    (["run", "-n", "1", "--store", "GRID/failures_file"], "is a file where kvbench keeps its failures folder"),
    (["run", "-n", "1", "--store", "GRID/bad_failure", "--retry-failed"], "not a kvbench failure record"),
    (["run", "-n", "1", "--store", "GRID/keyless_failure"], "not a kvbench failure record"),
    (["report", "GRID/bad_args"], "press_args that are not a JSON object"),
    (["store", "compact", "GRID/foreign"], "not a kvbench result part"),
    # a press that reads per-model statistics, and the command that writes them
    (["run", "-p", "triattention", "-b", "64"], "give its calibration statistics, -a stats=FILE"),
    (["run", "-p", "triattention", "-b", "64", "-a", "stats=GRID/none.pt"], "no statistics file"),
    (["run", "-p", "triattention", "-b", "64", "-a", "stats=GRID/notes.txt"], "is not a TriAttention statistics"),
    (["run", "-p", "triattention", "-b", "64", "-a", "stats=GRID/notes.txt", "-a", "aggregation=median"],
     "aggregation must be 'mean' or 'max'"),
    (["run", "-p", "adakv:triattention", "-b", "64"], "give its calibration statistics"),
    (["run", "-p", "sepllm", "-b", "64"], "must exceed n_init + sep_cache_size + local_size = 292"),
    (["run", "-p", "sepllm", "-b", "400", "-a", "separators=13;11"], "separators must be 'auto' or token ids"),
    (["run", "-p", "sepllm", "-b", "400", "-a", "local_size=0"], "local_size must be >= 1"),
    (["calibrate", "--text", "GRID/none.txt", "--out", "GRID/s.pt"], "no such file"),
    (["calibrate", "--text", "GRID/empty.txt", "--out", "GRID/s.pt"], "is empty"),
    (["calibrate", "--text", "GRID/notes.txt", "--out", "GRID/s.pt", "--max-tokens", "1"], "at least 2"),
    (["calibrate", "--text", "GRID/notes.txt", "--out", "GRID"], "cannot be written"),
    (["calibrate", "-p", "h2o", "--text", "GRID/notes.txt", "--out", "GRID/s.pt"], "computes data for triattention"),
    (["calibrate", "-p", "rlkv", "--text", "GRID/notes.txt", "--out", "GRID/g.tsv", "--context-max", "10"],
     "--context-max must be at least --context-min"),
    (["calibrate", "-p", "rlkv", "--text", "GRID/notes.txt", "--out", "GRID/g.tsv", "--lr", "nan"],
     "--lr must be a positive number"),
    (["run", "-p", "rlkv", "-b", "80"], "give its gates, -a gates=FILE"),
    (["run", "-p", "rlkv", "-b", "80", "-a", "gates=GRID/notes.txt"], "is not a table of numbers"),
    (["run", "--model", "tiny-llama", "-p", "rlkv", "-b", "8", "-a", "gates=GRID/gates43.tsv", "-a", "n_sink=2"],
     "holds gates for 4 layers x 3 KV heads; this model has 3 x 2"),
    (["calibrate", "-p", "rlkv", "--text", "GRID/notes.txt", "--out", "GRID/g.tsv", "--context-min", "300"],
     "--sink + --recent (384) must be below --context-min (300)"),
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
    (root / "truncated").mkdir()
    pq.write_table(pa.table({"run_key": ["k"], "example_id": ["e"], "sample": [0]}), root / "part.parquet")
    (root / "truncated" / "part-0.parquet").write_bytes((root / "part.parquet").read_bytes()[:-20])
    for name, data in (("bench_corrupt", b"PAR1 not really"), ("bench_foreign", None)):
        (root / name / "bench").mkdir(parents=True)
        part = root / name / "bench" / "part-0.parquet"
        part.write_bytes(data) if data else pq.write_table(pa.table({"x": [1]}), part)
    for name in ("locks_file", "failures_file"):
        (root / name).mkdir()
        (root / name / name.split("_")[0]).write_text("a file, not a folder")
    for name, text in (("bad_failure", "{not json"), ("keyless_failure", '{"error": "oom"}')):
        (root / name / "failures").mkdir(parents=True)
        (root / name / "failures" / "x.json").write_text(text)
    (root / "inspect_dir" / "inspect.html").mkdir(parents=True)
    (root / "unknown_type").mkdir()
    (root / "unknown_type" / "config.json").write_text('{"model_type": "nosuchtype"}')
    from tests.synthetic_store import row

    (root / "bad_args").mkdir()
    pq.write_table(pa.Table.from_pylist([row("h2o", (), 64, "gsm8k", 0, 1, press_args="not json")],
                                        schema=_schema()), root / "bad_args" / "part-0.parquet")
    config_dir = root / "cfg"
    config_dir.mkdir()
    (config_dir / "arith.yaml").write_text(ARITH)
    for name, text in CONFIGS.items():
        (config_dir / f"{name}.yaml").write_text(text)
    (root / "data" / "repeated").mkdir(parents=True)
    (root / "data" / "repeated" / "test.jsonl").write_text(
        '{"id": "a", "question": "1+1?", "answer": "2"}\n{"id": "a", "question": "2+2?", "answer": "4"}\n')


def _schema():
    from kvbench.store import SCHEMA

    return SCHEMA


@pytest.fixture
def no_model_load(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded for bad input")

    monkeypatch.setattr(kvbench.models, "load", forbidden)
    monkeypatch.setattr(kvbench.models, "build_tiny", forbidden)


@pytest.mark.parametrize(("args", "phrase"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_one_line_and_exit_2(args, phrase, tmp_path, monkeypatch, capsys, no_model_load):
    for name, content in GRIDS.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    store = tmp_path / "store"
    store.mkdir()
    (store / "README").write_text("kept")
    _bad_stores(tmp_path)
    monkeypatch.setenv("KVBENCH_DATASETS_CFG", str(tmp_path / "cfg"))
    for variable in ("TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY", "HF_HUB_VERBOSITY",
                     "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        monkeypatch.setenv(variable, "error")  # main() defaults them: restored for the tests that follow
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
    for name in ("foreign", "clash", "truncated", "bad_args"):
        assert [p.name for p in (tmp_path / name).iterdir()] == ["part-0.parquet"]


def test_spreadsheet_grids_read_like_plain_utf8(tmp_path):
    from kvbench.runs.sweep import read_grid

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


LIBRARY_CHATTER = """
import sys, warnings
if sys.argv[1] == "quiet":
    from kvbench.quiet import quiet_libraries
    quiet_libraries()
from huggingface_hub.utils import logging as hub_logging
from transformers.utils import logging as transformers_logging
transformers_logging.get_logger("transformers.models").warning("deprecated argument")
hub_logging.get_logger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
warnings.warn("`torch_dtype` is deprecated", FutureWarning)
"""


@pytest.mark.parametrize("mode", ["quiet", "loud"])
def test_library_warnings_stay_off_stderr(mode):
    """What the CLI does first: the libraries' warnings (and hub retries) do not reach stderr; the control shows
    that they would."""
    import os
    import subprocess

    clean = {k: v for k, v in os.environ.items() if not k.endswith("VERBOSITY") and "ADVISORY" not in k}
    result = subprocess.run([sys.executable, "-c", LIBRARY_CHATTER, mode], capture_output=True, text=True,
                            timeout=120, env=clean)
    assert result.returncode == 0, result.stderr
    if mode == "quiet":
        assert result.stderr == ""
    else:
        assert all(s in result.stderr for s in ("deprecated argument", "Retrying", "torch_dtype")), result.stderr


def test_the_gguf_conversion_bar_is_off_while_kvbench_shows_its_own(capsys):
    """transformers' GGUF conversion calls tqdm directly, past its own progress-bar switch; the control draws."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from kvbench.quiet import no_library_progress_bars

    with no_library_progress_bars():
        list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
    assert capsys.readouterr().err == ""
    list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
    assert "Converting" in capsys.readouterr().err


def test_num_samples_beyond_a_generator_is_capped_at_its_size():
    """``-n 1000000000`` on the built-in generator used to hang generating: it takes the declared size."""
    from kvbench.tasks import load_examples, load_task

    task = load_task("arith")
    examples = load_examples(task, 10**9)
    assert len(examples) == task.builtin["size"] == 200
    assert [e.id for e in examples] == [e.id for e in load_examples(task)]


def test_a_dry_run_reads_a_store_it_may_not_write(tmp_path, monkeypatch):
    """``sweep --dry-run`` only reads the store: a read-only store is refused for a sweep, not for a dry run."""
    import os

    from kvbench.errors import KvbenchError
    from kvbench.runs.sweep import read_grid

    (tmp_path / "grid.csv").write_text("model,press,dataset,num_samples\ntiny-llama,full,arith,2\n")
    (tmp_path / "store").mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # no write permission (the tests run as root)
    assert len(read_grid(tmp_path / "grid.csv", str(tmp_path / "store"), write=False)) == 1
    with pytest.raises(KvbenchError, match="cannot write in"):
        read_grid(tmp_path / "grid.csv", str(tmp_path / "store"))


def test_a_full_disk_leaves_no_temp_file_and_one_line(tmp_path, monkeypatch):
    """Disk full while writing a part (a row, or a failure record): a StoreError, and no empty temp file left."""
    import errno

    import pyarrow.parquet as pq

    from kvbench.errors import StoreError
    from kvbench.store import ResultStore
    from tests.synthetic_store import row

    def full_disk(table, where, *args, **kwargs):
        Path(where).write_bytes(b"PAR1")  # what a write cut short leaves
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full_disk)
    store = ResultStore(tmp_path / "s")
    with pytest.raises(StoreError, match="No space left on device"):
        store.append([row("full", (), None, "gsm8k", 0, 1, run_key="k")])
    monkeypatch.setattr(Path, "write_text", lambda self, text: full_disk(None, self))
    with pytest.raises(StoreError, match="cannot record a failure"):
        store.record_failure("k", "gsm8k-0", 0, "RuntimeError: out of memory", {})
    assert [p.name for p in (tmp_path / "s").rglob("*") if p.is_file()] == []
