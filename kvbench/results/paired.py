"""Paired statistics of a press against the full cache on the same examples: the mean difference with a bootstrap
95% interval, and for accuracy an exact McNemar test. Examples are paired by id (seeds averaged per example)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

RESAMPLES = 2000
KEYS = ["model", "press_label", "dataset_label", "budget"]


def mcnemar_exact(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs (press right and full wrong, and the reverse)."""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2**n
    return min(1.0, 2 * tail)


def bootstrap_interval(differences: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of the mean of ``differences`` over seeded resamples."""
    if len(differences) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(0, len(differences), (RESAMPLES, len(differences)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_statistics(frame: pd.DataFrame, values: pd.Series, full_label) -> pd.DataFrame:
    """One row per press cell with a full-cache cell of the same model, protocol and dataset column.

    ``values``: each row's metric value; ``full_label(press_label)`` names the full cache's row of that protocol.
    Columns: the cell keys, ``paired_n``, ``paired_difference``, ``paired_ci_low``, ``paired_ci_high`` and
    ``mcnemar_p`` (accuracy only: values of 0 and 100).
    """
    per_example = (frame.assign(value=values.to_numpy(), budget=frame["budget"].astype("Int64"))
                   .groupby([*KEYS, "example_id"], dropna=False)["value"].mean().reset_index())
    full = per_example[per_example["budget"].isna()]
    records = []
    for key, cell in per_example[per_example["budget"].notna()].groupby(KEYS):
        model, press, dataset, _ = key
        reference = full[(full["model"] == model) & (full["press_label"] == full_label(press))
                         & (full["dataset_label"] == dataset)]
        both = cell.merge(reference[["example_id", "value"]], on="example_id", suffixes=("", "_full")).dropna()
        if both.empty:
            continue
        differences = (both["value"] - both["value_full"]).to_numpy(dtype=float)
        low, high = bootstrap_interval(differences)
        binary = set(both["value"]).union(both["value_full"]) <= {0.0, 100.0}
        gained = int((both["value"] > both["value_full"]).sum())
        lost = int((both["value"] < both["value_full"]).sum())
        records.append(dict(zip(KEYS, key), paired_n=len(both), paired_difference=float(differences.mean()),
                            paired_ci_low=low, paired_ci_high=high,
                            mcnemar_p=mcnemar_exact(gained, lost) if binary else float("nan")))
    columns = [*KEYS, "paired_n", "paired_difference", "paired_ci_low", "paired_ci_high", "mcnemar_p"]
    return pd.DataFrame.from_records(records, columns=columns)


PAIRED_HEADERS = ["press", "dataset", "budget", "pairs", "Δ vs full", "95% interval", "McNemar p"]


def paired_rows(paired: pd.DataFrame, model: str, number: str) -> list[list[str]]:
    """One model's paired statistics as text, a difference in the metric's own format (``number``)."""
    signed = number.replace("{:", "{:+", 1)
    rows = []
    for r in paired[paired["model"] == model].sort_values(["press_label", "dataset_label", "budget"]).itertuples():
        interval = ("–" if pd.isna(r.paired_ci_low)
                    else f"[{signed.format(r.paired_ci_low)}, {signed.format(r.paired_ci_high)}]")
        rows.append([r.press_label, r.dataset_label, str(r.budget), str(int(r.paired_n)),
                     signed.format(r.paired_difference), interval,
                     "–" if pd.isna(r.mcnemar_p) else f"{r.mcnemar_p:.3g}"])
    return rows


def render_paired(title: str, rows: list[list[str]], fmt: str) -> str:
    """``paired_rows`` as a markdown, LaTeX or terminal table."""
    from kvbench.text_table import markdown_table, text_table

    if fmt == "markdown":
        return f"**{title}**\n\n" + markdown_table(PAIRED_HEADERS, rows, left=2)
    if fmt == "latex":
        body = [" & ".join(r).replace("Δ", "$\\Delta$").replace("%", "\\%") + r" \\" for r in [PAIRED_HEADERS, *rows]]
        return "\n".join([f"% {title}", r"\begin{tabular}{lllrrrr}", r"\toprule", body[0], r"\midrule", *body[1:],
                          r"\bottomrule", r"\end{tabular}"])
    return text_table(title, PAIRED_HEADERS, rows, left=2)
