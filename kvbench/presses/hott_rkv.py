import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.presses.base import Press, View
from kvbench.presses.source_order import (
    COMPILE_REFUSAL,
    STATE,
    compress,
    fork_index,
    fork_topk,
    reorder,
    valid_lengths,
    window_padded,
)


@dataclass
class HottRKVPress(Press):
    """R-KV as the paper's harness's ``rkv_press.py`` (43d9e37) scores it: the most redundant keys kept.

    Bug-compatible in its rule, each operation in the model's dtype as the fork runs it (``fork_rkv_score``):
    ``0.1 * importance + 0.9 * redundancy`` (R-KV subtracts redundancy, so the fork keeps the keys most similar to
    the others); redundancy is each key's mean cosine similarity to the other non-window keys (self-similarity
    zeroed, no R-KV "latest copy" exemption), softmaxed; importance is the mean attention of the window's queries
    on the entries before the last 8 cache entries, GQA max, max-pooled (kernel 5) along the cache's physical
    order; while decoding the fork masks window row ``i`` to cache indices ``0..i`` (its ``triu(diagonal=1)`` over
    an 8-row window), so importance is zero past the first few cache entries; the last 8 cache entries are padded
    with the layer's maximum; ``topk(budget)`` is gathered in topk's order.

    And in its schedule, which is the fork's counter as its code runs it (``compress_decoding``): one counter for
    all layers, advanced only by layer 0 on every decoding step once its cache holds more than the budget, reset
    only by layer 0 after it compresses, read by every layer. Layers 1 and up compress on the step the counter
    reaches 64 (the first time holding ``budget + 64``, then every 65 steps holding ``budget + 65``); layer 0
    compresses one step later, holding ``budget + 65``. A prompt longer than the budget is cut to the budget at
    the prefill (``compress_prefilling``), every layer alike.

    Not reproduced: where the fork's window queries come from. It rebuilds them with each layer's ``q_proj`` from
    a hidden-state buffer of hard-coded width (5120 on main, which fits none of the paper's four models) that every
    layer writes in turn, so at a compression the buffer holds the last layer's attention inputs of the previous
    steps (and layer 0's of the current one), all rotated at the current position, and every layer scores with
    them. A press sees queries, not hidden states or projections; here each layer uses its own 8 newest queries at
    their own positions (with the fork's mask). Run against the fork with that one defect replaced the same way,
    the kept sets and tokens are identical (docs/fidelity.md). Nor is the fork's harness's reuse of one press
    object for every sample (``reason/evaluate.py``), which carries the counter and buffer from one sample into the
    next: each sequence here starts its schedule afresh.
    Checked against a transcription of the fork's code in ``tests/reference/test_hott_rkv.py``.
    """

    name = "hott-rkv"
    compile_refusal = COMPILE_REFUSAL
    summary = ("the paper's harness's R-KV: 0.1 importance + 0.9 redundancy (sign reversed), interval 64, layer 0 a "
               "step behind")
    source = "the kvpress fork of arXiv 2512.12008 (rkv_press.py @43d9e37)"
    reference = "minghui-liu/kvpress@43d9e37 kvpress/presses/rkv_press.py (RKVPress.score, compress_decoding)"
    #: 2: the fork's per-layer schedule, prefill cut, decoding mask and dtype (1: every layer at budget + 65, the
    #: prompt kept whole, a causal window, float32 scores)
    revision = 2
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

    def score(self, view: View) -> torch.Tensor:
        index, lengths = fork_index(view), valid_lengths(view)
        order = index.argsort(dim=-1)  # slots in the fork's cache order, the invalid ones last
        keys = view.keys.gather(2, order[..., None].expand(-1, -1, -1, view.keys.shape[-1]))
        key_positions = view.positions.gather(2, order)
        queries, query_positions = window_queries(view)

        def mixed(rows: list[int], prefix: int) -> torch.Tensor:
            length = prefix + self.window_size
            return fork_rkv_score(queries[rows], query_positions[rows], keys[rows, :, :length],
                                  key_positions[rows, :, :length], prefix, self.kernel_size, self.mix_lambda,
                                  sign=1.0, fork_mask=view.step > 0).float()  # the topk casts back exactly

        scores = window_padded(lengths, self.window_size, index.shape[:2], index.device, mixed)
        if view.compress_to is None:  # scored outside the engine: the nominal cadence
            return compress(self, view, index, lengths, scores)
        # the layers that compress now are those the engine asks to keep fewer entries than they hold
        lengths = [n if n > keep else 0 for n, keep in zip(lengths, view.compress_to)]
        return reorder(view, index, fork_topk(scores.to(view.keys.dtype), lengths, view.budget, 1))


def window_queries(view) -> tuple[torch.Tensor, torch.Tensor]:
    """The query window in position order: [N, H_q, W, D] in the model's dtype, positions [N, W] (-1: none)."""
    window = view.window
    positions = window.positions.masked_fill(~window.valid, -1)
    order = positions.argsort(dim=-1)
    queries = window.queries.gather(2, order[:, None, :, None].expand(-1, window.queries.shape[1], -1,
                                                                        window.queries.shape[-1]))
    return queries.to(view.keys.dtype), positions.gather(1, order)


def fork_rkv_score(queries, query_positions, keys, key_positions, prefix: int, kernel: int, mix_lambda: float,
                   sign: float = -1.0, fork_mask: bool = False) -> torch.Tensor:
    """``RKVPress.score`` (rkv_press.py:137-179) before the window's padding, each op in the model's dtype as the
    fork runs it: [N, H, prefix] in the cache's order, from the window's queries [N, H_q, W, D] in position order
    and the keys [N, H, S, D] in the fork's cache order. ``sign=-1``: R-KV's sign (the fork's is +1). The window's
    queries are masked causally by position, or with ``fork_mask`` as the fork's decoding path masks them
    (``triu(diagonal=1)``: window row ``i`` sees cache indices ``0..i``)."""
    n, heads, _, head_dim = keys.shape
    group = queries.shape[1] // heads
    logits = torch.matmul(queries, keys.repeat_interleave(group, dim=1).transpose(2, 3)) / math.sqrt(head_dim)
    if fork_mask:
        rows, columns = torch.arange(logits.shape[-2], device=keys.device), torch.arange(keys.shape[2],
                                                                                          device=keys.device)
        future = (columns[None, :] > rows[:, None]).expand_as(logits)
    else:
        future = key_positions.repeat_interleave(group, dim=1)[:, :, None, :] > query_positions[:, None, :, None]
    attention = torch.softmax(logits.masked_fill(future, -math.inf), dim=-1, dtype=torch.float32)
    attention = attention.nan_to_num(0.0).to(queries.dtype)[..., :prefix]
    importance = attention.mean(dim=-2).view(n, heads, group, prefix).max(dim=-2).values
    importance = F.max_pool1d(importance, kernel_size=kernel, padding=kernel // 2, stride=1)
    unit = keys / (keys.norm(dim=-1, keepdim=True) + 1e-8)
    flat = unit[:, :, :prefix]
    similarity = torch.einsum("bhqd,bhkd->bhqk", flat, flat)
    similarity = similarity * (1 - torch.eye(prefix, device=keys.device))  # float32, as the fork's: promotes
    redundancy = torch.softmax(similarity.mean(dim=-1), dim=-1, dtype=torch.float32).to(importance.dtype)
    return mix_lambda * importance + sign * (1 - mix_lambda) * redundancy
