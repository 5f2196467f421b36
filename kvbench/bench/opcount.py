"""What one decoding step launches, counted machine-independently: the aten operators that compute (a dispatch-mode
counter; a GPU launches about one kernel for each, none for a view) and the points where the host waits for the device
(``tolist``, ``item``, a copy to the host, and the operators whose output size depends on the data).

Per-step figures come from whole generations of three lengths once the cache is full (``n``, ``2n``, ``3n`` new
tokens): the differences cancel the prefill and the set-up, so kvbench's loop and HF ``generate`` are counted alike,
and the second difference shows whether a step's count grows with the generated length.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: Operators whose output size is read from the data: the host waits for the device to know it.
DATA_DEPENDENT = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "unique_dim", "_unique2",
                            "is_nonzero", "equal"})
#: Tensor methods that hand data to Python (patched while counting; no aten operator marks them).
TO_HOST = ("tolist", "item", "numpy")


class OpCounter(TorchDispatchMode):
    """Counts the aten operators that compute (views and no-op conversions launch no kernel) and the host
    synchronisations."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.dispatches = 0  # every aten operator, views included
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.dispatches += 1
        # a view, or a conversion that returns its input (``.to`` the same dtype), launches no kernel
        if not func.is_view and not (args and out is args[0]):
            self.ops += 1
        name = func.overloadpacket.__name__
        if name in DATA_DEPENDENT or (name == "_to_copy" and _to_host(args, kwargs or {})):
            self.syncs += 1
        return out


def _to_host(args, kwargs) -> bool:
    source = args[0] if args else None
    target = kwargs.get("device")
    return isinstance(source, torch.Tensor) and source.device.type != "cpu" and target is not None and \
        torch.device(target).type == "cpu"


@contextlib.contextmanager
def counting():
    """An ``OpCounter`` active, with ``tolist``/``item``/``numpy`` counted as host synchronisations."""
    counter = OpCounter()
    originals = {name: getattr(torch.Tensor, name) for name in TO_HOST}

    def wrap(name):
        original = originals[name]

        def counted(self, *args, **kwargs):
            counter.syncs += 1
            return original(self, *args, **kwargs)
        return counted

    for name in TO_HOST:
        setattr(torch.Tensor, name, wrap(name))
    try:
        with counter:
            yield counter
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@dataclass(frozen=True)
class StepCount:
    """Operators and host synchronisations per decoding step; ``growth``: how many more operators a step launches
    over the last ``n`` steps than over the ``n`` before (0 when nothing grows with the length)."""

    ops: float
    syncs: float
    growth: float
    dispatches: float  # every aten operator dispatched, views included: what the host pays for


def per_step(run: Callable[[int], None], n: int, start: int) -> StepCount:
    """Count ``run(new_tokens)`` at ``start + n``, ``start + 2n`` and ``start + 3n`` new tokens."""
    totals = []
    for length in (start + n, start + 2 * n, start + 3 * n):
        with counting() as counter:
            run(length)
        totals.append((counter.ops, counter.syncs, counter.dispatches))
    (o1, s1, _), (o2, s2, d2), (o3, s3, d3) = totals
    return StepCount(ops=(o3 - o2) / n, syncs=(s3 - s2) / n, growth=((o3 - o2) - (o2 - o1)) / n,
                     dispatches=(d3 - d2) / n)


def kvbench_step(model, prompts: list[list[int]], press, budget: int | None, n: int = 16) -> StepCount:
    """kvbench's decoding step under ``press`` at ``budget`` (EOS ignored), once the cache is full."""
    from kvbench.engine.generate import GenerationSettings, generate

    full = budget is None or press.selects  # the whole cache kept (a selection attends part of it)
    if full:
        start = 0
    elif getattr(press, "grows", False):  # never full (RLKV's full heads): once it first compresses
        start = budget + 2
    else:
        start = press.capacity(budget, model.config.num_hidden_layers, model.config.num_key_value_heads) + 2

    def run(length: int) -> None:
        generate(model, prompts, press, budget, GenerationSettings(max_new_tokens=length))

    return per_step(run, n, start)


def hf_generate_step(model, prompts: list[list[int]], n: int = 16) -> StepCount:
    """transformers' ``generate`` with its ``DynamicCache``, greedy, EOS ignored (prompts of one length)."""
    from transformers import DynamicCache

    from kvbench.engine.decode import cache_argument

    ids = torch.tensor(prompts, device=model.device)

    def run(length: int) -> None:
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=length, min_new_tokens=length, do_sample=False, eos_token_id=None,
                           pad_token_id=0, **{cache_argument(model): DynamicCache()})

    return per_step(run, n, 0)


def add_counts(rows: list, model, prompts: list[list[int]], presses: dict) -> None:
    """Put each bench row's ``ops_per_step``, ``dispatches_per_step``, ``syncs_per_step`` and ``ops_growth`` (and HF
    ``generate``'s at the same batch, for reference) in its ``extra``."""
    reference = hf_generate_step(model, prompts)
    for row in rows:
        count = kvbench_step(model, prompts, presses[row.press], row.budget)
        row.extra.update(ops_per_step=count.ops, syncs_per_step=count.syncs, ops_growth=count.growth,
                         dispatches_per_step=count.dispatches, hf_ops_per_step=reference.ops,
                         hf_syncs_per_step=reference.syncs, hf_dispatches_per_step=reference.dispatches)
