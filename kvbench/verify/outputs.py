"""Checks on what a run produces: against the full cache and HF ``generate``, against a masked forward, batched
against alone, and one run against the same run again."""

from __future__ import annotations

import torch

from kvbench.engine.generate import GenerationSettings, generate
from kvbench.presses import make_press
from kvbench.verify.oracle import AttentionOutputs, hf_greedy, masked_logits, masks_from_kept
from kvbench.verify.subject import NotApplicable, Outcome, Subject, decode_length, first_kept_difference, where

#: Logits and attention outputs of the engine and of the masked forward agree to this (both float32).
TOLERANCE = 1e-4


def full_cache(subject: Subject) -> Outcome:
    """A budget no sequence reaches evicts nothing and changes nothing: the same tokens as the full cache and as
    transformers' ``generate``."""
    prompt, n_new = subject.prompt(40), 40
    settings = GenerationSettings(max_new_tokens=n_new)
    ours = generate(subject.model, [prompt], subject.make(), len(prompt) + n_new, settings)[0]
    full = generate(subject.model, [prompt], make_press("full"), None, settings)[0]
    reference = hf_greedy(subject.model, prompt, n_new)
    differ = [t for t, (a, b, c) in enumerate(zip(ours.tokens, full.tokens, reference)) if not a == b == c]
    worst = f"{len(differ)}/{n_new} tokens differ, {int(ours.evicted_tokens)} evicted"
    if ours.evicted_tokens:
        return Outcome("full-cache", "fail", worst, "evicted although every token fits the budget")
    if differ or len(ours.tokens) != n_new:
        return Outcome("full-cache", "fail", worst, where(differ[0] if differ else len(ours.tokens)))
    return Outcome("full-cache", "pass", worst)


def masking(subject: Subject, budget: int) -> Outcome:
    """Every step's logits equal an independent full forward in which each query sees exactly what the cache
    held (the prompt causally, then the kept set plus itself)."""
    press = subject.make()
    if not press.evicts:
        raise NotApplicable("evicts nothing")
    if press.sparse or press.selects:
        raise NotApplicable("attends a selection and evicts nothing (its own oracle test covers it)")
    prompt = subject.prompt(30)
    n_new = decode_length(press, budget, len(prompt), floor=36)
    kept: list = []
    out = generate(subject.model, [prompt], press, budget, GenerationSettings(max_new_tokens=n_new),
                   record_logits=True, on_step=_kept_recorder(kept, [0]))[0]
    if not out.evicted_tokens:
        return Outcome("masking", "fail", "nothing evicted", f"budget {budget}, {n_new} new tokens")
    tokens = prompt + out.tokens[:-1]
    layers, heads = subject.shape
    masks = masks_from_kept(kept, len(prompt), len(tokens), layers, heads)
    expected = masked_logits(subject.model, tokens, masks)[len(prompt) - 1:]
    deviation = (torch.stack(out.logits) - expected).abs()
    worst = f"max Δlogit {float(deviation.max()):.1e}"
    bad = (deviation > TOLERANCE * (1 + expected.abs())).any(dim=-1).nonzero()
    if len(bad):
        return Outcome("masking", "fail", worst,
                       _localize(subject, press, budget, prompt, tokens, masks, n_new) or where(int(bad[0])))
    return Outcome("masking", "pass", worst)


