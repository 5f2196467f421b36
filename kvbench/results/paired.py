"""Paired statistics on the same examples: a press against the full cache (the mean difference with a bootstrap 95%
interval; for accuracy an exact McNemar test), and a press against another (with Student's t interval, which the
verdicts read). Examples are paired by id (seeds averaged per example)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

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


#: Two-sided 95% quantiles of Student's t for 1 to 30 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile(df: int) -> float:
    """Student's t two-sided 95% quantile (a table to 30 degrees of freedom, then the Cornish-Fisher expansion)."""
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class PairedDifference:
    """``first - second`` on the examples both have: their number, the mean difference, its 95% interval
    (Student's t on the per-example differences: honest at the handful of examples a CPU run has, where a
    bootstrap's percentiles are too narrow), and the standard deviation of the differences."""

    n: int
    mean: float
    low: float
    high: float
    sd: float

    @property
    def distinguishable(self) -> bool:
        """The interval excludes zero."""
        return self.n >= 2 and (self.low > 0 or self.high < 0)

    def examples_needed(self) -> int | None:
        """About how many examples an interval of this spread needs to exclude zero if the mean difference held
        (``t(n - 1) · sd / sqrt(n) < |mean|``); None when no example differed."""
        if self.mean == 0 or not self.sd > 0:
            return None
        n = max(self.n + 1, 2)
        while t_quantile(n - 1) * self.sd / math.sqrt(n) >= abs(self.mean):
            n = n + 1 if n < 100 else math.ceil(n * 1.05)
        return n


def paired_difference(first: Mapping, second: Mapping) -> PairedDifference:
    """``first[example] - second[example]`` over the examples both have (values per example id)."""
    common = [key for key in first if key in second]
    differences = np.array([first[k] - second[k] for k in common], dtype=float)
    if len(differences) < 2:
        mean = float(differences.mean()) if len(differences) else float("nan")
        return PairedDifference(len(differences), mean, float("nan"), float("nan"), float("nan"))
    mean, sd = float(differences.mean()), float(differences.std(ddof=1))
    half = t_quantile(len(differences) - 1) * sd / math.sqrt(len(differences))
    return PairedDifference(len(differences), mean, mean - half, mean + half, sd)


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
        rows.append([r.press_label, r.dataset_label, str(r.budget), str(int(r.paired_n)),
                     signed.format(r.paired_difference), _interval(r, signed),
                     "–" if pd.isna(r.mcnemar_p) else f"{r.mcnemar_p:.3g}"])
    return rows


def render_paired(title: str, rows: list[list[str]], fmt: str) -> str:
    """``paired_rows`` as a markdown, LaTeX or terminal table."""
    return _render(title, PAIRED_HEADERS, rows, fmt, left=2, latex_columns="lllrrrr")


LEADER_HEADERS = ["press", "dataset", "budget", "best press", "pairs", "Δ vs best", "95% interval", "verdict"]


def leader_statistics(frame: pd.DataFrame, values: pd.Series, higher_is_better: bool) -> pd.DataFrame:
    """Press against press: per model, protocol, dataset and budget, each evicting press against the best one there
    (by the mean) on the examples both ran. Columns: the cell keys, ``leader``, ``paired_n``, the difference and
    its interval, ``distinguishable`` and ``examples_needed``."""
    per_example = (frame.assign(value=values.to_numpy(), budget=frame["budget"].astype("Int64"))
                   .groupby([*KEYS, "example_id"], dropna=False)["value"].mean().reset_index())
    per_example = per_example[per_example["budget"].notna()].dropna(subset=["value"])
    records = []
    for (model, dataset, budget), group in per_example.groupby(["model", "dataset_label", "budget"]):
        cells = {press: dict(zip(rows["example_id"], rows["value"])) for press, rows in group.groupby("press_label")}
        if len(cells) < 2:
            continue
        means = {press: sum(v.values()) / len(v) for press, v in cells.items()}
        leader = (max if higher_is_better else min)(sorted(means), key=means.__getitem__)
        for press in sorted(set(cells) - {leader}):
            d = paired_difference(cells[press], cells[leader])
            records.append(dict(model=model, press_label=press, dataset_label=dataset, budget=budget, leader=leader,
                                paired_n=d.n, paired_difference=d.mean, paired_ci_low=d.low, paired_ci_high=d.high,
                                distinguishable=d.distinguishable, examples_needed=d.examples_needed()))
    columns = [*KEYS, "leader", "paired_n", "paired_difference", "paired_ci_low", "paired_ci_high", "distinguishable",
               "examples_needed"]
    return pd.DataFrame.from_records(records, columns=columns)


def leader_rows(leaders: pd.DataFrame, model: str, number: str) -> list[list[str]]:
    """One model's press-against-press statistics as text (``number``: the metric's format)."""
    signed = number.replace("{:", "{:+", 1)
    rows = []
    for r in leaders[leaders["model"] == model].sort_values(["dataset_label", "budget", "press_label"]).itertuples():
        if r.distinguishable:
            verdict = "differs"
        elif pd.isna(r.examples_needed):
            verdict = "the same on every example"
        else:
            verdict = f"not distinguishable (~{int(r.examples_needed)} examples needed)"
        rows.append([r.press_label, r.dataset_label, str(r.budget), r.leader, str(int(r.paired_n)),
                     signed.format(r.paired_difference), _interval(r, signed), verdict])
    return rows


def render_leaders(title: str, rows: list[list[str]], fmt: str) -> str:
    """``leader_rows`` as a markdown, LaTeX or terminal table."""
    return _render(title, LEADER_HEADERS, rows, fmt, left=4, latex_columns="llllrrrl")


def _interval(row, signed: str) -> str:
    """A row's 95% interval in the metric's signed format; – where there is none (one example)."""
    if pd.isna(row.paired_ci_low):
        return "–"
    return f"[{signed.format(row.paired_ci_low)}, {signed.format(row.paired_ci_high)}]"


def _render(title: str, headers: list[str], rows: list[list[str]], fmt: str, left: int, latex_columns: str) -> str:
    """A paired table as markdown, LaTeX (booktabs) or a terminal box, its first ``left`` columns left-aligned."""
    from kvbench.text_table import markdown_table, text_table

    if fmt == "markdown":
        return f"**{title}**\n\n" + markdown_table(headers, rows, left=left)
    if fmt == "latex":
        body = [" & ".join(r).replace("Δ", "$\\Delta$").replace("%", "\\%").replace("~", "$\\sim$") + r" \\"
                for r in [headers, *rows]]
        return "\n".join([f"% {title}", rf"\begin{{tabular}}{{{latex_columns}}}", r"\toprule", body[0], r"\midrule",
                          *body[1:], r"\bottomrule", r"\end{tabular}"])
    return text_table(title, headers, rows, left=left)
