from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.errors import KvbenchError
from kvbench.presses.base import Press, View, at_prefill
from kvbench.presses.source_order import (
    COMPILE_REFUSAL,
    STATE,
    compress,
    fork_index,
    valid_lengths,
    window_padded,
)


@dataclass
class HottSnapKVDPress(Press):
    """SnapKV-D as the paper's harness's decoding path computes it: the current query only, by cache index.

    Bug-compatible with the fork's ``snapkv_press.py`` (43d9e37) given eager attentions, its only decoding path
    that runs (without them it raises, or scores NaN in later versions). It takes ``attentions[..., -64:, :-64]``,
    which while decoding is the *current* query's row; averages it over that one query, avg-pools it (kernel 5,
    zero padding counted) along the cache's physical order, averages the GQA group, pads the last 64 cache
    entries with the maximum score of the layer and keeps ``topk(budget)``, gathered in topk's order. So its
    "window" is the last 64 entries of a cache reordered by score at every step (the newest token and the 63
    lowest-ranked survivors), and its pooling neighbours are score-order neighbours. The prefill uses the prompt's
    last 64 queries, as SnapKV. Emulated over each slot's fork index with the fork's ``topk`` on the scores laid
    out in the fork's order; the scores are computed by the fork's own sequence of operations, in the model's
    dtype: eager attention per query head (``q @ k`` then the scaling, softmax in float32 cast back), the mean
    over the rows, the pooling per query head, then the group's mean, so that equal scores are equal (and near
    ties fall) as they did there.
    """

    name = "hott-snapkv-d"
    compile_refusal = COMPILE_REFUSAL
    summary = "the paper's harness's SnapKV-D: current query only, window and pooling by cache index (bug-compatible)"
    source = "the kvpress fork of arXiv 2512.12008 (snapkv_press.py @43d9e37, eager decoding path)"
    reference = "minghui-liu/kvpress@43d9e37 kvpress/presses/snapkv_press.py (SnapKVPress.score, eager attentions)"
    #: 2: the fork's operations in its order and dtype (1 averaged the group's attention before pooling, and
    #: computed the logits as (q * scaling) @ k in float32, so near-equal scores could rank differently)
    revision = 2
    state_names = (STATE,)
    #: Decoding scores read the newest query of the window only.
    reads_whole_window = False

    #: Prompt queries that score the prefill, and cache entries padded with the maximum (64 in the fork).
    window_size: int = 64
    #: Average-pooling kernel along the cache's order (5 in the fork).
    kernel_size: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window_size < 1 or self.kernel_size < 1 or self.kernel_size % 2 == 0 or self.buffer != 1:
            raise ValueError(f"{self.name}: window_size >= 1, an odd kernel_size and buffer 1 are needed")

    def cadence(self, budget: int) -> tuple[int, int]:
        if budget < self.window_size:
            raise KvbenchError(f"{self.name}: budget {budget} is below its window of {self.window_size} (the fork "
                               "asserts that the cache is longer than the window)")
        return super().cadence(budget)

    @property
    def query_window(self) -> int:
        return self.window_size

    def score(self, view: View) -> torch.Tensor:
        index, lengths = fork_index(view), valid_lengths(view)
        order = index.argsort(dim=-1)  # slots in the fork's cache order, the invalid ones last
        keys = view.keys.gather(2, order[..., None].expand(-1, -1, -1, view.keys.shape[-1]))
        key_positions = view.positions.gather(2, order)
        queries, query_positions = self._queries(view)
        heads = keys.shape[1]

        def pooled(rows: list[int], prefix: int) -> torch.Tensor:
            # snapkv_press.py:83-94 on the eager attention, each op in the model's dtype as the fork ran it
            length = prefix + self.window_size
            attention = _eager_attention(queries[rows], query_positions[rows], keys[rows, :, :length],
                                         key_positions[rows, :, :length], view.window.scaling)
            scores = attention[..., :prefix].mean(dim=-2)
            scores = F.avg_pool1d(scores, self.kernel_size, stride=1, padding=self.kernel_size // 2)
            return scores.view(len(rows), heads, -1, prefix).mean(2).float()  # exact: compress casts back

        scores = window_padded(lengths, self.window_size, index.shape[:2], index.device, pooled)
        return compress(self, view, index, lengths, scores)

    def _queries(self, view) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of the fork's ``attentions[..., -window:, :]``: the prompt's last ``window_size`` queries at the
        prefill, the current query alone in decoding; [N, H_q, rows, D] in position order, positions [N, rows]."""
        window = view.window
        positions = window.positions.masked_fill(~window.valid, -1)
        rows = min(self.window_size, positions.shape[-1]) if at_prefill(view) else 1
        newest = positions.topk(rows, dim=-1).indices.flip(-1)  # position order
        queries = window.queries.gather(2, newest[:, None, :, None].expand(-1, window.queries.shape[1], -1,
                                                                             window.queries.shape[-1]))
        return queries.to(view.keys.dtype), positions.gather(1, newest)


def _eager_attention(queries, query_positions, keys, key_positions, scaling) -> torch.Tensor:
    """transformers' eager attention weights: ``matmul(q, repeat_kv(k)) * scaling`` in the model's dtype, the causal
    mask, softmax in float32 cast back to the model's dtype. [N, H_q, rows, S]."""
    group = queries.shape[1] // keys.shape[1]
    logits = torch.matmul(queries, keys.repeat_interleave(group, dim=1).transpose(2, 3)) * scaling
    future = key_positions.repeat_interleave(group, dim=1)[:, :, None, :] > query_positions[:, None, :, None]
    logits = logits.masked_fill(future, torch.finfo(logits.dtype).min)
    return torch.softmax(logits, dim=-1, dtype=torch.float32).to(queries.dtype)