def _localize(subject, press, budget, prompt, tokens, masks, n_new) -> str | None:
    """Step, layer and KV head where the engine's attention output first departs from the masked forward's."""
    model = subject.model
    with AttentionOutputs(model) as ours:
        generate(model, [prompt], press, budget, GenerationSettings(max_new_tokens=n_new))
    with AttentionOutputs(model) as reference:
        masked_logits(model, tokens, masks)
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    for step in range(1, len(ours.outputs[0])):
        for layer, (mine, theirs) in enumerate(zip(ours.outputs, reference.outputs)):
            gap = (mine[step][-1] - theirs[0][len(prompt) + step - 1]).abs().amax(dim=-1)  # [H_q]
            if float(gap.max()) > TOLERANCE:
                return where(step, layer, int(gap.argmax()) // group)
    return None


def batched(subject: Subject, budget: int) -> Outcome:
    """Prompts of different lengths decoded together give, token for token and eviction for eviction, what each
    gives alone, some ending early (EOS) beside others that go on."""
    press = subject.make()
    if not press.batch_invariant:
        raise NotApplicable("not batch-invariant by design: runs decode it one sequence at a time")
    ids = subject.prompt(31)
    prompts = [ids[:31], ids[5:14], ids[:22], ids[3:7]]
    n_new = decode_length(press, budget, 31, floor=30)
    free = [o.tokens for o in generate(subject.model, prompts, press, budget, GenerationSettings(max_new_tokens=n_new))]
    eos = next((t for t in free[1][5:] if any(t not in other for other in free)), None)
    settings = GenerationSettings(max_new_tokens=n_new, eos_token_ids=() if eos is None else (eos,), seed=1)
    alone_kept: list[list] = [[] for _ in prompts]
    alone = [generate(subject.model, [p], press, budget, settings, seeds=[i],
                      on_step=_kept_recorder(alone_kept[i], [0]))[0] for i, p in enumerate(prompts)]
    together_kept: list[list] = [[] for _ in prompts]
    together = generate(subject.model, prompts, press, budget, settings, seeds=list(range(len(prompts))),
                        on_step=_kept_recorder(together_kept, range(len(prompts)), per_row=True))
    differ = [i for i, (a, b) in enumerate(zip(alone, together))
              if (a.tokens, a.evicted_tokens, a.peak_kv_bytes) != (b.tokens, b.evicted_tokens, b.peak_kv_bytes)]
    early = sum(o.finish_reason == "eos" for o in alone)
    worst = f"{len(differ)}/{len(prompts)} sequences differ, {early} ended early"
    for row in range(len(prompts)):
        found = first_kept_difference(alone_kept[row], together_kept[row])
        if found:
            return Outcome("batch", "fail", worst, where(found[0], found[1], found[2], row=row))
    if differ:
        row = differ[0]
        step = next((t for t, (a, b) in enumerate(zip(alone[row].tokens, together[row].tokens)) if a != b), 0)
        return Outcome("batch", "fail", worst, where(step, row=row))
    if press.evicts and not (press.sparse or press.selects) and not sum(o.evicted_tokens for o in alone):
        return Outcome("batch", "fail", "nothing evicted", f"budget {budget}, {n_new} new tokens")
    return Outcome("batch", "pass", worst)


def _kept_recorder(into: list, rows, per_row: bool = False):
    """An ``on_step`` hook appending each step's kept sets (nothing for a cache that keeps no slots)."""
    def record(cache, step):
        if not hasattr(cache, "kept_positions"):
            return
        for row in rows:  # a finished sequence's frozen steps are beyond its run alone: never compared
            (into[row] if per_row else into).append(cache.kept_positions(row))
    return record


def deterministic(subject: Subject, budget: int) -> Outcome:
    """The same press object run twice gives the same tokens and keeps the same entries at every step."""
    press = subject.make()
    prompt = subject.prompt(30)
    n_new = decode_length(press, budget, len(prompt), floor=36)
    runs = []
    for _ in range(2):
        kept: list = []
        out = generate(subject.model, [prompt], press, budget, GenerationSettings(max_new_tokens=n_new),
                       on_step=_kept_recorder(kept, [0]))[0]
        runs.append((out, kept))
    (first, first_kept), (second, second_kept) = runs
    found = first_kept_difference(first_kept, second_kept)
    differ = sum(a != b for a, b in zip(first.tokens, second.tokens))
    worst = f"{differ}/{n_new} tokens differ"
    if found:
        return Outcome("deterministic", "fail", worst, where(*found))
    if first.tokens != second.tokens or first.evicted_tokens != second.evicted_tokens:
        return Outcome("deterministic", "fail", worst,
                       where(next((t for t, (a, b) in enumerate(zip(first.tokens, second.tokens)) if a != b), 0)))
    return Outcome("deterministic", "pass", worst)
