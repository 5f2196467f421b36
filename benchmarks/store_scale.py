"""The store at the paper's scale: `kvbench report` and `report --paired` on the paper's grid, 672 runs x 100
examples x 3 seeds = 201,600 rows, with responses of realistic length, in two layouts: a compacted store, and one
part per row (what killed sweeps leave), compacted first (`kvbench store compact`, timed).

    python -m benchmarks.store_scale                 # the paper's grid (about 15 minutes on 2 cores)
    python -m benchmarks.store_scale --runs 24       # a small smoke run

Each command runs in its own process; the table gives its wall time and peak resident memory (maxrss).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kvbench.store import SCHEMA

MODELS = ["org/model-a", "org/model-b", "org/model-c", "org/model-d"]
DATASETS = ["gsm8k", "math500", "drop", "folio", "reclor", "strategyqa", "openbookqa", "commonsense_qa"]
CELLS = [("full", None)] + [(p, b) for p in ("h2o", "snapkv-d", "streaming_llm", "knorm", "rkv")
                            for b in (128, 256, 384, 512)]
WORDS = ["the", "answer", "is", "we", "so", "then", "let", "check", "step", "total", "apples", "each", "more",
         "than", "half", "of", "one", "two", "three"]


def runs(limit: int | None) -> list[tuple[str, str, str, int | None, int]]:
    """(run_key, model, press, budget, seed) of the paper's grid (672 runs) times 3 seeds."""
    out = [(m, d, p, b, s) for s in range(3) for m in MODELS for d in DATASETS for p, b in CELLS]
    out = out[:limit] if limit else out
    return [(f"{m}|{d}|{p}|{b}|{s}", m, d, p, b, s) for m, d, p, b, s in out]


def table(planned, examples: int, texts: list[str]) -> pa.Table:
    """Every row of ``planned`` runs: realistic text lengths, outcomes that differ between presses."""
    rng = random.Random(0)
    n = len(planned) * examples
    columns: dict[str, list] = {name: [None] * n for name in SCHEMA.names}
    stamp = datetime(2026, 1, 1, tzinfo=timezone.utc)
    i = 0
    for key, model, dataset, press, budget, seed in planned:
        for e in range(examples):
            columns["run_key"][i], columns["model"][i], columns["dataset"][i] = key, model, dataset
            columns["press"][i], columns["budget"][i], columns["seed"][i] = press, budget, seed
            columns["example_id"][i], columns["sample"][i] = f"{dataset}-{e}", 0
            columns["correct"][i] = rng.random() < (0.7 if budget is None else 0.4 + budget / 1500)
            columns["output_tokens"][i] = rng.randint(200, 2048)
            columns["response"][i], columns["prompt"][i] = texts[i % len(texts)], texts[(i * 7) % len(texts)][:600]
            i += 1
    constant = dict(kind="generate", created_at=stamp, model_source="hf", press_args="{}", buffer=1,
                    dataset_version=1, split="test", prompt_hash="abc", max_new_tokens=2048, temperature=0.0,
                    top_p=1.0, protocol="kvbench", gold="1", extracted="1", metrics="{}", finish_reason="eos",
                    prompt_tokens=150, prefill_s=0.1, decode_s=30.0, tokens_per_s=60.0, peak_kv_bytes=2**20,
                    evicted_tokens=0.0, mean_cache_len=300.0, kvbench_version="0", device="cuda", dtype="bfloat16")
    for name, value in constant.items():
        columns[name] = [value] * n
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def build(path: Path, rows: pa.Table, per_part: int) -> int:
    path.mkdir(parents=True)
    for n, start in enumerate(range(0, rows.num_rows, per_part)):
        pq.write_table(rows.slice(start, per_part), path / f"part-{n:07d}.parquet")
    return len(range(0, rows.num_rows, per_part))


#: Runs kvbench's command line, then prints its own peak resident memory (KiB) as the last stderr line: VmHWM,
#: not ru_maxrss, which Linux carries across exec from the forking parent (this script holds the whole table).
WRAPPER = ("import atexit, re, sys\n"
           "hwm = lambda: re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
           "atexit.register(lambda: print(hwm(), file=sys.stderr))\n"
           "sys.argv = ['kvbench', *sys.argv[1:]]\n"
           "from kvbench.cli import main\n"
           "main()\n")


def timed(*args: str) -> tuple[float, float]:
    """Wall seconds and peak resident MiB of ``kvbench ARGS`` in its own process."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"kvbench {' '.join(args)} failed: {done.stderr.strip()}")
    return elapsed, int(done.stderr.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=None, help="Only the first N runs (default: all 2,016).")
    parser.add_argument("--examples", type=int, default=100)
    args = parser.parse_args()
    rng = random.Random(1)
    texts = [" ".join(rng.choice(WORDS) for _ in range(1200)) for _ in range(500)]  # ~6 KB, ~1,500 tokens
    rows = table(runs(args.runs), args.examples, texts)
    print(f"{rows.num_rows} rows, {len(runs(args.runs))} runs")
    results = []
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        for layout, per_part in (("compacted (parts of 10,000 rows)", 10_000), ("one part per row", 1)):
            store = Path(tmp) / layout.split()[0]
            start = time.perf_counter()
            parts = build(store, rows, per_part)
            os.sync()  # written back before anything is timed: reads under writeback took minutes here
            print(f"{layout}: {parts} parts written in {time.perf_counter() - start:.0f} s", flush=True)
            if per_part == 1:
                results.append((layout, "kvbench store compact", *timed("store", "compact", str(store))))
            for name, extra in (("report", ()), ("report --paired", ("--paired",))):
                results.append((layout, f"kvbench {name}", *timed("report", str(store), "-f", "markdown", *extra)))
            print(f"  done: {[r[1:] for r in results if r[0] == layout]}", flush=True)
    print(f"\n| layout ({rows.num_rows:,} rows) | command | seconds | peak MiB |\n|---|---|---|---|")
    for layout, command, seconds, mib in results:
        print(f"| {layout} | `{command}` | {seconds:.1f} | {mib:.0f} |")


if __name__ == "__main__":
    main()
