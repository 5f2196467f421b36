"""Reports on a synthetic store with hand-checked numbers (golden files), variants, references, plots."""

from pathlib import Path

import pytest

from kvbench.errors import KvbenchError
from kvbench.results.plots import plot
from kvbench.results.references import load_reference
from kvbench.results.report import aggregate, load, render
from tests.synthetic_store import build, row

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture
def store(tmp_path):
    return build(tmp_path / "store")


@pytest.mark.parametrize(("fmt", "golden"), [("markdown", "report.md"), ("latex", "report.tex")])
def test_golden(store, fmt, golden):
    # Hand-checked: folio full 2/4 = 50.0 ± 28.9; h2o Avg@64 = (25 + 50) / 2 = 37.5, Δ = 37.5 - 75 = -37.5;
    # bold = best evicting press per column (both when tied), full never bold.
    assert render(store, fmt=fmt) == (GOLDEN / golden).read_text()


def test_delta_and_bold_in_golden_markdown(store):
    text = render(store, fmt="markdown")
    snapkv = next(line for line in text.splitlines() if line.startswith("| snapkv-d"))
    assert "| **100.0** |" in snapkv and "| -25.0 | -12.5 |" in snapkv
    full = next(line for line in text.splitlines() if line.startswith("| full"))
    assert "**" not in full


def test_lower_is_better_metrics_bold_the_minimum(store):
    text = render(store, metric="peak_kv_mib", fmt="markdown")
    h2o = next(line for line in text.splitlines() if line.startswith("| h2o"))
    assert "**0.06**" in h2o  # 64 x 1 KiB, tied with snapkv-d: both bold
    assert "0.50" in next(line for line in text.splitlines() if line.startswith("| full"))


@pytest.mark.parametrize(("metric", "full_gsm8k"), [
    ("output_tokens", 115.0), ("truncated", 25.0), ("invalid", 0.0), ("tokens_per_s", 100.0),
])
def test_other_metrics(store, metric, full_gsm8k):
    long = aggregate(load(store), metric)
    cell = long[(long.press_label == "full") & (long.dataset_label == "gsm8k")]
    assert cell["mean"].item() == pytest.approx(full_gsm8k)


def test_variants_and_versions_are_never_pooled(tmp_path):
    extra = [row("h2o", (("normalize", True), ("recent_ratio", 0.0)), 64, "gsm8k", i, 1) for i in range(4)]
    extra += [row("h2o", (), 64, "gsm8k", i, 0, dataset_version=2, prompt_hash="def") for i in range(4)]
    text = render(build(tmp_path / "s", extra), fmt="markdown")
    assert "| h2o(normalize=True, recent_ratio=0.0) |" in text
    assert "gsm8k[v1 abc/test] @64" in text and "gsm8k[v2 def/test] @64" in text


def test_csv_is_long_and_complete(store):
    lines = render(store, fmt="csv").splitlines()
    assert lines[0] == ("model,press_label,dataset_label,budget,mean,n,se,paired_n,paired_difference,paired_ci_low,"
                        "paired_ci_high,mcnemar_p,metric")
    assert len(lines) == 1 + 10


def test_paired_difference_from_the_full_cache(store):
    import io

    import pandas as pd

    table = pd.read_csv(io.StringIO(render(store, fmt="csv")))
    h2o = table[(table.press_label == "h2o") & (table.dataset_label == "gsm8k") & (table.budget == 64)].iloc[0]
    # full 1,1,1,1 against h2o 1,1,0,0: two pairs lost, none gained; exact McNemar p = 2 x (1/2)^2 = 0.5
    assert h2o.paired_n == 4 and h2o.paired_difference == -50.0 and h2o.mcnemar_p == pytest.approx(0.5)
    assert h2o.paired_ci_low <= -50.0 <= h2o.paired_ci_high <= 0.0
    assert table[table.press_label == "full"]["paired_n"].isna().all()


