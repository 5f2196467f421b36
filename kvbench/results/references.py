"""Published figures beside ours, and which of our rows they may be compared with.

The paper's accuracies (its poster table, ``kvbench/data/hott_poster_accuracy.csv``) came from its harness's
code: its protocol and its presses as they ran, defects included. A row of ours is comparable to a published
row only if it ran the same code path: the ``hott`` protocol (greedy, as the paper states) and the press that
reproduces the fork's (``COUNTERPART``) at its defaults. Every other row of the same method is shown with the
reason it differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import pandas as pd

from kvbench.errors import KvbenchError

REFERENCES = {"hott": "hott_poster_accuracy.csv"}
#: The protocol a published row's numbers came from.
REFERENCE_PROTOCOL = {"hott": "hott"}

#: The paper's press -> our press that runs its code (None: no code behind the published number).
COUNTERPART = {"full": "full", "h2o": "hott-h2o", "knorm": "hott-knorm", "rkv": "hott-rkv", "snapkv-d": "hott-snapkv-d",
               "streaming_llm": "hott-streaming_llm", "shadowkv": None}
#: Our presses that implement one of the paper's methods -> the paper's press row.
FAMILY = {
    "full": "full", "h2o": "h2o", "hott-h2o": "h2o", "hott-h2o-fixed": "h2o", "knorm": "knorm",
    "hott-knorm": "knorm", "rkv": "rkv",
    "hott-rkv": "rkv", "hott-rkv-fixed": "rkv", "snapkv-d": "snapkv-d", "hott-snapkv-d": "snapkv-d",
    "hott-snapkv-d-fixed": "snapkv-d", "streaming_llm": "streaming_llm", "hott-streaming_llm": "streaming_llm",
    "shadowkv": "shadowkv",
}
#: Why a press of the family is not the code behind the paper's numbers.
PRESS_DIFFERS = {
    "h2o": "standard H2O (half the budget a recent window, accumulated sums); the paper's column came from the "
           "fork's layer-shared bf16 accumulator (hott-h2o)",
    "hott-h2o-fixed": "the fork's H2O rule with its defects fixed (per-layer float32 state); the paper's column came "
                      "from the defective code (hott-h2o)",
    "rkv": "R-KV as published (least redundant kept, buffer 128, kernel 7); the fork kept the most redundant keys, "
           "every 64 tokens (hott-rkv)",
    "hott-rkv-fixed": "the fork's R-KV parameters with the right sign; the fork's code reverses the sign "
                      "(hott-rkv)",
    "snapkv-d": "32 window queries at their own positions; the fork's only decoding path that runs scores with the "
                "current query only, by cache index (hott-snapkv-d)",
    "hott-snapkv-d-fixed": "the fork's SnapKV parameters with 64 real window queries; the fork's only decoding path "
                           "that runs saw the current query only (hott-snapkv-d)",
    "knorm": "norms rounded to 16 significant bits, ties to the newest; the fork's exact norms in the keys' dtype "
             "over its topk-ordered cache (hott-knorm)",
    "streaming_llm": "sinks and recent tokens by position; the fork's index rule over topk's tie order "
                     "(hott-streaming_llm) is the same only where topk keeps tied indices in order",
    "shadowkv": "no ShadowKV implementation exists in the fork: the published value has no code to compare with",
}
PROTOCOL_DIFFERS = {
    "kvbench": "kvbench protocol (chat template, per-dataset answer formats, faithful scorers, seeded subset): the "
               "paper fed raw text, asked for \\boxed{} and compared strings",
    "hott-sampling": "the fork's sampling defaults before 2025-10-06; the paper states greedy decoding",
}
#: What still separates a comparable row from the published one.
COMPARABLE_CAVEAT = ("same code path as the paper's harness; still differing: the dataset copy (local files or "
                     "today's hub, StrategyQA's split), model revisions, attention numerics (SDPA against the "
                     "fork's eager or flash attention), topk's tie order on other hardware, and 100-question noise")
#: What is not known about the code behind a published column, even for the row that runs the fork's rule.
UNTRACEABLE = {
    "snapkv-d": "the fork's published SnapKV-D runs only with eager attention, which its harness never asked for "
                "(by default it raises, or scores NaN in later versions): what produced this column is not known",
    "rkv": "the fork's published R-KV cannot run on the paper's models (a hard-coded hidden width of 5120): what "
           "produced this column is not known",
}


@dataclass(frozen=True)
class RowIdentity:
    """What a report row ran: its press, whether every parameter is at its default, and its protocol."""

    press: str
    defaults: bool
    protocol: str


def load_reference(name: str) -> pd.DataFrame:
    """Published accuracies (%): model, dataset, press, budget (None for one-value presses), accuracy."""
    if name not in REFERENCES:
        raise KvbenchError(f"unknown --reference {name!r} (known: {', '.join(REFERENCES)})")
    with resources.files("kvbench.data").joinpath(REFERENCES[name]).open() as f:
        ref = pd.read_csv(f)
    ref = ref[ref["accuracy"].notna()].copy()
    ref["accuracy"] = ref["accuracy"].astype(float) * 100
    ref["budget"] = ref["budget"].astype("Int64")
    return ref[["model", "dataset", "press", "budget", "accuracy"]]


def comparable(identity: RowIdentity, reference: str = "hott") -> str | None:
    """The paper's press row that ``identity`` reproduces, or None."""
    paper = FAMILY.get(identity.press)
    if paper is None or COUNTERPART.get(paper) != identity.press or not identity.defaults:
        return None
    return paper if identity.protocol == REFERENCE_PROTOCOL[reference] else None


