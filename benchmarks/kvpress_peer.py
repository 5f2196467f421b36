"""kvbench's ``keydiff`` and ``expected-attention`` against NVIDIA kvpress 0.5.5, token for token, on the embedded
model (smollm2-135m), greedy, float32, batch 1, on the first GSM8K test questions.

kvpress 0.5.5 needs transformers < 5.3 and kvbench a newer one, so the comparison runs in two virtual environments
that exchange JSON files in one folder (``--out``):

    # 1. kvbench's venv: the prompts kvbench's `run` builds, kvbench's tokens, the model exported in HF format
    KVBENCH_DATA_DIR=/work/shared/data python -m benchmarks.kvpress_peer kvbench --out /tmp/peer
    # 2. kvpress's venv (torch 2.13 CPU, transformers >=4.56,<5.3, kvpress 0.5.5): kvpress's tokens
    /tmp/kvpvenv/bin/python -m benchmarks.kvpress_peer kvpress --out /tmp/peer
    # 3. either venv: the table
    python -m benchmarks.kvpress_peer compare --out /tmp/peer

A setting ``press:B:N`` is kvbench's ``press`` at ``--budget B -a buffer=N`` against kvpress's
``DecodingPress(<Press>(), compression_interval=N, target_size=B)`` (expected-attention: kvbench's defaults and
``hidden_states_buffer_size=256``; ``expected-attention:B:N:Q[:H]`` sets kvbench's ``query_buffer`` to Q and
kvpress's ``hidden_states_buffer_size`` to H, default Q), applied as ``with press(model):
model.generate(ids, max_new_tokens=..., do_sample=False)``. ``full`` (no press, no budget) checks the two generation
loops themselves. ``--trace press:B:N:example`` records, at every compression of that one generation, the positions
each layer and KV head keeps, on both sides; ``compare`` reports the first compression where they differ.

Takes about 20 minutes a half with the default settings on one core (``OMP_NUM_THREADS=1``).

Only the kvbench half imports kvbench; the kvpress half imports kvpress and transformers only.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

DEFAULT_SETTINGS = ("full", "keydiff:128:48", "keydiff:96:96", "keydiff:64:32",
                    "expected-attention:128:48", "expected-attention:96:96", "expected-attention:64:32")
PROMPTS = "prompts.json"
SIDES = {"kvbench": "kvbench_tokens.json", "kvpress": "kvpress_tokens.json"}
LOGITS = "logits_kvbench.pt"


def parse_setting(text: str) -> tuple[str, int | None, int | None, int | None, int | None]:
    """``full`` or ``press:B:N`` -> (press, B, N, Q, H); expected-attention may add ``:Q`` (kvbench's
    ``query_buffer``, default 256) and ``:H`` (kvpress's ``hidden_states_buffer_size``, default Q)."""
    if text == "full":
        return "full", None, None, None, None
    press, *numbers = text.split(":")
    if press not in ("keydiff", "expected-attention") or not 2 <= len(numbers) <= (4 if press != "keydiff" else 2):
        raise SystemExit(f"bad setting {text!r}: full, keydiff:B:N or expected-attention:B:N[:Q[:H]]")
    budget, buffer, *rest = (int(n) for n in numbers)
    query = rest[0] if rest else (256 if press == "expected-attention" else None)
    hidden = rest[1] if len(rest) > 1 else query
    return press, budget, buffer, query, hidden


def press_args(text: str) -> dict[str, str]:
    """kvbench's ``-a`` arguments of a setting."""
    name, _, buffer, query, _ = parse_setting(text)
    if name == "full":
        return {}
    return {"buffer": str(buffer), **({"query_buffer": str(query)} if name == "expected-attention" else {})}


def parse_traces(texts: list[str] | None) -> set[tuple[str, str]]:
    """``press:B:N:example`` each -> (setting, example id)."""
    traces = set()
    for text in texts or []:
        setting, _, example = text.rpartition(":")
        parse_setting(setting)
        traces.add((setting, example))
    return traces


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


# --- kvbench's half -------------------------------------------------------------------------------------------

def kvbench_half(args) -> None:
    import torch

    from kvbench.engine.generate import GenerationSettings, generate
    from kvbench.presses import make_press
    from kvbench.runs.config import RunConfig
    from kvbench.runs.plan import prepared_task
    from kvbench.runs.session import load_session
    from kvbench.tasks import load_examples

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    session = load_session("smollm2-135m", dtype="float32", device="cpu")  # kvbench.models.load, as `run` does
    print(f"model loaded from {session.loaded.spec.source} {session.loaded.spec.gguf_file or session.loaded.spec.path}"
          f" in {time.perf_counter() - start:.0f}s", flush=True)
    model, tokenizer = session.loaded.model, session.loaded.tokenizer
    # `kvbench run --model smollm2-135m -d gsm8k`'s task: its protocol (kvbench), the model's system prompt default
    task = prepared_task(RunConfig(model="smollm2-135m", dataset="gsm8k", dtype="float32", device="cpu"))
    examples = load_examples(task, None, args.data_dir)[: args.questions]  # the first questions of the test split
    codec = session.codec(task)
    prompts = [{"id": e.id, "ids": codec.encode(codec.prompt(e))} for e in examples]
    eos = list(codec.eos)
    write_json(out / PROMPTS, {"prompts": prompts, "eos": eos, "pad_token_id": tokenizer.pad_token_id,
                               "max_new_tokens": args.max_new_tokens, "settings": list(args.settings),
                               "trace": args.trace, "transformers": _version("transformers"),
                               "torch": torch.__version__})
    print("prompt tokens:", ", ".join(f"{p['id']} {len(p['ids'])}" for p in prompts), flush=True)

    if args.export:
        export(model, tokenizer, Path(args.export))
    with torch.inference_mode():  # the logits check: plain forward of the first prompt
        logits = model(input_ids=torch.tensor([prompts[0]["ids"]])).logits[0].float()
    torch.save(logits, out / LOGITS)

    trace = parse_traces(args.trace)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, eos_token_ids=tuple(eos))
    runs, traces = [], {}
    for text in args.settings:
        name, budget, *_ = parse_setting(text)
        for prompt in prompts:
            press = make_press(name, press_args(text))
            recorder = KeptSets(len(prompt["ids"])) if (text, prompt["id"]) in trace else None
            t0 = time.perf_counter()
            output = generate(model, [prompt["ids"]], press, budget, settings, pad_token_id=tokenizer.pad_token_id,
                              detokenize=codec.decode, on_step=recorder)[0]
            runs.append({"setting": text, "id": prompt["id"], "tokens": output.tokens,
                         "finish": output.finish_reason, "text": output.text})
            if recorder is not None:
                traces[f"{text}:{prompt['id']}"] = recorder.kept
            print(f"kvbench {text} {prompt['id']}: {len(output.tokens)} tokens ({output.finish_reason}) in "
                  f"{time.perf_counter() - t0:.1f}s", flush=True)
    write_json(out / SIDES["kvbench"], {"runs": runs, "traces": traces})


