"""Reports on a synthetic store with hand-checked numbers (golden files), variants, references, plots."""

from pathlib import Path

import pytest

from kvbench.errors import KvbenchError
from kvbench.report import aggregate, load, load_reference, plot, render
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
    assert lines[0] == "model,press_label,dataset_label,budget,mean,n,se,metric"
    assert len(lines) == 1 + 10


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
