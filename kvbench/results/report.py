"""Reports over a result store: the paper's table layout in four formats, plots, and published references.

Layout: one block per model; rows = press (full first); columns = dataset x budget, then Avg. and Δ vs
full per budget. Each cell is the mean over examples with its standard error; ``n`` is reported. Rows
whose dataset version, prompt or data source differ are never pooled: they become separate columns.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from kvbench.errors import KvbenchError
from kvbench.results.metrics import FULL, Metric, get_metric
from kvbench.results.references import RowIdentity, comparable, load_reference, with_reference
from kvbench.tasks.protocols import DEFAULT_PROTOCOL

AVG, DELTA = "Avg.", "Δ vs full"


def row_protocol(label: str) -> str:
    """The protocol of a row label (``h2o [hott]``; no suffix: the default)."""
    return label[:-1].rsplit(" [", 1)[1] if label.endswith("]") and " [" in label else DEFAULT_PROTOCOL


def full_label(label: str) -> str:
    """The full cache's row under the same protocol as ``label``: what its Δ and bold compare against."""
    protocol = row_protocol(label)
    return FULL if protocol == DEFAULT_PROTOCOL else f"{FULL} [{protocol}]"


#: Columns of text a table never reads (responses run to megabytes per run): left on disk unless asked for.
TEXT_COLUMNS = ("prompt", "response", "gold", "metrics", "attention_loss_profile", "retention_profile")
#: What labels a row (its cell, its settings, its example), read whatever the metric.
LABEL_COLUMNS = ("run_key", "kind", "model", "model_source", "model_revision", "press", "press_args", "budget",
                 "dataset", "dataset_version", "split", "dataset_revision", "prompt_hash", "example_id", "sample",
                 "max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "protocol", "stop_on_loop",
                 "compile", "dtype", "fidelity_kl_mean")


def load(store: str | Path, text: tuple[str, ...] = (), metrics: tuple[Metric, ...] | None = None) -> pd.DataFrame:
    """The store's rows for tables: the label columns and ``metrics``' own (every column but ``TEXT_COLUMNS`` when
    None; ``text`` adds those), the first sample, each (run, example, sample) once, labelled."""
    from kvbench.checks import store_to_read
    from kvbench.store import SCHEMA

    wanted = None if metrics is None else set(LABEL_COLUMNS).union(*(m.columns for m in metrics))
    columns = [c for c in SCHEMA.names if (c not in TEXT_COLUMNS if wanted is None else c in wanted) or c in text]
    table = store_to_read(store).read(columns)
    if table.num_rows == 0:
        raise KvbenchError(f"no results in {store}")
    df = table.to_pandas()
    df = df[df["sample"] == 0]
    repeated = df.duplicated(["run_key", "example_id", "sample"], keep="last")  # e.g. two stores merged
    df = df[~repeated].copy()
    df["kind"] = df["kind"].fillna("generate")
    df["protocol"] = df["protocol"].fillna(DEFAULT_PROTOCOL)
    labels = {key: _press_label(*key) for key in set(zip(df["press"], df["press_args"], df["protocol"]))}
    df["press_label"] = [labels[key][0] for key in zip(df["press"], df["press_args"], df["protocol"])]
    df.attrs["identities"] = dict(labels.values())  # label -> what the row ran
    df["dataset_label"] = _dataset_labels(df) + _settings_suffixes(df)
    df.attrs["repeated_rows"] = int(repeated.sum())
    return df


