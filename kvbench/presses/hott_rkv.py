from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.presses.base import Press
from kvbench.presses.hott_order import (
    STATE,
    compress,
    fork_index,
    fork_topk,
    reorder,
    to_fork_order,
    valid_lengths,
    window_padded,
)


@dataclass
class HottRKVPress(Press):
    """R-KV as the paper's harness's ``rkv_press.py`` (43d9e37) scores it: the most redundant keys kept.

    Bug-compatible in its rule: ``0.1 * importance + 0.9 * redundancy`` (R-KV subtracts redundancy, so the fork
    keeps the keys most similar to the others); redundancy is each key's mean cosine similarity to the other
    non-window keys (self-similarity zeroed, no R-KV "latest copy" exemption), softmaxed; importance is the mean
    attention of the window's queries, GQA max, max-pooled (kernel 5) along the cache's physical order; the last
    8 cache entries are padded with the layer's maximum; ``topk(budget)`` is gathered in topk's order.

    And in its schedule, which is the fork's counter as its code runs it (``compress_decoding``): one counter for
    all layers, advanced only by layer 0 on every decoding step once its cache holds more than the budget, reset
    only by layer 0 after it compresses, read by every layer. Layers 1 and up compress on the step the counter
    reaches 64 (the first time holding ``budget + 64``, then every 65 steps holding ``budget + 65``); layer 0
    compresses one step later, holding ``budget + 65``. A prompt longer than the budget is cut to the budget at
    the prefill (``compress_prefilling``), every layer alike.

    Not reproduced, because it cannot be on a working model: the fork's window queries are rebuilt from a
    hidden-state buffer of hard-coded width (5120 on main, which fits none of the paper's four models) that
    every layer overwrites, rotated at the current position and masked so that they see only the first 8 cache
    entries; here they are each layer's 8 newest queries at their own positions.
    """

    name = "hott-rkv"
    summary = ("the paper's harness's R-KV: 0.1 importance + 0.9 redundancy (sign reversed), interval 64, layer 0 a "
               "step behind")
    source = "the kvpress fork of arXiv 2512.12008 (rkv_press.py @43d9e37)"
    reference = "minghui-liu/kvpress@43d9e37 kvpress/presses/rkv_press.py (RKVPress.score, compress_decoding)"
    revision = 2  # the fork's per-layer schedule and prefill cut (1: every layer at budget + 65, prompt kept whole)
    state_names = (STATE,)

    #: The most entries held past the budget (65); the fork's ``compress_interval`` is one less (64).
    buffer: int = 65
    #: Window queries and protected cache entries (8).
    window_size: int = 8
    #: Max-pooling kernel along the cache's order (5).
    kernel_size: int = 5
    #: The fork's weight of importance (its code: ``0.1 * importance + 0.9 * redundancy``).
    mix_lambda: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.buffer < 2:
            raise ValueError(f"{self.name}: buffer must be >= 2 (the fork's interval is buffer - 1), got {self.buffer}")
        if self.window_size < 1 or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"{self.name}: window_size >= 1 and an odd kernel_size are needed")
        if not 0.0 <= self.mix_lambda <= 1.0:
            raise ValueError(f"{self.name}: mix_lambda must be in [0, 1], got {self.mix_lambda}")

    @property
    def query_window(self) -> int:
        return self.window_size

    @property
    def allocates(self) -> bool:
        return True  # layer 0 compresses a step after the others, so layers hold different counts

    def row_cadence(self, budget: int, prompt_length: int, compressions: int) -> tuple[int, int]:
        return self._next(budget, prompt_length, compressions, 1)[:2]

    def layer_keeps(self, budget: int, prompt_length: int, compressions: int, n_layers: int) -> list[int]:
        return self._next(budget, prompt_length, compressions, n_layers)[2]

    def _next(self, budget: int, prompt_length: int, compressions: int, n_layers: int):
        """The next compression: (entries layers 1.. hold after it, their count that triggers it, each layer's
        keep). It alternates: layers 1.. compress (layer 0 keeps all), then layer 0 on the next step."""
        prefill = prompt_length > budget
        if compressions == 0 and prefill:
            return budget, budget + 1, [budget] * n_layers
        everything = budget + self.buffer  # a layer keeping this many keeps all it holds
        if (compressions - prefill) % 2 == 0:
            trigger = budget + self.buffer - (1 if compressions == prefill else 0)
            return budget, trigger, [everything] + [budget] * (n_layers - 1)
        return budget + 1, budget + 1, [budget] + [everything] * (n_layers - 1)

    def score(self, view) -> torch.Tensor:
        index, lengths = fork_index(view), valid_lengths(view)
        width = max(lengths)
        importance = to_fork_order(view.attention(gqa="max"), index, view.valid, width)
        similarity = _redundancy_terms(view, index, torch.tensor(lengths, device=index.device) - self.window_size)
        redundancy = to_fork_order(similarity, index, view.valid, width)

        def mixed(rows: list[int], prefix: int) -> torch.Tensor:
            pooled = F.max_pool1d(importance[rows, :, :prefix], self.kernel_size, stride=1,
                                  padding=self.kernel_size // 2)
            return self.mix_lambda * pooled + (1 - self.mix_lambda) * torch.softmax(redundancy[rows, :, :prefix], -1)

        scores = window_padded(lengths, self.window_size, importance.shape[:2], importance.device, mixed)
        if view.compress_to is None:  # scored outside the engine: the nominal cadence
            return compress(self, view, index, lengths, scores)
        # the layers that compress now are those the engine asks to keep fewer entries than they hold
        lengths = [n if n > keep else 0 for n, keep in zip(lengths, view.compress_to)]
        return reorder(view, index, fork_topk(scores.to(view.keys.dtype), lengths, view.budget, 1))


def _redundancy_terms(view, index: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """Each non-window key's mean cosine similarity to the non-window keys (its own term zeroed), per slot."""
    keys = view.keys.float()
    unit = keys / (keys.norm(dim=-1, keepdim=True) + 1e-8)
    in_prefix = view.valid & (index < prefix[:, None, None])
    sim = (unit @ unit.transpose(-1, -2)) * in_prefix[..., None, :]
    sim = sim - torch.diagonal(sim, dim1=-2, dim2=-1).diag_embed()
    return sim.sum(dim=-1) / prefix.clamp(min=1)[:, None, None]
