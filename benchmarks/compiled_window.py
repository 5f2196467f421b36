"""Why a compiled window-scoring press (snapkv-d) is slower than eager at batch 8 on the CPU: the decoding step of
one press decoded four ways, side by side, one step each in turn (so that drift of the machine is shared):

- eager, the window's attention kept between steps (``kvbench.engine.window``: the CPU default);
- eager, recomputed every step over the slots in use;
- eager, recomputed every step over every preallocated slot (``static_shapes``: the compiled step's shapes);
- compiled (``--compile``: static shapes, recomputed, in graphs);
- the full cache eager and compiled, for scale.

    python -m benchmarks.compiled_window                       # snapkv-d, budget 128, batch 8, 128 + 512 tokens
    python -m benchmarks.compiled_window --press h2o --batch 1

Prints tok/s, ms/step and the ratio to the first row; the compiled cells are warmed up (compiled) before timing.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from kvbench.bench.timing import timed_step
from kvbench.engine.generate import GenerationSettings, generation
from kvbench.presses import for_tokenizer, make_press
from kvbench.runs.session import load_session


def variants(press: str, budget: int) -> list[tuple[str, str, int | None, dict]]:
    """(label, press, budget, generation options) of each way the step is decoded."""
    return [
        (f"{press} eager, window attention kept", press, budget, {"keep_window_attention": True}),
        (f"{press} eager, recomputed", press, budget, {"keep_window_attention": False}),
        (f"{press} eager, recomputed, static shapes", press, budget,
         {"keep_window_attention": False, "static_shapes": True}),
        (f"{press} compiled (inductor)", press, budget, {"compile_backend": "inductor"}),
        ("full eager", "full", None, {}),
        ("full compiled (inductor)", "full", None, {"compile_backend": "inductor"}),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--press", default="snapkv-d")
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=8)
    args = parser.parse_args()
    session = load_session("smollm2-135m", "float32", "cpu", 0, False)
    model, tokenizer = session.loaded.model, session.loaded.tokenizer
    vocab = model.config.get_text_config(decoder=True).vocab_size
    prompts = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
    settings = GenerationSettings(max_new_tokens=args.gen_len)
    cells = variants(args.press, args.budget)

    def start(press: str, budget: int | None, options: dict):
        return generation(model, prompts.tolist(), for_tokenizer(make_press(press), tokenizer), budget, settings,
                          **options)

    for _, press, budget, options in cells:  # warm-up: kernels, allocator, the compilation at these shapes
        steps = start(press, budget, options)
        for _ in range(args.warmup + 1):
            next(steps)
        steps.close()
    running = [start(press, budget, options) for _, press, budget, options in cells]
    for steps in running:
        next(steps)  # the prefill, not timed
    times: list[list[float]] = [[] for _ in cells]
    for _ in range(args.gen_len - 1):
        for i, steps in enumerate(running):
            seconds, finished, _ = timed_step(steps, lambda: None)
            if not finished:
                times[i].append(seconds)
    base = statistics.median(times[0])
    print(f"| decoding ({args.batch} x {args.prompt_len} + {args.gen_len}) | tok/s | ms/step (median) | × first |")
    print("|---|---|---|---|")
    for (label, *_), t in zip(cells, times):
        step = statistics.median(t)
        print(f"| {label} | {args.batch / step:.2f} | {step * 1e3:.1f} | {base / step:.2f} |")


if __name__ == "__main__":
    main()
