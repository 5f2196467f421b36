"""`kvbench bench --workload run`: the length mix, and whole runs by batch 1, static and continuous batching."""

import statistics

from kvbench.bench.workload import MIN_LENGTH, TAIL_SHARE, continuous_forwards, length_mix
from tests.test_cli import kvbench


def test_length_mix_has_its_documented_shape():
    lengths = length_mix(4000, 512, seed=3)
    assert lengths == length_mix(4000, 512, seed=3) and lengths != length_mix(4000, 512, seed=4)
    assert min(lengths) >= MIN_LENGTH and max(lengths) == 512
    at_limit = sum(n == 512 for n in lengths) / len(lengths)
    assert abs(at_limit - TAIL_SHARE) < 0.03  # a few of the log-normal draws reach the limit too
    rest = [n for n in lengths if n < 512]
    assert 512 / 6 * 0.85 < statistics.median(rest) < 512 / 6 * 1.15


def test_workload_run_compares_batchings_on_the_same_rows(tmp_path):
    store = tmp_path / "s"
    result = kvbench("bench", "--model", "tiny-llama", "--workload", "run", "-p", "full,h2o", "-b", "8",
                     "--examples", "9", "--prompt-len", "12", "--gen-len", "40", "--batch-size", "3",
                     "--store", str(store), "-f", "csv")
    assert result.returncode == 0, result.stderr
    from kvbench.bench import results as bench_results

    df = bench_results.load_rows(store)
    extras = [__import__("json").loads(e) for e in df["extra"]]
    assert [(r, e["batching"]) for r, e in zip(df["press"], extras)] == [
        (p, b) for p in ("full", "h2o") for b in ("batch 1", "static", "continuous")]
    assert all(e["same_rows"] and e["examples"] == 9 for e in extras)
    lengths = length_mix(9, 40, seed=0)  # the replayed output lengths: forwards follow from them
    alone = sum(n - 1 for n in lengths)
    static = sum(max(lengths[i:i + 3]) - 1 for i in range(0, 9, 3))
    for press in ("full", "h2o"):  # counted, not timed
        forwards = {e["batching"]: e["decoding_forwards"] for p, e in zip(df["press"], extras) if p == press}
        assert (forwards["batch 1"], forwards["static"]) == (alone, static)
        assert forwards["continuous"] == continuous_forwards(lengths, 3) <= static
    assert "examples/h" in result.stdout and "× static" in result.stdout
    report = kvbench("report", str(store), "--bench")
    assert report.returncode == 0 and "continuous" in report.stdout and "same rows" in report.stdout
