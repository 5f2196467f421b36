"""The report's metrics, registered by name with what they are: how a value is computed, whether higher is
better, the unit and format, which rows they read, and whether a published reference exists for them.

Everything the report does with a metric (``--metric`` and its help, the rows it reads, Δ's format, the paired
statistics, the reference rows) follows from its ``Metric``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvbench.errors import KvbenchError

FULL = "full"


@dataclass(frozen=True)
class Metric:
    name: str
    #: rows (a DataFrame) -> one value per row; with ``per_cell``, a cell's rows -> one value
    value: Callable
    higher_is_better: bool
    unit: str
    #: the format of a value, and of a difference (signed)
    number: str
    #: the kind of row it reads: "generate" (free generation) or "fidelity" (teacher-forced replay)
    rows: str = "generate"
    #: a value of the whole cell (a ratio of sums): no standard error, nothing to pair
    per_cell: bool = False
    #: the paper published it, so ``--reference`` can stand beside it
    published: bool = False
    #: the stored columns ``value`` reads (besides those that label a row): all a table of it loads
    columns: tuple[str, ...] = ()


METRICS: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    METRICS[metric.name] = metric
    return metric


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise KvbenchError(f"unknown --metric {name!r} (known: {', '.join(METRICS)})")
    return METRICS[name]


def _length_ratio(df):
    """Each row's output length over the full cache's on the same example (NaN where full is missing)."""
    import pandas as pd

    keys = ["model", "protocol", "dataset_label", "example_id"]
    full = df[df["press"] == FULL].groupby(keys)["output_tokens"].mean()
    reference = full.reindex(pd.MultiIndex.from_frame(df[keys])).to_numpy()
    return pd.Series(df["output_tokens"].to_numpy(dtype=float) / reference, index=df.index)


def _per_correct(group, cost) -> float:
    correct = group["correct"].sum()
    return float(cost.sum() / correct) if correct else float("nan")


def _scaled(column: str, scale: float = 100.0) -> Callable:
    """Each row's ``column`` times ``scale`` (100 for a share shown in %, 2**-20 for bytes shown in MiB)."""
    return lambda d: d[column].astype(float) * scale


for _metric in (
    Metric("accuracy", lambda d: d["correct"].astype(float) * 100, True, "accuracy %", "{:.1f}", published=True,
           columns=("correct",)),
    Metric("output_tokens", _scaled("output_tokens", 1.0), False, "output tokens", "{:.0f}",
           columns=("output_tokens",)),
    Metric("tokens_per_s", _scaled("tokens_per_s", 1.0), True, "tokens/s", "{:.1f}", columns=("tokens_per_s",)),
    Metric("peak_kv_mib", _scaled("peak_kv_bytes", 2**-20), False, "peak KV MiB", "{:.2f}", columns=("peak_kv_bytes",)),
    Metric("host_kv_mib", _scaled("host_kv_bytes", 2**-20), False, "peak host KV MiB (offloaded)", "{:.2f}",
           columns=("host_kv_bytes",)),
    Metric("truncated", lambda d: (d["finish_reason"] == "length").astype(float) * 100, False, "truncated %",
           "{:.1f}", columns=("finish_reason",)),
    Metric("invalid", lambda d: d["extracted"].isna().astype(float) * 100, False, "invalid %", "{:.1f}",
           columns=("extracted",)),
    # rows stored before loops were measured have no value (NaN), not "did not loop"
    Metric("looping", lambda d: d["looped"].map({True: 100.0, False: 0.0}).astype(float), False, "looping %",
           "{:.1f}", columns=("looped",)),
    Metric("length_ratio", _length_ratio, False, "output length / full cache's (same examples)", "{:.2f}",
           columns=("output_tokens",)),
    Metric("kv_footprint", _scaled("kv_byte_steps", 2**-30), False, "KV footprint GiB x steps", "{:.3f}",
           columns=("kv_byte_steps",)),
    Metric("attention_loss", _scaled("attention_loss_mean"), False, "attention loss % (mass on evicted entries)",
           "{:.1f}", columns=("attention_loss_mean",)),
    Metric("retention", _scaled("retention_mean"), True, "critical prompt tokens held % (mean over steps)",
           "{:.1f}", columns=("retention_mean",)),
    Metric("retention_end", _scaled("retention_end"), True, "critical prompt tokens held % (at the end)", "{:.1f}",
           columns=("retention_end",)),
    Metric("kl", _scaled("fidelity_kl_mean", 1.0), False, "KL(full || press) per token", "{:.3f}", rows="fidelity",
           columns=("fidelity_kl_mean",)),
    Metric("top1_agreement", _scaled("fidelity_top1"), True, "top-1 agreement with full %", "{:.1f}",
           rows="fidelity", columns=("fidelity_top1",)),
    Metric("token_rank", _scaled("fidelity_rank_mean", 1.0), False, "rank of the full cache's token", "{:.2f}",
           rows="fidelity", columns=("fidelity_rank_mean",)),
    Metric("median_output_tokens", lambda g: g["output_tokens"].median(), False, "median output tokens", "{:.0f}",
           per_cell=True, columns=("output_tokens",)),
    Metric("tokens_per_correct", lambda g: _per_correct(g, g["output_tokens"]), False,
           "output tokens per correct answer", "{:.0f}", per_cell=True, columns=("output_tokens", "correct")),
    Metric("seconds_per_correct", lambda g: _per_correct(g, g["prefill_s"] + g["decode_s"]), False,
           "seconds per correct answer", "{:.1f}", per_cell=True, columns=("prefill_s", "decode_s", "correct")),
):
    register(_metric)
