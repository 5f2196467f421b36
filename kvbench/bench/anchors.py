"""``kvbench bench --compile``: each cell decoded eagerly and as one compiled graph per step, side by side, labelled
with its ratio to the same press decoded eagerly and its warm-up time (where compilation happens); and the anchors
every fast decoder is measured against: transformers' ``generate`` eager (``DynamicCache``) and with its static
cache compiled (a ``StaticCache`` of the timed length, as transformers compiles decoding), both full caches.

The anchors run alone (``generate`` is one call): a step is timed as the difference of two generations of
different lengths over their difference in tokens, which cancels the prefill and the set-up.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from kvbench.bench.results import BenchRow

#: Tokens of the shorter anchor generation (its time is subtracted from the full-length one's).
SHORT = 8


def label_compiled(rows: list[BenchRow], variants: list[tuple[str, int | None, bool]], warmup: list[float]) -> None:
    """Ratios within each way of decoding (× full), against the same press decoded eagerly (× eager), warm-up."""
    eager = {(p, b): row for row, (p, b, compiled) in zip(rows, variants) if not compiled}
    full = {compiled: row for row, (p, _, compiled) in zip(rows, variants) if p == "full"}
    for row, (press, budget, compiled), seconds in zip(rows, variants, warmup):
        row.ratio = row.tokens_per_s / full[compiled].tokens_per_s
        row.extra = {**row.extra, "decoding": "kvbench compiled" if compiled else "kvbench eager",
                     "x_eager": row.tokens_per_s / eager[(press, budget)].tokens_per_s, "warmup_s": seconds}


def hf_rows(model, prompts: list[list[int]], gen_len: int, eager_full: BenchRow, sync: Callable[[], None],
            backend: str = "inductor") -> list[BenchRow]:
    """HF ``generate`` eager and with its static cache compiled, at the batch of ``prompts``; × eager is against
    kvbench's full cache decoded eagerly (``eager_full``), × full against HF eager."""
    import torch
    from transformers import DynamicCache, StaticCache
    from transformers.generation.configuration_utils import CompileConfig

    from kvbench.engine.decode import cache_argument

    ids = torch.tensor(prompts, device=model.device)
    compiled = CompileConfig(fullgraph=True, dynamic=False, backend=backend,
                             mode="reduce-overhead" if ids.device.type == "cuda" else "default")
    compiled._compile_all_devices = True  # transformers compiles only on accelerators unless told
    # one static cache length for every generation, so that the warm-up compiles the shapes that are timed
    length = ids.shape[1] + gen_len
    ways = {"HF generate eager (DynamicCache)": lambda: {cache_argument(model): DynamicCache()},
            "HF generate, static cache compiled": lambda: {
                cache_argument(model): StaticCache(config=model.config, max_cache_len=length),
                "compile_config": compiled}}
    def run(length: int, options: Callable[[], dict]) -> float:
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=length, min_new_tokens=length, do_sample=False, eos_token_id=None,
                           pad_token_id=0, **options())
        sync()
        return time.perf_counter() - start

    rows = []
    for label, options in ways.items():
        warmup = run(SHORT, options)  # compiles the static cache's forward
        step = (run(gen_len, options) - run(SHORT, options)) / (gen_len - SHORT)
        tokens_per_s = len(prompts) / step
        rows.append(BenchRow(
            press="HF generate", budget=None, batch=len(prompts), tokens_per_s=tokens_per_s, ms_per_step=1000 * step,
            ratio=math.nan, kv_mib=eager_full.kv_mib, entries_per_head=eager_full.entries_per_head,
            peak_memory_mib=None,
            extra={"decoding": label, "x_eager": tokens_per_s / eager_full.tokens_per_s, "warmup_s": warmup},
        ))
    for row in rows:
        row.ratio = row.tokens_per_s / rows[0].tokens_per_s
    return rows
