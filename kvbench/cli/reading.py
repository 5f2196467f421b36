"""What a run's ranking table says, in words that do not outrun the data.

A press is named best on a metric only where its paired difference from the next press (the same examples under
both; per-example values, Student's t 95% interval) excludes zero; otherwise the line says the two are not
distinguishable at this many examples, and about how many would be needed for the observed difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvbench.results.paired import PairedDifference, paired_difference


@dataclass(frozen=True)
class ReadMetric:
    label: str
    column: str  # the per-example value in a cell's rows
    higher_is_better: bool
    percent: bool  # a fraction shown as a percentage; differences in points

    def value(self, number: float) -> str:
        return f"{number:.1%}" if self.percent else f"{number:.3f}"

    def difference(self, number: float) -> str:
        return f"{100 * number:+.1f} points" if self.percent else f"{number:+.3f}"

    def bound(self, number: float) -> str:
        return f"{100 * number:+.1f}" if self.percent else f"{number:+.3f}"


READ_METRICS = (
    ReadMetric("top-1", "fidelity_top1", True, True),
    ReadMetric("KL", "fidelity_kl_mean", False, False),
    ReadMetric("attention loss", "attention_loss_mean", False, True),
    ReadMetric("accuracy", "correct", True, True),
)


def per_example(cell, column: str) -> dict | None:
    """``{example id: value}`` of a cell's rows (seeds averaged), or None where the column was not measured."""
    sums: dict = {}
    for row in cell.rows:
        value = row.get(column)
        if value is None or value != value:
            return None
        total, count = sums.get(row["example_id"], (0.0, 0))
        sums[row["example_id"]] = (total + float(value), count + 1)
    return {key: total / count for key, (total, count) in sums.items()} or None


def standard_error(values: dict) -> float:
    """The standard error of the mean of ``values``' per-example values (NaN below two examples)."""
    numbers = list(values.values())
    if len(numbers) < 2:
        return float("nan")
    mean = sum(numbers) / len(numbers)
    return math.sqrt(sum((x - mean) ** 2 for x in numbers) / (len(numbers) - 1) / len(numbers))


def leaders(cells: list, metric: ReadMetric) -> dict:
    """Per budget, ``(leader, next, PairedDifference leader - next)`` among the evicting cells measured for
    ``metric``, ranked by their means."""
    out: dict = {}
    for budget in dict.fromkeys(c.budget for c in cells if c.press.evicts):
        measured = [(c, v) for c in cells if c.budget == budget and c.press.evicts
                    for v in [per_example(c, metric.column)] if v]
        if len(measured) < 2:
            continue
        ranked = sorted(measured, key=lambda pair: _mean(pair[1]), reverse=metric.higher_is_better)
        (first, first_values), (second, second_values) = ranked[:2]
        difference = paired_difference(first_values, second_values)
        if difference.n:
            out[budget] = (first, second, difference)
    return out


def reading(cells: list) -> list[str]:
    """Per budget: a heading line, then one line per measured metric naming the best press only where the paired
    interval against the next press excludes zero."""
    lines = []
    ranked = {metric: leaders(cells, metric) for metric in READ_METRICS}
    for budget in dict.fromkeys(c.budget for c in cells if c.press.evicts):
        evicting = [c for c in cells if c.budget == budget and c.press.evicts]
        if len(evicting) < 2:
            lines.append(f"At budget {budget}, {evicting[0].press.name} is the only evicting press: nothing to "
                         "compare it with.")
            continue
        metrics = [(m, ranked[m][budget]) for m in READ_METRICS if budget in ranked[m]]
        if not metrics:
            continue
        n = max(d.n for _, (_, _, d) in metrics)
        lines.append(f"At budget {budget}, the presses against each other on the same {n} examples (paired, "
                     "95% intervals):")
        lines.extend(f"  {_metric_line(m, first, second, d)}" for m, (first, second, d) in metrics)
    return lines


def _metric_line(metric: ReadMetric, first, second, difference: PairedDifference) -> str:
    first_mean, second_mean = (_mean(per_example(c, metric.column)) for c in (first, second))
    a, b = first.press.name, second.press.name
    interval = (f"Δ {metric.difference(difference.mean)}, 95% interval [{metric.bound(difference.low)}, "
                f"{metric.bound(difference.high)}]")
    if difference.distinguishable:
        return (f"{metric.label}: {a} is best, {metric.value(first_mean)} against {metric.value(second_mean)} "
                f"for {b}, the next ({interval}).")
    needed = difference.examples_needed()
    tail = ("they agree on every example" if needed is None
            else f"about {needed} examples would be needed to tell a difference this size apart")
    return (f"{metric.label}: {a} {metric.value(first_mean)} and {b} {metric.value(second_mean)} are not "
            f"distinguishable at n = {difference.n} ({interval}); {tail}.")


def distinguished_best(cells: list) -> list:
    """The cells best on top-1 at their budget with a paired interval against the next press excluding zero."""
    return [first for first, _, d in leaders(cells, READ_METRICS[0]).values() if d.distinguishable]


def _mean(values: dict) -> float:
    return sum(values.values()) / len(values)
