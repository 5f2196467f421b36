"""A small synthetic result store with known numbers, for report golden tests."""

import json
from datetime import datetime, timezone

from kvbench.presses import make_press
from kvbench.store import SCHEMA, ResultStore

# (press, press args as pairs, budget, dataset) -> correct flags of 4 examples
OUTCOMES = {
    ("full", (), None, "gsm8k"): [1, 1, 1, 1],
    ("h2o", (), 64, "gsm8k"): [1, 1, 0, 0],
    ("h2o", (), 128, "gsm8k"): [1, 1, 1, 0],
    ("snapkv-d", (), 64, "gsm8k"): [1, 1, 1, 1],
    ("snapkv-d", (), 128, "gsm8k"): [1, 1, 1, 0],
    ("full", (), None, "folio"): [1, 1, 0, 0],
    ("h2o", (), 64, "folio"): [1, 0, 0, 0],
    ("h2o", (), 128, "folio"): [1, 1, 0, 0],
    ("snapkv-d", (), 64, "folio"): [0, 0, 0, 0],
    ("snapkv-d", (), 128, "folio"): [1, 1, 0, 0],
}


def row(press, args, budget, dataset, index, correct, **overrides):
    args = dict(args)
    params = make_press(press, {k: str(v) for k, v in args.items()}).params()
    base = {name: None for name in SCHEMA.names}
    base.update(
        run_key=f"{press}-{json.dumps(args, sort_keys=True)}-{budget}-{dataset}-{overrides.get('dataset_version', 1)}",
        created_at=datetime(2026, 1, 1, tzinfo=timezone.utc), model="demo/model", model_source="hf",
        press=press, press_args=json.dumps(params, sort_keys=True), budget=budget, buffer=1, dataset=dataset,
        dataset_version=1, split="test", prompt_hash="abc", example_id=f"{dataset}-{index}", sample=0, seed=0,
        max_new_tokens=64, temperature=0.0, top_p=1.0, prompt="p", response="r", gold="1",
        extracted=None if (index == 3 and not correct) else "1", correct=bool(correct), metrics="{}",
        finish_reason="length" if index == 0 else "eos", prompt_tokens=50, output_tokens=100 + 10 * index,
        prefill_s=0.1, decode_s=1.0, tokens_per_s=100.0, peak_kv_bytes=(budget or 512) * 1024,
        evicted_tokens=0.0, mean_cache_len=float(budget or 300), kvbench_version="0", device="cpu",
        dtype="float32",
    )
    base.update(overrides)
    return base


def build(path, extra_rows=()):
    rows = [row(p, a, b, d, i, c) for (p, a, b, d), flags in OUTCOMES.items() for i, c in enumerate(flags)]
    ResultStore(path).append(rows + list(extra_rows))
    return path
