from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.presses.base import Press
from kvbench.presses.hott_order import (
    STATE,
    compress,
    fork_index,
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
    8 cache entries are padded with the layer's maximum; ``topk(budget)`` is gathered in topk's order. It
    compresses when 64 tokens have accumulated beyond the budget (the cache then holds ``budget + 65``).

    Not reproduced, because they cannot be on a working model: the fork's window queries are rebuilt from a
    hidden-state buffer of hard-coded width (5120 on main, which fits none of the paper's four models) that
    every layer overwrites, rotated at the current position and masked so that they see only the first 8 cache
    entries; here they are the 8 newest queries at their own positions. And the counter that paces compressions
    is reset by layer 0 before the other layers read it, in every published branch, so as published only layer 0
    compresses while decoding; the paper's low R-KV accuracies suggest its runs compressed every layer, as this
    press does.
    A prompt longer than the budget but shorter than ``budget + 65`` is kept whole until the first compression
    (the fork compresses it at the prefill).
    """

    name = "hott-rkv"
    summary = "the paper's harness's R-KV: 0.1 importance + 0.9 redundancy (sign reversed), interval 64"
    source = "the kvpress fork of arXiv 2512.12008 (rkv_press.py @43d9e37)"
    state_names = (STATE,)

    #: Entries added between compressions: the fork compresses once 64 have accumulated past the budget.
    buffer: int = 65
    #: Window queries and protected cache entries (8).
    window_size: int = 8
    #: Max-pooling kernel along the cache's order (5).
    kernel_size: int = 5
    #: The fork's weight of importance (its code: ``0.1 * importance + 0.9 * redundancy``).
    mix_lambda: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window_size < 1 or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"{self.name}: window_size >= 1 and an odd kernel_size are needed")
        if not 0.0 <= self.mix_lambda <= 1.0:
            raise ValueError(f"{self.name}: mix_lambda must be in [0, 1], got {self.mix_lambda}")

    @property
    def query_window(self) -> int:
        return self.window_size

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
        return compress(self, view, index, lengths, scores)


def _redundancy_terms(view, index: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """Each non-window key's mean cosine similarity to the non-window keys (its own term zeroed), per slot."""
    keys = view.keys.float()
    unit = keys / (keys.norm(dim=-1, keepdim=True) + 1e-8)
    in_prefix = view.valid & (index < prefix[:, None, None])
    sim = (unit @ unit.transpose(-1, -2)) * in_prefix[..., None, :]
    sim = sim - torch.diagonal(sim, dim1=-2, dim2=-1).diag_embed()
    return sim.sum(dim=-1) / prefix.clamp(min=1)[:, None, None]
