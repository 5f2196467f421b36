"""Batched decoding equals batch 1; no per-step growth once the cache is full; `kvbench bench` end to end."""

import pytest
import torch

from kvbench.presses import make_press
from kvbench.verify.invariants import allocated_per_step, no_growth
from kvbench.verify.outputs import batched
from kvbench.verify.subject import NotApplicable, Subject
from tests.conftest import ALL_PRESSES, TEST_ARGS, default_press, prompt_ids
from tests.test_cli import kvbench


@pytest.mark.parametrize("press_name", ALL_PRESSES)
@pytest.mark.parametrize("budget", [14, 28])  # 14: some prompts compressed at prefill; 28: all evict while decoding
def test_batched_output_equals_batch_one(tiny, press_name, budget):
    """`kvbench verify`'s batch check: prompts of different lengths decoded together give, token for token and
    eviction for eviction, what each gives alone, some ending early beside others that go on (a press that is not
    batch-invariant by design is not judged: runs decode it alone)."""
    model, tokenizer = tiny
    subject = Subject(model, tokenizer, lambda: make_press(press_name, TEST_ARGS.get(press_name)))
    if not default_press(press_name).batch_invariant:
        with pytest.raises(NotApplicable, match="one sequence at a time"):
            batched(subject, budget)
        return
    outcome = batched(subject, budget)
    assert outcome.status == "pass" and ", 0 ended early" not in outcome.worst, outcome


@pytest.mark.parametrize("press_name", [p for p in ALL_PRESSES if p != "full" and not default_press(p).selects])
def test_memory_per_step_does_not_grow_once_the_cache_is_full(tiny_llama, press_name):
    """`kvbench verify`'s no-growth check (RPC's published schedule grows by design: checked on its budget one;
    RLKV's full heads too: checked with every head compressed; quest keeps the full cache, as the full cache's
    control below)."""
    model, tokenizer = tiny_llama
    args = TEST_ARGS.get(press_name)
    if press_name == "rpc":
        args = {**args, "schedule": "budget"}
    if press_name == "rlkv":
        args = {**args, "sparsity": "1"}
    outcome = no_growth(Subject(model, tokenizer, lambda: make_press(press_name, args)))
    assert outcome.status == "pass", outcome


def test_allocation_meter_sees_the_full_cache_grow(tiny_llama):
    """Control: without eviction, attention over the growing cache allocates more at every step."""
    model, tokenizer = tiny_llama
    per_step = allocated_per_step(model, prompt_ids(tokenizer)[:20], make_press("full"), None, 90)
    assert min(per_step[70:90]) > max(per_step[20:40])