def note(label: str, identity: RowIdentity, reference: str = "hott") -> str | None:
    """One line saying whether the row ``label`` is comparable to the published figures, and why not."""
    paper = FAMILY.get(identity.press)
    if paper is None:
        return None
    if comparable(identity, reference):
        caveat = f" ({UNTRACEABLE[paper]})" if paper in UNTRACEABLE else ""
        return f"{label}: comparable to {paper} (paper){caveat}"
    reasons = [PRESS_DIFFERS[identity.press]] if identity.press in PRESS_DIFFERS else []
    if not identity.defaults:
        reasons.append("parameters changed from the fork's")
    if identity.protocol != REFERENCE_PROTOCOL[reference]:
        reasons.append(PROTOCOL_DIFFERS.get(identity.protocol, f"protocol {identity.protocol}"))
    return f"{label}: not comparable to {paper} (paper): {'; '.join(reasons)}"


def with_reference(means: pd.DataFrame, errors: pd.DataFrame, mask: pd.DataFrame, ref: pd.DataFrame, model: str,
                   identities: dict[str, RowIdentity], reference: str = "hott"):
    """Our rows with each published row right under the row that reproduces it (at the end if none does), and
    the note lines on every row of a published method."""
    rows = ref[ref["model"] == model]
    if rows.empty:
        published = ", ".join(sorted(set(ref["model"])))
        return means, errors, mask, [f"the paper published no figures for {model} (it ran {published}): nothing to "
                                     "set beside these rows"]
    parts, placed, notes = [], set(), []
    for label in means.index:
        parts.append((means.loc[[label]], errors.loc[[label]], mask.loc[[label]]))
        identity = identities.get(label)
        if identity is None:
            continue
        paper = comparable(identity, reference)
        if paper is not None and paper not in placed:
            parts.append(_published_row(rows, paper, means.columns))
            placed.add(paper)
        line = note(label, identity, reference)
        if line:
            notes.append(line)
    for paper in sorted(set(rows["press"]) - placed, key=lambda p: (p != "full", p)):
        parts.append(_published_row(rows, paper, means.columns))
        if COUNTERPART.get(paper) is None:
            notes.append(f"{paper} (paper): {PRESS_DIFFERS[paper]}")
        else:
            notes.append(f"{paper} (paper): no row here runs its code ({COUNTERPART[paper]} under --protocol "
                         f"{REFERENCE_PROTOCOL[reference]})")
    if any(": comparable" in line for line in notes):
        notes.append(f"Comparable rows: {COMPARABLE_CAVEAT}.")
    result = pd.concat([p[0] for p in parts])
    result.attrs = means.attrs
    return result, pd.concat([p[1] for p in parts]), pd.concat([p[2] for p in parts]), notes


def _published_row(rows: pd.DataFrame, paper: str, columns) -> tuple:
    line = pd.DataFrame(index=[f"{paper} (paper)"], columns=columns, dtype=float)
    for r in rows[rows["press"] == paper].itertuples():
        for column in columns:
            if column[0] == r.dataset and (pd.isna(r.budget) or column[1] == r.budget):
                line.loc[line.index[0], column] = r.accuracy
    return (line, pd.DataFrame(0.0, index=line.index, columns=columns),
            pd.DataFrame(False, index=line.index, columns=columns))