def export(model, tokenizer, directory: Path) -> None:
    """The model in HF format, float32, without the GGUF quantization record (kvpress's venv loads no GGUF). The
    GGUF loader dequantized the weights to float32 but left its quantizer on the model, which refuses to save."""
    directory.mkdir(parents=True, exist_ok=True)
    quantizer = model.__dict__.get("hf_quantizer")
    model.hf_quantizer = None
    try:
        model.save_pretrained(directory)
    finally:
        model.hf_quantizer = quantizer
    tokenizer.save_pretrained(directory)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    write_json(config_path, config)
    print(f"exported to {directory}", flush=True)


class KeptSets:
    """kvbench's ``on_step`` hook: after a forward that evicted, each layer's and KV head's kept positions."""

    def __init__(self, prompt_length: int) -> None:
        self.prompt_length = prompt_length
        self.kept: dict[str, list[list[list[int]]]] = {}
        self.held: int | None = None

    def __call__(self, cache, step: int) -> None:
        valid = cache.valid[:, 0]  # [layers, heads, slots]
        held = int(valid[0, 0].sum())
        if (step == 0 and held < self.prompt_length) or (self.held is not None and held < self.held + 1):
            positions = cache.positions[:, 0]
            self.kept[str(step)] = [[sorted(positions[layer, head][valid[layer, head]].tolist())
                                     for head in range(valid.shape[1])] for layer in range(valid.shape[0])]
        self.held = held


# --- kvpress's half -------------------------------------------------------------------------------------------

def kvpress_half(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    spec = json.loads((out / PROMPTS).read_text(encoding="utf-8"))
    transformers_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([spec["prompts"][0]["ids"]])).logits[0].float()
    reference = torch.load(out / LOGITS)
    check = {"max_abs_diff": float((logits - reference).abs().max()),
             "max_abs_logit": float(reference.abs().max()),
             "argmax_agree": int((logits.argmax(-1) == reference.argmax(-1)).sum()), "positions": len(logits)}
    print("logits check:", check, flush=True)
    trace = parse_traces(spec.get("trace"))
    runs, traces = [], {}
    for text in spec["settings"]:
        for prompt in spec["prompts"]:
            recorder = (text, prompt["id"]) in trace
            t0 = time.perf_counter()
            tokens, kept = kvpress_generate(model, text, prompt["ids"], spec, recorder)
            runs.append({"setting": text, "id": prompt["id"], "tokens": tokens})
            if recorder:
                traces[f"{text}:{prompt['id']}"] = kept
            print(f"kvpress {text} {prompt['id']}: {len(tokens)} tokens in {time.perf_counter() - t0:.1f}s", flush=True)
    write_json(out / SIDES["kvpress"], {"runs": runs, "traces": traces, "logits_check": check,
                                        "versions": {"transformers": _version("transformers"),
                                                     "kvpress": _version("kvpress"), "torch": torch.__version__}})