def _press_label(press: str, args_json: str, protocol: str) -> tuple[str, RowIdentity]:
    """The press name, the parameters that differ from its defaults and a protocol other than kvbench's (so
    variants never pool), with what the row ran."""
    from kvbench.presses import is_press, press_parameters

    try:
        given = json.loads(args_json or "{}")
        if not isinstance(given, dict):
            raise ValueError("not an object")
    except ValueError:
        raise KvbenchError(f"a stored row of press {press!r} has press_args that are not a JSON object "
                           f"({(args_json or '')[:60]!r}): the part holding it was not written by kvbench; move it "
                           "out of the store directory") from None
    changed = given  # a press that cannot be rebuilt here (a plug-in not importable now): every parameter shown
    if is_press(press):
        defaults = {name: default for name, _, default, _ in press_parameters(press)}  # made without a press: some
        # presses cannot be made from their defaults alone (triattention's statistics)
        changed = {k: v for k, v in given.items() if defaults.get(k) != v}
    label = press if not changed else f"{press}({', '.join(f'{k}={v}' for k, v in sorted(changed.items()))})"
    if protocol != DEFAULT_PROTOCOL:
        label = f"{label} [{protocol}]"
    return label, RowIdentity(press, not changed, protocol)


def _dataset_labels(df: pd.DataFrame) -> list[str]:
    """The dataset, with its version, prompt and split where one protocol ran several of them."""
    identity = df["dataset_version"].astype(str) + "/" + df["prompt_hash"].astype(str) + "/" + df["split"].astype(str)
    variants = identity.groupby([df["dataset"], df["protocol"]]).nunique().to_dict()  # a dict: 200,000 lookups
    return [d if variants[(d, p)] == 1 else f"{d}[v{v} {s}]" for d, p, v, s in
            zip(df["dataset"], df["protocol"], df["dataset_version"], identity.str.split("/", n=1).str[1])]


#: Run settings besides press, budget and dataset (all in the run key): rows that differ in one are never pooled.
SETTINGS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop_on_loop", "compile",
            "dtype", "model_source", "model_revision", "hub_revision")


def _settings_suffixes(df: pd.DataFrame) -> pd.Series:
    """`` [max_new_tokens=4 dtype=float32]``: the settings that vary within a (model, dataset, protocol)."""
    greedy = df["temperature"].fillna(0.0) == 0
    frame = pd.DataFrame({
        "model": df["model"], "dataset": df["dataset"], "protocol": df["protocol"],
        "max_new_tokens": df["max_new_tokens"], "temperature": df["temperature"].fillna(0.0),
        # as the run key: top-p and top-k do nothing under greedy decoding; older parts lack the newer columns
        "top_p": df["top_p"].fillna(1.0).where(~greedy, 1.0),
        "top_k": df["top_k"].fillna(0).astype(int).where(~greedy, 0),
        "repetition_penalty": df["repetition_penalty"].fillna(1.0), "stop_on_loop": df["stop_on_loop"].fillna(False),
        "compile": df["compile"].fillna("none"),  # the compiled step's backend (none: eager decoding)
        "dtype": df["dtype"], "model_source": df["model_source"], "model_revision": df["model_revision"],
        # local files are not in the run key (their digest is stored, not keyed); hub commits are
        "hub_revision": df["dataset_revision"].where(df["dataset_revision"].fillna("").str.contains("@"), ""),
    }, index=df.index).astype({c: str for c in SETTINGS})
    counts = frame.groupby(["model", "dataset", "protocol"])[list(SETTINGS)].nunique(dropna=False)
    varying = [c for c in SETTINGS if (counts[c] > 1).any()]
    if not varying:
        return pd.Series("", index=df.index)
    text = frame[varying[0]].radd(f"{varying[0]}=")
    for column in varying[1:]:
        text = text + f" {column}=" + frame[column]
    return " [" + text + "]"


def _rows_of_kind(df: pd.DataFrame, metric: Metric) -> pd.DataFrame:
    """The rows a metric reads: free generations, or the teacher-forced replays, which are ``kvbench fidelity``'s
    rows and every generation row that measured them too (``--measure fidelity``: the same replay, stored beside)."""
    if metric.rows == "fidelity":
        return df[(df["kind"] == "fidelity") | df["fidelity_kl_mean"].notna()]
    return df[df["kind"] == metric.rows]