def test_bench_runs_presses_side_by_side_and_stores_them(tmp_path):
    store = tmp_path / "s"
    result = kvbench("bench", "--model", "tiny-llama", "-p", "snapkv-d,h2o", "-b", "8", "--prompt-len", "10",
                     "--gen-len", "16", "--batch-size", "1,2", "--memory-gib", "0.0006", "--max-batch", "64",
                     "--store", str(store), "-f", "csv")
    assert result.returncode == 0, result.stderr
    from kvbench.bench import results as bench_results

    df = bench_results.load_rows(store)
    side = df[df["setting"] == "side by side"]
    assert len(side) == 6 and set(side["batch"]) == {1, 2}
    assert (side[side["press"] == "full"]["ratio"] == 1.0).all()
    # KV held at peak: budget + buffer entries per head for a press, every token but the last for the full cache
    assert set(side[side["press"] != "full"]["entries_per_head"]) == {9}
    assert set(side[side["press"] == "full"]["entries_per_head"]) == {10 + 16 - 1}
    per_entry = 3 * 2 * 2 * 16 * 4  # layers x KV heads x (k, v) x head_dim x fp32
    one = side[(side["batch"] == 1) & (side["press"] == "h2o")].iloc[0]
    assert one["kv_mib"] * 2**20 == pytest.approx(9 * per_entry)
    # Within the same memory (weights 0.58 MB here), the presses fit a larger batch than the full cache
    from kvbench.models import build_tiny

    weights = sum(p.numel() * 4 for p in build_tiny("tiny-llama")[0].parameters())
    equal = df[df["setting"] != "side by side"].set_index("press")
    kept_window = 3 * 4 * 32 * 4  # layers x query heads x snapkv-d's window x fp32, per slot (CPU)
    kv_bytes = {"full": 25 * per_entry, "h2o": 9 * per_entry, "snapkv-d": 9 * (per_entry + kept_window)}
    for press, kv in kv_bytes.items():
        assert equal.loc[press, "batch"] == int((0.0006 * 2**30 - weights) // kv)
    assert equal.loc["h2o", "batch"] > equal.loc["full", "batch"]
    assert "tok/s" in kvbench("report", str(store), "--bench").stdout
    import json

    import pyarrow.parquet as pq

    for part in (store / "bench").glob("part-*.parquet"):  # the declared schema; extra as JSON, not a repr
        assert pq.read_schema(part).equals(bench_results.bench_schema(), check_metadata=False)
        assert all(isinstance(json.loads(e), dict) for e in pq.read_table(part)["extra"].to_pylist())


@pytest.mark.parametrize("args, message", [
    (["-p", "nope"], "unknown press"),
    (["-b", "0"], "budget must be >= 1"),
    (["-b", "full"], "bench budgets are numbers"),
    (["--gen-len", "0"], "--gen-len must be >= 1"),
    (["--model", "r1-qwen-7b"], "use it with --random-weights"),
    (["-p", "rpc", "-b", "4", "-a", "buffer=5", "-a", "schedule=budget"], "rpc: buffer 5 must be below the budget 4"),
])
def test_bench_bad_input_fails_cleanly(args, message):
    result = kvbench("bench", "--model", "tiny-llama", *args)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_shape_aliases_have_the_published_kv_shapes():
    from kvbench.models import model_config, resolve

    qwen = model_config(resolve("r1-qwen-7b"))
    assert (qwen.num_hidden_layers, qwen.num_attention_heads, qwen.num_key_value_heads) == (28, 28, 4)
    assert qwen.hidden_size // qwen.num_attention_heads == 128 and qwen.vocab_size == 152064
    llama = model_config(resolve("llama-3.1-8b"))
    assert (llama.num_hidden_layers, llama.num_key_value_heads, llama.head_dim) == (32, 8, 128)
    assert llama.rope_parameters["rope_type"] == "llama3"


def test_bench_out_of_memory_keeps_what_was_measured(tmp_path, monkeypatch):
    from kvbench.bench import core as bench
    from kvbench.bench import results as bench_results
    from kvbench.errors import KvbenchError

    real = bench._Bench.side_by_side

    def side_by_side(self, batch):
        if batch > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, batch)

    monkeypatch.setattr(bench._Bench, "side_by_side", side_by_side)
    config = bench.BenchConfig(model="tiny-llama", presses=("h2o",), budgets=(8,), batch_sizes=(1, 4),
                               prompt_len=6, gen_len=8, store=str(tmp_path))
    with pytest.raises(KvbenchError, match="out of memory .* 2 rows measured before it are stored"):
        bench.execute(config)
    stored = bench_results.load_rows(tmp_path)
    assert sorted(stored["press"]) == ["full", "h2o"] and set(stored["batch"]) == {1}
    from kvbench import __version__

    # the provenance every result row has (the session's)
    assert set(stored["kvbench_version"]) == {__version__} and stored["transformers_version"].notna().all()