def kvpress_press(text: str):
    from kvpress import DecodingPress, ExpectedAttentionPress, KeyDiffPress

    name, budget, buffer, _, hidden = parse_setting(text)
    if name == "keydiff":
        return DecodingPress(KeyDiffPress(), compression_interval=buffer, target_size=budget)
    return DecodingPress(ExpectedAttentionPress(), compression_interval=buffer, target_size=budget,
                         hidden_states_buffer_size=hidden)


def kvpress_generate(model, text: str, ids: list[int], spec: dict, record: bool) -> tuple[list[int], dict]:
    """kvpress's own way: the press's hooks on the attention layers around ``model.generate`` (one prefill forward,
    then one forward per token). With ``record``, the kept positions after every compression."""
    import contextlib

    import torch

    input_ids = torch.tensor([ids])
    kwargs = dict(max_new_tokens=spec["max_new_tokens"], do_sample=False, eos_token_id=spec["eos"],
                  pad_token_id=spec["pad_token_id"], attention_mask=torch.ones_like(input_ids),
                  temperature=None, top_p=None, top_k=None)
    press = None if text == "full" else kvpress_press(text)
    kept: dict = {}
    with torch.inference_mode(), press(model) if press is not None else contextlib.nullcontext():
        hooks = _record_kept(model, press, len(ids), kept) if record and press is not None else []
        try:
            output = model.generate(input_ids, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
    return output[0, len(ids):].tolist(), kept


def _record_kept(model, press, prompt_length: int, kept: dict) -> list:
    """Hooks run after the press's: track each cache slot's position, and gather them as the press gathered its
    keys (the same ``topk`` of the same scores) whenever a compression shrank the layer's cache."""
    import torch

    scores_of: dict[int, torch.Tensor] = {}
    base = press.base_press
    score = base.score

    def recording_score(module, *rest, **kw):
        scores = score(module, *rest, **kw)
        scores_of[module.layer_idx] = scores
        return scores

    base.score = recording_score
    positions: dict[int, torch.Tensor] = {}
    layers = model.model.layers

    def hook(module, _args, kwargs, output):
        layer = module.layer_idx
        cache_position = kwargs["cache_position"]
        cache = kwargs["past_key_values"]
        length = cache.layers[layer].keys.shape[2]
        heads = cache.layers[layer].keys.shape[1]
        if int(cache_position[-1]) + 1 == kwargs["hidden_states"].shape[1]:  # the prefill
            positions[layer] = cache_position[None].expand(heads, -1).clone()
            return output
        positions[layer] = torch.cat([positions[layer], cache_position[None].expand(heads, -1)], dim=1)
        if length < positions[layer].shape[1]:
            indices = scores_of.pop(layer)[0].topk(length, dim=-1).indices
            positions[layer] = positions[layer].gather(1, indices)
            step = int(cache_position[-1]) - prompt_length + 1  # the decoding forward's number
            kept.setdefault(str(step), [None] * len(layers))[layer] = [sorted(p.tolist()) for p in positions[layer]]
        return output

    handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in layers]

    class Restore:
        def remove(self):
            base.__dict__.pop("score", None)

    return [*handles, Restore()]


# --- the comparison -------------------------------------------------------------------------------------------

