"""Checks on how a press uses the cache: the slots it may hold, the memory each step allocates, what its scores
may depend on, and where it keeps its state."""

from __future__ import annotations

import copy
import dataclasses

import torch

from kvbench.engine.cache import slot_capacity
from kvbench.engine.generate import GenerationSettings, generate
from kvbench.presses.ranking import slot_ranks
from kvbench.verify.oracle import AllocationMeter
from kvbench.verify.subject import NotApplicable, Outcome, Subject, decode_length, where


def _evicting(press) -> None:
    if not press.evicts or press.sparse or press.selects:
        raise NotApplicable("evicts nothing")


def bounded(subject: Subject, budget: int) -> Outcome:
    """The cache never allocates more slots than the press declares (``capacity``) and, after every step, no
    head holds as many entries as would trigger a compression."""
    press = subject.make()
    _evicting(press)
    prompt = subject.prompt(30)
    n_new = decode_length(press, budget, len(prompt), floor=60)
    layers, heads = subject.shape
    bound = slot_capacity(press, budget, layers, heads, len(prompt) + n_new)
    first: list = []
    most = [0]

    def check(cache, step):
        for index, layer in enumerate(cache.layers):
            held = layer.valid[0].sum(dim=-1)  # [H]
            most[0] = max(most[0], int(held.max()))
            if not first and (layer.keys.shape[2] > bound or int(held.max()) >= bound):
                first.append(where(step, index, int(held.argmax())))

    out = generate(subject.model, [prompt], press, budget, GenerationSettings(max_new_tokens=n_new), on_step=check)[0]
    worst = f"most held {most[0]} of {bound} slots"
    if first:
        return Outcome("bounded", "fail", worst, first[0])
    if not out.evicted_tokens:
        return Outcome("bounded", "fail", "nothing evicted", f"budget {budget}, {n_new} new tokens")
    return Outcome("bounded", "pass", worst)


def no_growth(subject: Subject, budget: int = 24) -> Outcome:
    """Once the cache is full, a step allocates no more than the steps before it: the bytes every operation
    creates, per step, repeat (a cycle of compressions) instead of growing with the generated length."""
    press = subject.make()
    if getattr(press, "grows", False):
        raise NotApplicable("its schedule keeps more as the sequence grows, by design")
    if not press.evicts or press.selects:
        raise NotApplicable("the full cache grows by design")
    prompt = subject.prompt(20)
    layers, heads = subject.shape
    keep, trigger = press.cadence(budget)
    # full once every slot is in use (later where a layer or head may hold more than the budget: PyramidKV, AdaKV)
    full = max(20, press.capacity(budget, layers, heads) - len(prompt) + 2 * (trigger - keep))
    span = max(20, 3 * (trigger - keep))  # whole compression cycles, several times over
    steps = full + 2 * span + 60  # the late span starts 60 steps after the early one ends
    if steps > 3 * 600:
        raise NotApplicable("its buffer needs too long a run: give a smaller one with -a")
    per_step = allocated_per_step(subject.model, prompt, press, budget, steps)
    early, late = per_step[full:full + span], per_step[-span:]
    worst = f"{max(late)} bytes/step late vs {max(early)} early"
    grown = [t for t in range(len(per_step) - span, len(per_step)) if per_step[t] > max(early)]
    if grown:
        return Outcome("no-growth", "fail", worst, where(grown[0]))
    return Outcome("no-growth", "pass", worst)


def allocated_per_step(model, prompt: list[int], press, budget: int | None, steps: int) -> list[int]:
    """Bytes the tensors created by each forward (the prefill, then every decoding step) take."""
    meter, per_step, last = AllocationMeter(), [], [0]

    def on_step(cache, t):
        per_step.append(meter.bytes - last[0])
        last[0] = meter.bytes

    with meter:
        generate(model, [prompt], press, budget, GenerationSettings(max_new_tokens=steps), on_step=on_step)
    return per_step


@dataclasses.dataclass
class _PerturbingPress:
    """Delegates to ``inner``; at every scoring also scores a view whose invalid slots hold noise, and records
    where the ranking of the valid slots changed."""

    inner: object
    calls: int = 0
    first: list = dataclasses.field(default_factory=list)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def score(self, view):
        self.calls += 1
        noisy = self.inner.score(_noisy(view))
        scores = self.inner.score(view)
        valid = view.valid
        if not self.first:
            ranks = [slot_ranks(s.float().masked_fill(~valid, -torch.inf), view.positions) for s in (scores, noisy)]
            bad = ((ranks[0] != ranks[1]) & valid) | (valid & scores.float().isnan())
            if bad.any():
                row, head, _ = (int(i) for i in bad.nonzero()[0])
                layer = view.layer_idx if view.layer_idx is not None else row // (valid.shape[0] // view.layers)
                self.first.append(where(view.step, layer, head))
        return scores


def _noisy(view):
    """``view`` with random keys, values and state in its invalid slots (what a press must not read)."""
    generator = torch.Generator(device=view.keys.device).manual_seed(1234 + view.step)
    invalid = ~view.valid

    def scramble(tensor):
        noise = torch.randn(tensor.shape, generator=generator, device=tensor.device).to(tensor.dtype) * 3
        mask = invalid[..., None] if tensor.dim() == invalid.dim() + 1 else invalid
        return torch.where(mask, noise, tensor)

    return dataclasses.replace(view, keys=scramble(view.keys), values=scramble(view.values),
                               state={k: scramble(v) for k, v in view.state.items()})


def invalid_slots(subject: Subject, budget: int = 12) -> Outcome:
    """A press's ranking of the valid slots does not depend on the contents of invalid ones (padding, freed
    slots), and no valid slot scores NaN."""
    press = subject.make()
    _evicting(press)
    prompt = subject.prompt(30)
    probe = _PerturbingPress(press)
    n_new = decode_length(press, budget, len(prompt), floor=36)
    generate(subject.model, [prompt, prompt[:9]], probe, budget, GenerationSettings(max_new_tokens=n_new))
    if not probe.calls:
        raise NotApplicable("never scored")
    worst = f"{probe.calls} scorings"
    return Outcome("invalid-slots", "fail" if probe.first else "pass", worst, probe.first[0] if probe.first else "")


def stateless(subject: Subject, budget: int = 12) -> Outcome:
    """A run leaves the press object as it found it: state lives in the cache (``state_names``), one copy per
    layer, head and sequence, never on the press, where it would be shared across layers, sequences and runs."""
    press = subject.make()
    before = copy.deepcopy(vars(press))
    prompt = subject.prompt(30)
    n_new = decode_length(press, budget, len(prompt), floor=36) if press.evicts else 36
    generate(subject.model, [prompt], press, budget if press.evicts else None, GenerationSettings(max_new_tokens=n_new))
    changed = sorted(k for k in {*before, *vars(press)} if not _same(before.get(k), vars(press).get(k)))
    if changed:
        return Outcome("stateless", "fail", f"{len(changed)} attributes changed", f"changed: {', '.join(changed)}")
    return Outcome("stateless", "pass", "0 attributes changed")


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dict__") and type(a) is type(b) and not isinstance(a, type):
        return _same(vars(a), vars(b))
    return a == b
