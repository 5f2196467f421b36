"""How long `kvbench report` takes on a large store: a synthetic store of N rows (4 models x 8 datasets x the full
cache and 5 presses x 4 budgets), then the markdown report, timed. ``python benchmarks/report_scale.py 100000``."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kvbench.report import render
from kvbench.store import SCHEMA
from tests.synthetic_store import row

MODELS = ["org/model-a", "org/model-b", "org/model-c", "org/model-d"]
DATASETS = ["gsm8k", "math500", "drop", "folio", "reclor", "strategyqa", "openbookqa", "commonsense_qa"]
CELLS = [("full", None)] + [(p, b) for p in ("h2o", "snapkv-d", "streaming_llm", "knorm", "rkv")
                            for b in (128, 256, 384, 512)]
PART_ROWS = 5000


def build(path: Path, rows: int) -> int:
    """Write about ``rows`` rows in parts of PART_ROWS; return how many were written."""
    per_cell = max(1, rows // (len(MODELS) * len(DATASETS) * len(CELLS)))
    templates = [row(p, (), b, d, 0, 1, model=m, run_key=f"{m}|{p}|{b}|{d}")
                 for m in MODELS for d in DATASETS for p, b in CELLS]
    frame = pd.DataFrame(templates).loc[lambda f: f.index.repeat(per_cell)].reset_index(drop=True)
    index = frame.groupby("run_key").cumcount()
    frame["example_id"] = frame["dataset"] + "-" + index.astype(str)
    frame["correct"] = (index % 3 != 0)
    frame["output_tokens"] = 100 + index % 50
    path.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(frame, schema=SCHEMA, preserve_index=False)
    for n, start in enumerate(range(0, table.num_rows, PART_ROWS)):
        pq.write_table(table.slice(start, PART_ROWS), path / f"part-{n:06d}.parquet")
    return table.num_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("rows", type=int, nargs="?", default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        written = build(Path(tmp) / "store", args.rows)
        start = time.perf_counter()
        text = render(Path(tmp) / "store", fmt="markdown")
        elapsed = time.perf_counter() - start
    print(f"report of {written} rows ({len(MODELS)} models, {text.count('| full')} full-cache rows): "
          f"{elapsed:.1f} s")


if __name__ == "__main__":
    main()
