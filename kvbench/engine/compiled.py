"""A decoding step as one graph: ``torch.compile(fullgraph=True)`` over the model's forward (the layers' slot
writes and attention), the press's observation, scoring and eviction, with static shapes.

Static shapes: the cache attends over all of its preallocated ``budget + buffer`` slots (``static_shapes``), so
every decoding step has the same tensor shapes. Two graphs, each compiled once: a step at which no row is at its
trigger runs the forward (and an accumulating press's observation) alone, so that a press compressing every
``buffer`` steps does not score the cache at every step; a step at which some row is runs the scoring and
eviction too. No host decision inside either: which rows evict is decided on the host before the forward (their
entry counts against their triggers) and enters the graph as a mask (rows not at their trigger keep their slots
by masked arithmetic; a press whose compressions keep different counts, by schedule, layer or head, gets each
row's count as a tensor instead). The host's bookkeeping (entry counts, the next schedule, the query ring's write
slot) stays outside, before and after the graph. The prefill runs eagerly (its length differs per prompt).

What cannot be one graph is refused by ``compile_refusal`` with the reason, before any model loads.
"""

from __future__ import annotations

import functools
import time

import torch
from torch._dynamo.utils import counters

from kvbench.errors import KvbenchError
from kvbench.presses.base import Press

#: A compiled step's slot count is rounded up to a multiple of this many tokens where the sequence length sets it
#: (the full cache, short sequences), so that prompts of different lengths share one graph.
LENGTH_BUCKET = 256
#: Graphs one process may compile per step function: one per (press, budget, batch, slot count) it meets.
RECOMPILE_LIMIT = 256

#: torch.compile backends: inductor generates code (the speed); eager and aot_eager only trace (the proof that
#: the step is one graph, in seconds: what the tests use).
BACKENDS = ("inductor", "eager", "aot_eager")


def compile_refusal(press: Press, budget: int | None) -> str | None:
    """Why ``press`` at ``budget`` cannot decode as one graph, or None if it can (a wrapper: its inner press's)."""
    if budget is None or not press.evicts:
        return None
    if press.sparse:
        return "its sparse attention selects chunks per step into a shadow cache of host-sized gathers"
    inner = getattr(press, "inner", None)
    return press.compile_refusal or (None if inner is None else compile_refusal(inner, budget))


def check_compilable(press: Press, budget: int | None, attention_loss: bool = False) -> None:
    """Refuse, in one line, ``press`` at ``budget`` (or a generation measuring attention loss) when its decoding
    step cannot be one graph."""
    reason = compile_refusal(press, budget)
    if reason is None and attention_loss:
        reason = "measuring attention loss reads a shadow of every key sized by the tokens seen so far"
    if reason is not None:
        raise KvbenchError(f"--compile: {press.name} cannot decode as one graph: {reason}")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise KvbenchError(f"--compile-backend {backend!r} is unknown (known: {', '.join(BACKENDS)})")


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process (dynamo's count): a change across a call means it compiled."""
    return counters["stats"]["unique_graphs"]


def bucketed_length(tokens: int) -> int:
    """The sequence length a compiled step's cache is sized for: ``tokens`` rounded up to ``LENGTH_BUCKET``."""
    return -(-tokens // LENGTH_BUCKET) * LENGTH_BUCKET


class CompiledStep:
    """``forward`` of a ``Decoder``'s decoding steps: two graphs (with and without eviction), each compiled once for
    the cache's batch and slot shapes."""

    def __init__(self, model, cache, cache_kwarg: dict, backend: str = "inductor"):
        self.model, self.cache, self.cache_kwarg = model, cache, cache_kwarg
        if cache.query_ring is not None:
            cache.query_ring.compiled = True
        device = next(model.parameters()).device
        mode = "reduce-overhead" if backend == "inductor" and device.type == "cuda" else None  # CUDA graphs
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        compile = functools.partial(torch.compile, fullgraph=True, backend=backend, mode=mode, dynamic=False)
        self.evicting_graph, self.plain_graph = compile(self._evicting_step), compile(self._plain_step)
        self.step = torch.zeros((), dtype=torch.long, device=device)  # the decoding step, as the views carry it
        self.marked = False
        #: Seconds the last forward took if it compiled a graph (dynamo's trace and the backend's code, with that
        #: one step), else 0: what a run's decoding time leaves out. A CUDA graph's recording is not counted.
        self.compiling_s = 0.0

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, position_ids=positions, cache_position=positions[0], **self.cache_kwarg,
                         use_cache=True, kvbench_cache=self.cache, logits_to_keep=1)
        return out.logits[:, -1]

    def _evicting_step(self, ids: torch.Tensor, positions: torch.Tensor, step: torch.Tensor,
                       evicting: torch.Tensor | None, keep: torch.Tensor | None) -> torch.Tensor:
        logits = self._forward(ids, positions)
        self.cache.evict_on_device(step, evicting, keep)
        return logits

    def _plain_step(self, ids: torch.Tensor, positions: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        logits = self._forward(ids, positions)
        self.cache.observe_on_device(step)
        return logits

    def _mark_static(self, cache) -> None:
        """The cache's buffers keep their addresses for the whole generation: a CUDA graph may write them in place
        (as transformers' static cache marks its own), instead of copying them in and out every step."""
        ring = cache.query_ring
        tensors = [cache.keys, cache.values, cache.positions, cache.valid, *cache.state.values()]
        tensors += [] if ring is None else [ring.queries, ring.positions, ring.valid]
        for tensor in tensors:
            if tensor is not None:
                torch._dynamo.mark_static_address(tensor)
        self.marked = True

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, counts: list[int],
                step: int) -> torch.Tensor:
        """One decoding forward: the host's plan, the graph, the host's bookkeeping; the logits."""
        # Tensors made inside inference mode, every step alike (the first step's positions were made outside it,
        # and a tensor's dispatch keys are part of what the graph is specialised on).
        positions, valid = positions.clone(), valid.clone()
        cache = self.cache
        if not self.marked:
            self._mark_static(cache)
        for layer in cache.layers:  # bound before the graph (after a splice), else the first graph binds them
            if not layer.is_initialized:
                layer.lazy_initialization(cache.keys[0, :, :, :1], cache.values[0, :, :, :1])
        cache.begin_step(positions, valid, counts, step, ids)
        full = cache.occupancy.at_trigger()
        self.step.fill_(step)
        graphs, start = compiled_graphs(), time.perf_counter()
        if not any(full):
            logits = self.plain_graph(ids, positions, self.step)
        elif cache.keeps_by_rank:
            logits = self.evicting_graph(ids, positions, self.step, None, cache.device_keeps(full))
        else:
            logits = self.evicting_graph(ids, positions, self.step, cache.row_mask(full), None)
        compiled = compiled_graphs() != graphs
        self.compiling_s = time.perf_counter() - start if compiled else 0.0
        cache.finish_decoding_step(full)
        return logits