def aggregate(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Long table: model, press_label, dataset_label, budget (None = full), mean, se, n."""
    definition = get_metric(metric)
    function = definition.value
    keys = ["model", "press_label", "dataset_label", "budget"]
    df = _rows_of_kind(df, definition)
    if df.empty:
        raise KvbenchError(f"no rows for --metric {metric} in this store"
                           + (" (run `kvbench fidelity` first)" if definition.rows == "fidelity" else ""))
    frame = df.assign(budget=df["budget"].astype("Int64"))
    if definition.per_cell:
        records = [dict(zip(keys, key), mean=function(group), n=len(group), sd=float("nan"))
                   for key, group in frame.groupby(keys, dropna=False)]
        out = pd.DataFrame.from_records(records, columns=[*keys, "mean", "n", "sd"])
    else:  # each example once (its replicates, the seeds, averaged): n counts examples
        values = frame.assign(value=function(df))[[*keys, "example_id", "value"]].dropna(subset=["value"])
        per_example = values.groupby([*keys, "example_id"], dropna=False)["value"].mean().reset_index()
        out = per_example.groupby(keys, dropna=False)["value"].agg(mean="mean", n="count", sd="std").reset_index()
    out["se"] = (out["sd"] / out["n"].pow(0.5)).fillna(0.0)
    out["budget"] = out["budget"].astype("Int64")  # <NA> = the full cache
    return out.drop(columns="sd")


def model_table(long: pd.DataFrame, model: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Wide tables (means, standard errors) for one model: index press, columns (dataset, budget)."""
    part = long[long["model"] == model]
    budgets = sorted({int(b) for b in part["budget"].dropna()}) or ["full"]  # only full-cache runs: one column
    datasets = sorted(set(part["dataset_label"]))
    presses = sorted(set(part["press_label"]), key=lambda p: (row_protocol(p) != DEFAULT_PROTOCOL, row_protocol(p),
                                                               p != full_label(p), p))
    columns = pd.MultiIndex.from_tuples(
        [(d, b) for d in datasets for b in budgets] + [(AVG, b) for b in budgets] + [(DELTA, b) for b in budgets],
        names=["dataset", "budget"],
    )
    means = pd.DataFrame(index=pd.Index(presses, name="press"), columns=columns, dtype=float)
    errors = means.copy()
    counts = {}
    for row in part.itertuples():
        targets = budgets if pd.isna(row.budget) else [int(row.budget)]  # full: one value per dataset
        for b in targets:
            means.loc[row.press_label, (row.dataset_label, b)] = row.mean
            errors.loc[row.press_label, (row.dataset_label, b)] = row.se
            counts[(row.press_label, row.dataset_label, b)] = row.n
    for b in budgets:
        data_cols = [(d, b) for d in datasets]
        complete = means[data_cols].notna().all(axis=1)
        means.loc[complete, (AVG, b)] = means.loc[complete, data_cols].mean(axis=1)
        # standard error of a mean of independent cells
        errors.loc[complete, (AVG, b)] = (errors.loc[complete, data_cols] ** 2).sum(axis=1) ** 0.5 / len(datasets)
        for press in presses:  # against the full cache of the same protocol
            if full_label(press) in means.index:
                means.loc[press, (DELTA, b)] = means.loc[press, (AVG, b)] - means.loc[full_label(press), (AVG, b)]
    means.attrs["counts"] = counts
    return means, errors


def best_mask(means: pd.DataFrame, higher_is_better: bool) -> pd.DataFrame:
    """True where a press is the best evicting press of its (dataset, budget) column among the rows of its
    protocol (full excluded)."""
    mask = pd.DataFrame(False, index=means.index, columns=means.columns)
    evicting = [p for p in means.index if p != full_label(p)]
    for protocol in {row_protocol(p) for p in evicting}:
        candidates = means.loc[[p for p in evicting if row_protocol(p) == protocol]]
        for column in means.columns:
            if column[0] == DELTA:
                continue
            values = candidates[column].dropna()
            if len(values) < 2:
                continue
            best = values.max() if higher_is_better else values.min()
            mask.loc[values[values == best].index, column] = True
    return mask


def _cell_text(mean: float, se: float, fmt: str) -> str:
    if pd.isna(mean):
        return "–"
    return fmt.format(mean) if not se else f"{fmt.format(mean)} ± {fmt.format(se)}"


def _delta_text(value: float, number: str) -> str:
    """A difference in the metric's own format, signed (``{:.3f}`` -> ``+0.012``)."""
    return number.replace("{:", "{:+", 1).format(value)


def _counts_note(means: pd.DataFrame) -> str:
    counts = set(means.attrs.get("counts", {}).values())
    return f"n = {counts.pop()} per cell" if len(counts) == 1 else f"n per cell from {min(counts)} to {max(counts)}"


def _header(column: tuple) -> str:
    return f"{column[0]} @{column[1]}"


def check_options(metric: str, fmt: str, reference: str | None, paired: bool) -> tuple[Metric, pd.DataFrame | None]:
    """The metric, and the published reference if asked for, after checking every option together."""
    from kvbench.checks import choice

    choice("--format", fmt, FORMATS)
    definition = get_metric(metric)
    if paired and definition.per_cell:
        raise KvbenchError(f"--paired: --metric {metric} is one value per cell, with nothing to pair")
    ref = load_reference(reference) if reference else None
    if ref is not None and not definition.published:
        raise KvbenchError(f"--reference {reference} publishes accuracies: use it with --metric accuracy")
    return definition, ref


def render(store: str | Path, metric: str = "accuracy", fmt: str = "markdown", reference: str | None = None,
           paired: bool = False) -> str:
    """The report of ``store``: one table per model; ``paired`` adds each model's paired statistics against the full
    cache and against the best press of each budget."""
    definition, ref = check_options(metric, fmt, reference, paired)  # every option before the store is read
    df = load(store, metrics=(definition,))
    identities = df.attrs["identities"]
    long = aggregate(df, metric)
    higher, unit, number = definition.higher_is_better, definition.unit, definition.number
    if fmt == "csv":
        return _csv(_with_paired(long, df, metric), metric, ref, identities, reference)
    with_paired = _with_paired(long, df, metric).dropna(subset=["paired_n"]) if paired else None
    leaders = _leaders(df, definition) if paired else None
    blocks = []
    for model in sorted(set(long["model"])):
        means, errors = model_table(long, model)
        mask = best_mask(means, higher)
        notes: list[str] = []
        if ref is not None:
            means, errors, mask, notes = with_reference(means, errors, mask, ref, model, identities, reference)
        spread = "one value per cell" if definition.per_cell else "mean ± standard error"
        repeated = df.attrs["repeated_rows"]
        repeated = f"; {repeated} rows stored twice (same run and example) counted once" if repeated else ""
        best = "starred" if fmt == "terminal" else "in bold"
        title = f"{model}: {unit} ({spread}; {_counts_note(means)}{repeated}; best evicting press {best})"
        blocks.append(RENDERERS[fmt](title, means, errors, mask, number) + _notes(notes, fmt))
        if paired:
            blocks.append(_paired_block(with_paired, metric, model, number, fmt))
            blocks.append(_leader_block(leaders, metric, model, number, fmt))
    return "\n\n".join(blocks) + "\n"


def _paired_block(with_paired: pd.DataFrame, metric: str, model: str, number: str, fmt: str) -> str:
    """``model``'s paired statistics, from the cells ``_with_paired`` gave a paired difference."""
    from kvbench.results.paired import paired_rows, render_paired

    rows = paired_rows(with_paired, model, number)
    title = (f"{model}: {metric}, each press against the full cache on the same examples (mean difference, "
             "bootstrap 95% interval" + (", exact McNemar p" if metric == "accuracy" else "") + ")")
    return render_paired(title, rows, fmt) if rows else f"{title}: no press shares examples with the full cache"


def _leader_block(leaders: pd.DataFrame, metric: str, model: str, number: str, fmt: str) -> str:
    """``model``'s presses against the best press of each budget (``kvbench.results.paired.leader_statistics``)."""
    from kvbench.results.paired import leader_rows, render_leaders

    rows = leader_rows(leaders, model, number)
    title = (f"{model}: {metric}, each press against the best press of its dataset and budget on the same examples "
             "(mean difference, Student-t 95% interval; differs: the interval excludes zero)")
    return render_leaders(title, rows, fmt) if rows else f"{title}: no two presses share a dataset and budget"


def _leaders(df: pd.DataFrame, definition) -> pd.DataFrame:
    from kvbench.results.paired import leader_statistics

    rows = _rows_of_kind(df, definition)
    return leader_statistics(rows, definition.value(rows), definition.higher_is_better)


def _with_paired(long: pd.DataFrame, df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """``long`` with each press cell's paired difference from the full cache (``kvbench.results.paired``)."""
    from kvbench.results.paired import KEYS, paired_statistics

    definition = get_metric(metric)
    if definition.per_cell:  # a whole-cell ratio has no per-example values to pair
        return long
    rows = _rows_of_kind(df, definition)
    paired = paired_statistics(rows, definition.value(rows), full_label)
    return long.merge(paired, how="left", on=KEYS)


def _csv(long: pd.DataFrame, metric: str, ref, identities: dict, reference: str | None) -> str:
    """The long table; with a reference, the published figure beside each row that runs its code."""
    if ref is not None:
        papers = {label: comparable(identity, reference) for label, identity in identities.items()}
        long = long.assign(reference_press=long["press_label"].map(papers))
        long = long.merge(ref.rename(columns={"accuracy": "reference"}), how="left",
                          left_on=["model", "reference_press", "dataset_label", "budget"],
                          right_on=["model", "press", "dataset", "budget"]).drop(columns=["press", "dataset"])
    return long.assign(metric=metric).to_csv(index=False)


def _notes(notes: list[str], fmt: str) -> str:
    if not notes:
        return ""
    if fmt == "latex":
        return "\n" + "\n".join(f"% {line}" for line in notes)
    bullet = "- " if fmt == "markdown" else "  "
    return "\n\nAgainst the published figures:\n" + "\n".join(f"{bullet}{line}" for line in notes)


def _markdown(title, means, errors, mask, number) -> str:
    header = "| press | " + " | ".join(_header(c) for c in means.columns) + " |"
    lines = [f"**{title}**", "", header, "|---" * (len(means.columns) + 1) + "|"]
    for press in means.index:
        cells = []
        for column in means.columns:
            text = _cell_text(means.loc[press, column], errors.loc[press, column] if column[0] != DELTA else 0, number)
            if column[0] == DELTA and not pd.isna(means.loc[press, column]):
                text = _delta_text(means.loc[press, column], number)
            cells.append(f"**{text}**" if mask.loc[press, column] else text)
        lines.append(f"| {press} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _latex(title, means, errors, mask, number) -> str:
    text = pd.DataFrame(index=means.index, columns=means.columns, dtype=object)
    for press in means.index:
        for column in means.columns:
            value = means.loc[press, column]
            if column[0] == DELTA:
                text.loc[press, column] = "–" if pd.isna(value) else _delta_text(value, number)
            else:
                text.loc[press, column] = _cell_text(value, errors.loc[press, column], number).replace("±", "$\\pm$")
    styler = text.style.apply(lambda col: ["font-weight: bold" if b else "" for b in mask[col.name]], axis=0)
    body = styler.to_latex(hrules=True, convert_css=True, multicol_align="c",
                           column_format="l" + "r" * len(text.columns))
    body = body.replace("Δ", "$\\Delta$")
    return f"% {title}\n{body}"


def _terminal(title, means, errors, mask, number) -> str:
    from kvbench.text_table import text_table

    rows = []
    for press in means.index:
        cells = []
        for column in means.columns:
            value = means.loc[press, column]
            text = (("–" if pd.isna(value) else _delta_text(value, number)) if column[0] == DELTA
                    else _cell_text(value, errors.loc[press, column], number))
            cells.append(f"*{text}*" if mask.loc[press, column] else text)  # best: starred (no bold in text)
        rows.append([press, *cells])
    return text_table(title, ["press", *(_header(c) for c in means.columns)], rows)


RENDERERS = {"markdown": _markdown, "latex": _latex, "terminal": _terminal}
FORMATS = ("terminal", "markdown", "latex", "csv")