@pytest.mark.parametrize("fmt", ["markdown", "terminal", "latex"])
def test_paired_table_option(store, fmt):
    """``--paired``: the same numbers as the csv columns, under each model's table, in the metric's format."""
    text = render(store, fmt=fmt, paired=True)
    line = next(ln for ln in text.splitlines() if ln.lstrip("|│ ").startswith("h2o") and "gsm8k" in ln and "64" in ln)
    cells = [c.strip() for c in line.replace("│", "|").replace("&", "|").strip("|\\ ").split("|")]
    # full 1,1,1,1 against h2o 1,1,0,0: -50.0 points over 4 pairs, exact McNemar p 0.5
    assert cells[:5] == ["h2o", "gsm8k", "64", "4", "-50.0"] and cells[6] == "0.5", cells
    assert "bootstrap 95" in text and render(store, fmt=fmt).count("h2o") < text.count("h2o")


def test_paired_table_refuses_a_whole_cell_metric(store):
    with pytest.raises(KvbenchError, match="nothing to pair"):
        render(store, metric="tokens_per_correct", fmt="markdown", paired=True)


def test_hott_reference_rows(tmp_path):
    ref = load_reference("hott")
    assert {"gsm8k", "math500", "drop", "folio"} <= set(ref["dataset"])
    model = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
    full = ref[(ref.model == model) & (ref.press == "full") & (ref.dataset == "gsm8k")]["accuracy"].item()
    rows = [row("full", (), None, "gsm8k", i, 1, model=model) for i in range(2)]
    rows += [row("h2o", (), 128, "gsm8k", i, 1, model=model) for i in range(2)]
    from kvbench.store import ResultStore

    ResultStore(tmp_path / "r").append(rows)
    text = render(tmp_path / "r", fmt="markdown", reference="hott")
    paper_full = next(line for line in text.splitlines() if line.startswith("| full (paper)"))
    assert f"{full:.1f}" in paper_full
    assert "| h2o (paper) |" in text
    with pytest.raises(KvbenchError, match="unknown --reference"):
        render(tmp_path / "r", reference="nope")


def test_hott_reference_on_a_model_the_paper_did_not_run_says_so(tmp_path):
    from kvbench.store import ResultStore

    ResultStore(tmp_path / "r").append([row(p, (), b, "gsm8k", i, 1, model="smollm2-135m")
                                        for p, b in (("full", None), ("h2o", 64)) for i in range(2)])
    text = render(tmp_path / "r", fmt="markdown", reference="hott")
    assert "(paper)" not in text
    note = next(line for line in text.splitlines() if line.startswith("- the paper published no figures"))
    assert note.startswith("- the paper published no figures for smollm2-135m (it ran ")
    assert "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B" in note and note.endswith("nothing to set beside these rows")


def test_hott_reference_sits_beside_the_rows_that_run_the_papers_code(tmp_path):
    from kvbench.store import ResultStore

    model = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
    cases = [("full", None, "hott"), ("full", None, None), ("hott-h2o", 128, "hott"), ("h2o", 128, None),
             ("hott-h2o-fixed", 128, None), ("hott-h2o", 128, "kvbench"), ("hott-snapkv-d", 128, "hott-sampling")]
    rows = [row(p, (), b, "gsm8k", i, 1, model=model, protocol=protocol, run_key=f"{p}{b}{protocol}")
            for p, b, protocol in cases for i in range(2)]
    ResultStore(tmp_path / "r").append(rows)
    lines = render(tmp_path / "r", fmt="markdown", reference="hott").splitlines()
    labels = [line.split("|")[1].strip() for line in lines if line.startswith("| ") and not line.startswith("| press")]
    assert labels[labels.index("hott-h2o [hott]") + 1] == "h2o (paper)"
    assert labels[labels.index("full [hott]") + 1] == "full (paper)"
    # no row runs the fork's SnapKV under its greedy protocol: the published row goes after ours
    assert labels[labels.index("hott-snapkv-d [hott-sampling]") + 1] != "snapkv-d (paper)"
    assert "snapkv-d (paper)" in labels[-5:] and "shadowkv (paper)" in labels[-5:]
    notes = "\n".join(line for line in lines if line.startswith("- "))
    assert "- hott-h2o [hott]: comparable to h2o (paper)" in notes
    assert "- h2o: not comparable to h2o (paper): standard H2O" in notes and "kvbench protocol" in notes
    assert "- hott-h2o-fixed: not comparable" in notes and "defects fixed" in notes
    assert "hott-snapkv-d [hott-sampling]: not comparable" in notes and "states greedy" in notes
    from kvbench.results.references import RowIdentity, note

    fork_snapkv = note("hott-snapkv-d [hott]", RowIdentity("hott-snapkv-d", True, "hott"))
    assert fork_snapkv.startswith("hott-snapkv-d [hott]: comparable") and "not known" in fork_snapkv
    csv = render(tmp_path / "r", fmt="csv", reference="hott")
    assert sum(1 for line in csv.splitlines()[1:] if line.split(",")[-2]) == 2  # full [hott] and hott-h2o [hott]
    with pytest.raises(KvbenchError, match="publishes accuracies"):
        render(tmp_path / "r", metric="output_tokens", reference="hott")