def test_bench_ops_column_is_the_counters_figure(tmp_path):
    """`--ops` adds ops/step, dispatches/step, syncs/step and growth per cell (the dispatch counter's own figures)
    and HF generate's under the table, in the printed table and in `report --bench` from the store."""
    store = tmp_path / "s"
    result = kvbench("bench", "--model", "tiny-llama", "-p", "h2o", "-b", "8", "--prompt-len", "10", "--gen-len",
                     "12", "--warmup", "1", "--ops", "-f", "markdown", "--store", str(store))
    assert result.returncode == 0, result.stderr
    from kvbench.bench.opcount import kvbench_step
    from kvbench.models import build_tiny

    model, _ = build_tiny("tiny-llama")
    import torch

    prompt = torch.randint(0, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(0)).tolist()
    expected = kvbench_step(model.eval(), prompt, make_press("h2o"), 8)
    h2o = next(line for line in result.stdout.splitlines() if line.startswith("| h2o"))
    assert [c.strip() for c in h2o.split("|")][-5:-1] == [f"{expected.ops:.0f}", f"{expected.dispatches:.0f}", "1.0",
                                                          "+0"]
    assert expected.dispatches > expected.ops  # views dispatch and launch nothing
    assert "ops/step" in result.stdout and "dispatches/step" in result.stdout
    assert "HF generate (DynamicCache), ops/step (kernel-launching), dispatches/step" in result.stdout
    report = kvbench("report", str(store), "--bench", "-f", "markdown")
    stored = next(line for line in report.stdout.splitlines() if line.startswith("| h2o"))
    assert report.returncode == 0 and [c.strip() for c in stored.split("|")][-5] == f"{expected.ops:.0f}"


def test_bench_compile_times_each_cell_eager_and_compiled_beside_hf(tmp_path):
    """`--compile`: every cell decoded eagerly and compiled, side by side, × eager and warm-up per row; HF generate
    eager and with its static cache compiled below (traced with the eager backend here: no code generation)."""
    result = kvbench("bench", "--model", "tiny-llama", "-p", "h2o", "-b", "8", "--prompt-len", "10", "--gen-len",
                     "24", "--warmup", "2", "--compile", "--compile-backend", "eager", "-f", "csv")
    assert result.returncode == 0, result.stderr
    import io

    import pandas as pd

    table = pd.read_csv(io.StringIO(result.stdout), comment="#")
    assert sorted(zip(table["press"], table["decoding"])) == [
        ("HF generate", "HF generate eager (DynamicCache)"), ("HF generate", "HF generate, static cache compiled"),
        ("full", "kvbench compiled"), ("full", "kvbench eager"), ("h2o", "kvbench compiled"), ("h2o", "kvbench eager")]
    eager = table[table["decoding"] == "kvbench eager"]
    assert (eager["× eager"] == 1.0).all() and (table[table["press"] == "full"]["× full"] == 1.0).all()
    compiled = table[table["decoding"].isin(["kvbench compiled", "HF generate, static cache compiled"])]
    assert (compiled["warm-up s (compiles)"] > 0).all()


def test_bench_compile_refuses_what_cannot_be_one_graph():
    result = kvbench("bench", "--model", "tiny-llama", "-p", "rkv", "-b", "8", "--compile")
    assert result.returncode == 2 and "--compile: rkv cannot decode as one graph" in result.stderr
    result = kvbench("bench", "--model", "tiny-llama", "-p", "h2o", "-b", "8", "--compile", "--ops")
    assert result.returncode == 2 and "give --ops or --compile" in result.stderr


def test_bench_profile_writes_operator_tables_and_keeps_stderr_to_progress(tmp_path):
    """The torch profiler's native ``USDT: ... profiler_start`` lines no longer reach stderr."""
    result = kvbench("bench", "--model", "tiny-llama", "-p", "full,h2o", "-b", "16", "--gen-len", "70",
                     "--profile", str(tmp_path / "prof"))
    assert result.returncode == 0, result.stderr
    tables = sorted(p.name for p in (tmp_path / "prof").iterdir())
    assert tables == ["full-full-b1.txt", "h2o-16-b1.txt"]
    assert "Self CPU" in (tmp_path / "prof" / "h2o-16-b1.txt").read_text()
    assert "USDT" not in result.stderr
    assert all(line.startswith("batch 1: ") for line in result.stderr.splitlines()), result.stderr