def compare(args) -> None:
    out = Path(args.out)
    spec = json.loads((out / PROMPTS).read_text(encoding="utf-8"))
    sides = {side: json.loads((out / name).read_text(encoding="utf-8")) for side, name in SIDES.items()}
    runs = {side: {(r["setting"], r["id"]): r["tokens"] for r in data["runs"]} for side, data in sides.items()}
    lengths = {p["id"]: len(p["ids"]) for p in spec["prompts"]}
    check = sides["kvpress"]["logits_check"]
    print(f"Logits check (first prompt, {check['positions']} positions, plain forward): max |difference| "
          f"{check['max_abs_diff']:.3g} (largest |logit| {check['max_abs_logit']:.3g}); argmax agrees at "
          f"{check['argmax_agree']}/{check['positions']} positions.\n")
    print("| press | B | N | question | prompt tokens | kvbench tokens | kvpress tokens | first difference "
          "| tokens agreeing |\n|---|---|---|---|---|---|---|---|---|")
    summary: dict[str, list[int]] = {}
    for text in spec["settings"]:
        name, budget, buffer, query, hidden = parse_setting(text)
        label = name if query in (None, 256) and hidden == query else f"{name} (Q={query}, H={hidden})"
        for prompt in spec["prompts"]:
            a, b = runs["kvbench"][(text, prompt["id"])], runs["kvpress"][(text, prompt["id"])]
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            if first is None and len(a) != len(b):
                first = min(len(a), len(b))
            agree = min(len(a), len(b)) if first is None else first
            over = "" if budget is None or lengths[prompt["id"]] <= budget + buffer else " (> B+N)"
            print(f"| {label} | {budget or '-'} | {buffer or '-'} | {prompt['id']} | {lengths[prompt['id']]}{over} "
                  f"| {len(a)} | {len(b)} | {'identical' if first is None else first} | {agree} |")
            counts = summary.setdefault(text, [0, 0, 0, 0])
            counts[0] += first is None
            counts[1] += 1
            counts[2] += agree
            counts[3] += max(len(a), len(b))
    print("\n| setting | identical sequences | tokens agreeing before the first difference |\n|---|---|---|")
    for text, (same, total, agree, tokens) in summary.items():
        print(f"| {text} | {same}/{total} | {agree}/{tokens} |")
    for key, kvbench_kept in sides["kvbench"].get("traces", {}).items():
        report_trace(key, kvbench_kept, sides["kvpress"].get("traces", {}).get(key, {}))


def report_trace(key: str, ours: dict, theirs: dict) -> None:
    print(f"\nKept sets of {key}: kvbench compressed after forwards {sorted(map(int, ours))}, kvpress after "
          f"{sorted(map(int, theirs))}")
    for step in sorted(set(ours) | set(theirs), key=int):
        a, b = ours.get(step), theirs.get(step)
        if a is None or b is None:
            print(f"  forward {step}: only {'kvbench' if b is None else 'kvpress'} compressed")
            continue
        diffs = [(layer, head, sorted(set(x) - set(y)), sorted(set(y) - set(x)))
                 for layer, (ha, hb) in enumerate(zip(a, b)) for head, (x, y) in enumerate(zip(ha, hb)) if x != y]
        if not diffs:
            print(f"  forward {step}: identical kept sets in all {len(a)} layers x {len(a[0])} heads")
            continue
        layer, head, only_a, only_b = diffs[0]
        print(f"  forward {step}: {len(diffs)} (layer, head) sets differ; first layer {layer} head {head}: kvbench "
              f"only {only_a[:10]}, kvpress only {only_b[:10]}")


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kvpress_peer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="half", required=True)
    ours = sub.add_parser("kvbench", help="in kvbench's venv: prompts, kvbench's tokens, the HF-format export")
    ours.add_argument("--out", required=True, help="folder the halves exchange their JSON files in")
    ours.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS),
                      help="full, keydiff:B:N, or expected-attention:B:N[:Q[:H]] (Q: kvbench's query_buffer, "
                      "H: kvpress's hidden_states_buffer_size; default 256 and Q)")
    ours.add_argument("--questions", type=int, default=5, help="the first N questions of GSM8K's test split")
    ours.add_argument("--max-new-tokens", type=int, default=256)
    ours.add_argument("--data-dir", default=os.environ.get("KVBENCH_DATA_DIR"), help="(default: $KVBENCH_DATA_DIR)")
    ours.add_argument("--export", default="/tmp/smollm2-hf", help="where to save the model in HF format ('' = skip)")
    ours.add_argument("--trace", nargs="*", default=[], help="press:B:N:example id, e.g. keydiff:128:48:gsm8k-0: "
                      "record the kept positions at every compression of that generation (both halves)")
    ours.add_argument("--threads", type=int, default=1)
    theirs = sub.add_parser("kvpress", help="in kvpress's venv: kvpress's tokens for the same prompts and settings")
    theirs.add_argument("--out", required=True)
    theirs.add_argument("--model", default="/tmp/smollm2-hf", help="the HF-format export of the kvbench half")
    theirs.add_argument("--threads", type=int, default=1)
    table = sub.add_parser("compare", help="the markdown table of both halves' tokens")
    table.add_argument("--out", required=True)
    args = parser.parse_args()
    {"kvbench": kvbench_half, "kvpress": kvpress_half, "compare": compare}[args.half](args)


if __name__ == "__main__":
    main()