def test_plots_are_written(store, tmp_path):
    paths = plot(store, tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["demo_model__folio.png", "demo_model__gsm8k.png"]
    assert all(p.stat().st_size > 10_000 and p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_terminal_and_errors(store, tmp_path):
    assert "Δ vs full" in render(store, fmt="terminal")
    with pytest.raises(KvbenchError, match="unknown --metric"):
        render(store, metric="nope")
    with pytest.raises(KvbenchError, match="unknown --format"):
        render(store, fmt="html")
    with pytest.raises(KvbenchError, match="no results"):
        render(tmp_path / "empty")


def test_runs_that_differ_in_any_setting_are_never_pooled(tmp_path):
    """Three runs of one press on two examples (max_new_tokens 4, 8, and 4 in float32): three columns of n=2."""
    from kvbench.store import ResultStore

    settings = [(4, "bfloat16"), (8, "bfloat16"), (4, "float32")]
    rows = [row("full", (), None, "gsm8k", i, 1, max_new_tokens=n, dtype=dtype, run_key=f"k{n}{dtype}")
            for n, dtype in settings for i in range(2)]
    ResultStore(tmp_path / "s").append(rows)
    long = aggregate(load(tmp_path / "s"), "accuracy")
    assert sorted(long["n"]) == [2, 2, 2]
    assert set(long["dataset_label"]) == {"gsm8k [max_new_tokens=4 dtype=bfloat16]",
                                          "gsm8k [max_new_tokens=8 dtype=bfloat16]",
                                          "gsm8k [max_new_tokens=4 dtype=float32]"}
    # a compiled run (--compile) beside the same run decoded eagerly: two columns, not one cell of n=2 over 4 rows
    rows = [row("full", (), None, "gsm8k", i, 1, compile=backend, run_key=f"c{backend}")
            for backend in (None, "inductor") for i in range(2)]
    ResultStore(tmp_path / "c").append(rows)
    long = aggregate(load(tmp_path / "c"), "accuracy")
    assert sorted(long["n"]) == [2, 2]
    assert set(long["dataset_label"]) == {"gsm8k [compile=none]", "gsm8k [compile=inductor]"}
    # seeds are replicates of one run (averaged per example: n counts the 2 examples), and a row stored twice
    # counts once; example 1 is right under one seed, wrong under the other: 0.5, so the mean is (1 + 0.5) / 2
    rows = [row("full", (), None, "gsm8k", i, int(i == 0 or s == 0), seed=s, run_key=f"seed{s}")
            for s in (0, 1) for i in range(2)]
    ResultStore(tmp_path / "t").append(rows + rows[:1])
    frame = load(tmp_path / "t")
    cell = aggregate(frame, "accuracy")
    assert cell["n"].tolist() == [2] and cell["mean"].tolist() == [75.0] and frame.attrs["repeated_rows"] == 1
    assert cell["se"].tolist() == [25.0]  # over the 2 examples (100 and 50): sd 35.4 / sqrt(2)
    assert "1 rows stored twice" in render(tmp_path / "t", fmt="markdown")


def test_delta_uses_the_metrics_own_format(tmp_path):
    from kvbench.store import ResultStore

    rows = [row("full", (), None, "gsm8k", i, 1, kind="fidelity", fidelity_kl_mean=0.0) for i in range(2)]
    rows += [row("h2o", (), 64, "gsm8k", i, 1, kind="fidelity", fidelity_kl_mean=kl)
             for i, kl in enumerate((0.01, 0.014))]
    ResultStore(tmp_path / "f").append(rows)
    h2o = next(line for line in render(tmp_path / "f", metric="kl", fmt="markdown").splitlines()
               if line.startswith("| h2o"))
    assert h2o.endswith("| +0.012 |")


def test_store_scale_benchmark_runs(tmp_path):
    """The benchmark behind the README's store table, at a small size, run as the README runs it (nothing asserted
    about time)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(repo / "benchmarks" / "store_scale.py"), "--runs", "21", "--examples",
                          "3"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("63 rows, 21 runs")
    table = out.stdout.split("| layout (63 rows) |", 1)[1]
    assert "| compacted (parts of 10,000 rows) | `kvbench report --paired` |" in table
    assert "| one part per row | `kvbench store compact` |" in table


def test_exact_mcnemar_against_hand_computed_values():
    from kvbench.results.paired import mcnemar_exact

    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(0, 2) == pytest.approx(0.5)
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)  # (C(10,0) + C(10,1)) / 2^10, two-sided
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)


def test_fidelity_columns_mean_one_thing_to_every_reader(tmp_path):
    """``run --measure fidelity`` stores the teacher-forced replay on generation rows, ``kvbench fidelity`` on rows
    of its own: ``--metric kl`` (and top-1, rank, --paired) reads both, each example once."""
    from kvbench.store import ResultStore

    measured = dict(fidelity_kl_mean=0.2, fidelity_kl_max=0.5, fidelity_top1=0.9, fidelity_rank_mean=0.1)
    generated = [row("h2o", (), 64, "gsm8k", i, 1, **measured) for i in range(2)]
    generated += [row("full", (), None, "gsm8k", i, 1, **{**measured, "fidelity_kl_mean": 0.0}) for i in range(2)]
    ResultStore(tmp_path / "run").append(generated)
    long = aggregate(load(tmp_path / "run"), "kl")
    assert sorted(zip(long["budget"].fillna(0), long["mean"], long["n"])) == [(0, 0.0, 2), (64, 0.2, 2)]
    assert "0.200" in render(tmp_path / "run", metric="kl", fmt="markdown", paired=True)
    replayed = [row("h2o", (), 64, "gsm8k", i, 1, kind="fidelity", run_key="replay", **{**measured,
                    "fidelity_kl_mean": 0.4}) for i in range(2)]
    ResultStore(tmp_path / "run").append(replayed)  # the same examples replayed again: still 2 examples
    both = aggregate(load(tmp_path / "run"), "kl")
    assert both[both["budget"] == 64][["mean", "n"]].values.tolist() == [[pytest.approx(0.3), 2]]


def _cells(values_by_press: dict, budget=64, column="fidelity_top1"):
    from types import SimpleNamespace

    return [SimpleNamespace(budget=None if name == "full" else budget,
                            press=SimpleNamespace(name=name, evicts=name != "full"),
                            rows=tuple({"example_id": f"q{i}", column: v} for i, v in enumerate(values)))
            for name, values in values_by_press.items()]


def test_the_reading_never_ranks_a_press_alone_or_against_itself():
    from kvbench.cli.reading import reading

    (line,) = reading(_cells({"full": [1.0, 1.0], "h2o": [0.12, 0.2]}))
    assert line == "At budget 64, h2o is the only evicting press: nothing to compare it with."


def test_the_reading_names_a_winner_only_where_the_paired_interval_excludes_zero():
    from kvbench.cli.reading import distinguished_best, reading

    # snapkv-d ahead on every example by 3 to 5 points: its paired interval against h2o excludes zero
    clear = _cells({"full": [1.0] * 5, "snapkv-d": [0.90, 0.92, 0.88, 0.95, 0.91],
                    "h2o": [0.86, 0.88, 0.85, 0.90, 0.87], "streaming_llm": [0.5] * 5})
    heading, top1 = reading(clear)
    assert heading == "At budget 64, the presses against each other on the same 5 examples (paired, 95% intervals):"
    assert top1.startswith("  top-1: snapkv-d is best, 91.2% against 87.2% for h2o, the next (Δ +4.0 points, "
                           "95% interval [+")
    assert [c.press.name for c in distinguished_best(clear)] == ["snapkv-d"]
    # make run's case: snapkv-d ahead on the mean, behind on two of five examples: not distinguishable
    close = _cells({"full": [1.0] * 5, "snapkv-d": [0.95, 0.80, 0.92, 0.90, 0.87],
                    "h2o": [0.85, 0.86, 0.84, 0.93, 0.80]})
    _, top1 = reading(close)
    assert top1.startswith("  top-1: snapkv-d 88.8% and h2o 85.6% are not distinguishable at n = 5 (Δ +3.2 points, "
                           "95% interval [-")
    assert top1.endswith("examples would be needed to tell a difference this size apart.")
    needed = int(top1.split("about ")[1].split(" ")[0])
    assert needed == 22  # t(20) x 0.0719 / sqrt(21) = 0.0327 > 0.032; t(21) x 0.0719 / sqrt(22) = 0.0319
    assert distinguished_best(close) == []
    # lower is better for KL: the leader is the press with the lower mean
    kl = _cells({"full": [0.0] * 4, "h2o": [0.20, 0.21, 0.22, 0.23], "snapkv-d": [0.30, 0.31, 0.32, 0.33]},
                column="fidelity_kl_mean")
    _, line = reading(kl)
    assert line.startswith("  KL: h2o is best, 0.215 against 0.315 for snapkv-d, the next (Δ -0.100, ")


def test_paired_report_sets_each_press_against_the_best_of_its_budget(tmp_path):
    """Press against press on the same examples: the best press of each budget by the metric's mean, each other press
    against it with Student's t interval and a verdict; an independent computation of the interval."""
    import math

    from kvbench.store import ResultStore

    # t(df) two-sided 95% quantiles for df = 1..40 (tables), for the examples an interval this wide needs
    T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
            2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045,
            2.042, 2.040, 2.037, 2.035, 2.032, 2.030, 2.028, 2.026, 2.024, 2.023, 2.021]
    tokens = {"h2o": [100, 110, 120, 130], "snapkv-d": [90, 100, 115, 125], "tova": [95, 104, 116, 122]}
    rows = [row(press, (), 64, "gsm8k", i, 1, output_tokens=value) for press, values in tokens.items()
            for i, value in enumerate(values)]
    rows += [row("full", (), None, "gsm8k", i, 1, output_tokens=100) for i in range(4)]
    ResultStore(tmp_path / "r").append(rows)
    text = render(tmp_path / "r", metric="output_tokens", fmt="markdown", paired=True)
    block = text.split("each press against the best press")[1]
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in block.splitlines() if line.startswith("| ") and "press" not in line.split("|")[1]}
    # output tokens: lower is better, so snapkv-d (107.5) leads; h2o is 7.5 behind on every example but one
    assert set(lines) == {"h2o", "tova"} and lines["h2o"][2] == "snapkv-d"
    differences = [a - b for a, b in zip(tokens["h2o"], tokens["snapkv-d"])]  # 10, 10, 5, 5
    mean = sum(differences) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / 3)
    half = 3.182 * sd / 2  # t(3) x sd / sqrt(4)
    assert lines["h2o"][4:] == [f"+{mean:.0f}", f"[+{mean - half:.0f}, +{mean + half:.0f}]", "differs"]
    tova = [a - b for a, b in zip(tokens["tova"], tokens["snapkv-d"])]  # 5, 4, 1, -3: mean 1.75, sd 3.59
    mean = sum(tova) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in tova) / 3)
    needed = next(n for n in range(5, 200) if T975[n - 2] * sd / math.sqrt(n) < mean)
    assert lines["tova"][3] == "4" and lines["tova"][6] == f"not distinguishable (~{needed} examples needed)"
