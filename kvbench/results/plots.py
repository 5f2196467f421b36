"""Plots over a result store: accuracy and output length vs budget, fidelity vs budget, attention-loss heatmaps."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pandas as pd

from kvbench.results.report import aggregate, load


def plot(store: str | Path, directory: str | Path) -> list[Path]:
    """PNGs per model and dataset: accuracy and output length vs budget, fidelity vs budget, attention-loss heatmaps."""
    import matplotlib

    matplotlib.use("Agg")

    df = load(store, text=("attention_loss_profile",))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = plot_fidelity(df, directory)
    generated = df[df["kind"] != "fidelity"]
    if generated.empty:
        return written
    acc, tokens = aggregate(generated, "accuracy"), aggregate(generated, "output_tokens")
    for (model, dataset), _ in generated.groupby(["model", "dataset_label"]):
        written.append(_plot_vs_budget(directory / f"{_slug(model)}__{_slug(dataset)}.png", f"{model} on {dataset}",
                                       [(acc, "accuracy %"), (tokens, "mean output tokens")], model, dataset))
    return written + plot_attention_loss(generated, directory)


def plot_fidelity(df: pd.DataFrame, directory: Path) -> list[Path]:
    """Per model and dataset: KL(full || press) and top-1 agreement vs budget, one line per press."""
    replays = df[df["kind"] == "fidelity"]
    if replays.empty:
        return []
    panels = [(aggregate(replays, "kl"), "KL(full || press) per token"),
              (aggregate(replays, "top1_agreement"), "top-1 agreement %")]
    return [_plot_vs_budget(directory / f"fidelity__{_slug(model)}__{_slug(dataset)}.png",
                            f"{model} on {dataset}: teacher-forced fidelity against the full cache", panels, model,
                            dataset)
            for (model, dataset), _ in replays.groupby(["model", "dataset_label"])]


#: Each press's marker and line style, in the order of its label: no two lines in a figure look alike, and
#: a line hidden under another still shows its markers beside the other's (see ``_offsets``).
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p", "d", "H", "8")
LINESTYLES = ("-", "--", "-.", ":")


def _plot_vs_budget(path: Path, title: str, panels: list, model: str, dataset: str) -> Path:
    """One panel per (long table, label): a line per press against budget, the full cache black.

    Every press has its own marker and line style (the same in every panel) and its points sit a little to one
    side of the budget (a small step in log-budget space), so presses that score the same stay visible; the
    budget axis is log2 with a plain tick at each budget present."""
    import matplotlib.pyplot as plt

    parts = [long[(long["model"] == model) & (long["dataset_label"] == dataset)] for long, _ in panels]
    presses = sorted({press for part in parts for press in part["press_label"]})
    budgets = sorted({int(b) for part in parts for b in part["budget"].dropna()})
    flat = {press for part in parts for press, rows in part.groupby("press_label") if rows["budget"].isna().all()}
    styles = _styles(presses, flat)
    offsets = _offsets(presses, budgets)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, part, (_, label) in zip(axes[0], parts, panels):
        _draw_panel(ax, part, budgets, styles, offsets)
        ax.set_ylabel(label)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _draw_panel(ax, part: pd.DataFrame, budgets: list[int], styles: dict, offsets: dict) -> None:
    """A line per press (errors as bars); a press without a budget (the full cache) flat across the budgets."""
    from matplotlib.ticker import NullLocator

    for press, rows in part.groupby("press_label"):
        style, shift = styles[press], offsets[press]
        if rows["budget"].isna().all():
            mean = rows["mean"].iloc[0]
            if budgets:
                ax.plot([b * shift for b in budgets], [mean] * len(budgets), label=press, **style)
            else:
                ax.axhline(mean, label=press, **style)
            continue
        rows = rows[rows["budget"].notna()].sort_values("budget")
        ax.errorbar(rows["budget"].astype(int) * shift, rows["mean"], yerr=rows["se"], capsize=3, label=press,
                    **style)
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, labels=[str(b) for b in budgets])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("budget (KV entries per layer per head)")
    ax.grid(alpha=0.3)


def _styles(presses: list[str], flat: set[str]) -> dict[str, dict]:
    """Marker, line style and colour per press; those in ``flat`` (no budget: the full cache) are black."""
    import matplotlib

    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    return {press: {"marker": MARKERS[i % len(MARKERS)], "linestyle": LINESTYLES[i % len(LINESTYLES)],
                    "color": "black" if press in flat else colours[i % len(colours)]}
            for i, press in enumerate(presses)}


def _offsets(presses: list[str], budgets: list[int]) -> dict[str, float]:
    """The factor each press's budgets are multiplied by: presses side by side around each budget, a step
    apart in log2 space that grows with the axis's span and stays under the gap between neighbouring budgets."""
    octaves = [math.log2(b) for b in budgets]
    span = octaves[-1] - octaves[0] if octaves else 0.0
    gap = min((b - a for a, b in zip(octaves, octaves[1:])), default=1.0)
    step = min(0.04 * max(span, 1.0), 0.6 * gap / max(len(presses) - 1, 1))
    middle = (len(presses) - 1) / 2
    return {press: 2 ** ((i - middle) * step) for i, press in enumerate(presses)}


def plot_attention_loss(df: pd.DataFrame, directory: Path) -> list[Path]:
    """Per model, dataset and budget: attention-loss heatmaps (layer x decoding step), one panel per press."""
    import matplotlib.pyplot as plt
    import numpy as np

    measured = df[df["attention_loss_profile"].notna() & df["budget"].notna()]
    written = []
    for (model, dataset, budget), part in measured.groupby(["model", "dataset_label", "budget"]):
        presses = sorted(set(part["press_label"]))
        fig, axes = plt.subplots(1, len(presses), figsize=(3.2 * len(presses) + 1, 3.6), squeeze=False)
        for ax, press in zip(axes[0], presses):
            profiles = [json.loads(p) for p in part[part["press_label"] == press]["attention_loss_profile"]]
            grid = np.array([[np.nan if v is None else v for v in layer] for p in profiles for layer in p["heatmap"]],
                            dtype=float).reshape(len(profiles), len(profiles[0]["heatmap"]), -1)
            reached = ~np.isnan(grid).all(axis=(0, 1))
            grid = grid[:, :, : int(reached.nonzero()[0].max()) + 1] if reached.any() else grid[:, :, :1]
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # bins some examples never reached
                mean = np.nanmean(grid, axis=0) * 100
            image = ax.imshow(mean, aspect="auto", origin="lower", vmin=0, vmax=100, cmap="magma",
                              extent=(0, grid.shape[2] * profiles[0]["bin_steps"], 0, grid.shape[1]))
            ax.set_title(press, fontsize=9)
            ax.set_xlabel("decoding step")
        axes[0][0].set_ylabel("layer")
        fig.colorbar(image, ax=axes[0].tolist(), label="attention loss %")
        fig.suptitle(f"{model} on {dataset}, budget {int(budget)}", fontsize=10)
        path = directory / f"attention_loss__{_slug(model)}__{_slug(dataset)}__b{int(budget)}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)
