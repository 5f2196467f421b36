"""What a GPU adds to the CPU suite, as printed tables: the oracle matrix (``kvbench verify``'s checks for every press
on the five tiny architectures) in bfloat16 on the device, and the compiled decoding step (inductor, CUDA graphs)
against eager decoding, token for token. ``benchmarks/gpu_check.sh`` runs it, then the speed benchmark.

    python -m benchmarks.gpu_check --device cuda --dtype bfloat16
    python -m benchmarks.gpu_check --device cpu --presses h2o --archs tiny-llama   # a smoke run of the script

bfloat16 rounds differently from the float32 the suite checks in: a failing check is reported with its first
difference (step, layer, head), to be read against the same check in float32.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from kvbench.engine.compiled import compile_refusal
from kvbench.engine.generate import GenerationSettings, generate
from kvbench.models import build_tiny
from kvbench.presses import PRESSES, for_tokenizer, make_press
from kvbench.runs.calibrate import write_tiny_calibration
from kvbench.verify import ARCHITECTURES, VerifyConfig, run_checks

#: Parameters that make a press evict within the tiny models' short generations (as ``kvbench verify -a`` takes
#: them; the test suite's settings): small buffers and windows, SepLLM's windows below budget 16, RLKV's sinks.
TINY_ARGS = {
    "rkv": {"buffer": "4"}, "hott-rkv": {"buffer": "4"}, "hott-rkv-fixed": {"buffer": "4"}, "keydiff": {"buffer": "4"},
    "gkv": {"buffer": "4", "window_size": "2"}, "morphkv": {"window_size": "4"}, "triattention": {"buffer": "4"},
    "expected-attention": {"buffer": "4", "n_sink": "2", "n_future_positions": "16"},
    "quest": {"chunk_size": "4", "dense_layers": "1"}, "rpc": {"window_size": "1"},
    "hott-snapkv-d": {"window_size": "4"}, "hott-snapkv-d-fixed": {"window_size": "4"},
    "shadowkv": {"chunk_size": "2", "local_window": "2", "outlier_chunks": "1"},
    "sepllm": {"n_init": "1", "sep_cache_size": "2", "local_size": "4"}, "rlkv": {"n_sink": "2"},
}


def oracle_matrix(presses: list[str], archs: tuple[str, ...], device: str, dtype: str) -> None:
    print("| press | architecture | passed | failed | n/a | first failure | seconds |\n|---|---|---|---|---|---|---|")
    for press in presses:
        start = time.perf_counter()
        args = tuple(f"{k}={v}" for k, v in TINY_ARGS.get(press, {}).items())
        results = run_checks(VerifyConfig(press=press, press_args=args, architectures=archs, device=device,
                                          dtype=dtype))
        seconds = time.perf_counter() - start
        for arch, outcomes in results.items():
            failed = [o for o in outcomes if o.failed]
            first = f"{failed[0].check}: {failed[0].where}" if failed else ""
            print(f"| {press} | {arch} | {sum(o.status == 'pass' for o in outcomes)} | {len(failed)} | "
                  f"{sum(o.status == 'n/a' for o in outcomes)} | {first} | {seconds / len(results):.1f} |", flush=True)


def tiny_press(name: str, model, tokenizer, workdir: Path):
    """A maker of press ``name`` for the tiny model: verify's small settings, its calibration written for it once
    (TriAttention's statistics, RLKV's gates), what it reads of the tokenizer resolved (SepLLM's separators)."""
    cls = PRESSES[name]
    args = dict(TINY_ARGS.get(name, {}))
    if cls.calibration is not None:
        args[cls.calibration] = str(write_tiny_calibration(name, model, tokenizer, workdir))
    return lambda: for_tokenizer(make_press(name, args), tokenizer)


def compiled_against_eager(presses: list[str], device: str, dtype: str, steps: int = 128) -> None:
    print("\n| press | backend | same tokens (of 2 x 128) | first difference | compile s |\n|---|---|---|---|---|")
    model, tokenizer = build_tiny("tiny-qwen2")
    model.to(device=device, dtype=getattr(torch, dtype)).eval()
    prompts = [[1 + (i * 7) % 50 for i in range(40)], [3 + (i * 5) % 40 for i in range(23)]]
    settings = GenerationSettings(max_new_tokens=steps)
    workdir = Path(tempfile.mkdtemp(prefix="kvbench-gpu-check-"))
    for name in presses:
        press = tiny_press(name, model, tokenizer, workdir)
        if compile_refusal(press(), 16):
            continue
        torch._dynamo.reset()
        start = time.perf_counter()
        compiled = generate(model, prompts, press(), 16, settings, compile_backend="inductor")
        seconds = time.perf_counter() - start
        eager = generate(model, prompts, press(), 16, settings)
        same = [next((i for i, (a, b) in enumerate(zip(c.tokens, e.tokens)) if a != b), len(c.tokens))
                for c, e in zip(compiled, eager)]
        first = "none" if all(s == steps for s in same) else f"token {min(same)}"
        print(f"| {name} | inductor | {sum(same)} | {first} | {seconds:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--presses", default=",".join(sorted(PRESSES)))
    parser.add_argument("--archs", default=",".join(ARCHITECTURES))
    args = parser.parse_args()
    presses = args.presses.split(",")
    print(f"## Oracle matrix, {args.dtype} on {args.device}\n")
    oracle_matrix(presses, tuple(args.archs.split(",")), args.device, args.dtype)
    print(f"\n## Compiled decoding step against eager, {args.dtype} on {args.device}")
    compiled_against_eager(presses, args.device, args.dtype)


if __name__ == "__main__":
    main()
