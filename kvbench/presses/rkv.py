from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.presses.base import INF, Press, View, window_softmax
from kvbench.presses.source_order import (
    COMPILE_REFUSAL,
    STATE,
    fork_index,
    from_fork_order,
    reorder,
    to_fork_order,
)

_BIG = torch.iinfo(torch.long).max // 2


@dataclass
class RKVPress(Press):
    """R-KV: importance (attention of recent queries) minus redundancy (key cosine similarity), as R-KV's code.

    ``score = mix_lambda * importance - (1 - mix_lambda) * redundancy`` over the cache entries before its last
    ``window_size``; the window is kept and the ``budget - window_size`` best of the rest (``R1KV.update_kv``).
    Importance: each window query's logits, the maximum over its GQA group, softmaxed over the entries before the
    window, averaged over the window and max-pooled along the cache. Redundancy (``cal_similarity``): the cosine
    of every pair of keys, each key's own zeroed; for each key the *last* key in the cache with cosine above
    ``threshold`` does not count against it (for a key with none, the first entry of the cache does not),
    the mean over keys, softmaxed over the whole cache, window included.

    ``order=cache`` (R-KV's): the cache is in R-KV's physical order, kept per slot (``source_order``): after a
    compression the kept entries in ``topk``'s order, then the window in token order, new tokens appended. The
    pooling, the "last" similar key, the "first" entry and ``topk``'s ties follow that order. ``order=position``
    (kvbench's revision-2 rule, a variant): token order, no entry exempted for a key with no similar key.

    ``schedule=length`` (R-KV's): a prompt of ``budget`` entries or more is compressed at the prefill; then a
    forward compresses (after appending its token, if the cache holds ``budget`` or more) when the tokens before
    it, prompt included, are a multiple of ``buffer`` (R-KV's ``divide_length``, 128): between compressions the
    cache holds up to ``budget + buffer``. ``schedule=held`` (a kvbench variant): compress when ``budget +
    buffer`` entries are held; a prompt up to ``budget + buffer`` is kept whole.

    Differences from R-KV's code that remain: scores are computed in float32, with the importance and the final
    score rounded to the cache's dtype (R-KV computes every step in the model's dtype, bf16 in its runs), so
    near-ties can fall differently; logits are scaled by the model's attention scaling (R-KV: ``1/sqrt(head_dim)``,
    the same for Llama and Qwen); R-KV's ``run_math.py`` never resets its length counter nor its compression flag
    between samples, so there every sample after the first follows the previous samples' count and is not
    compressed at its prefill: kvbench schedules every sequence as R-KV's first. R-KV's code requires ``budget >
    window_size``; here a budget of at most the window keeps the newest ``budget`` entries.
    """

    name = "rkv"
    summary = "importance - redundancy (key cosine similarity), every 128 tokens, in R-KV's cache order"
    source = "Cai et al. 2025, arXiv 2505.24133"
    reference = "Zefan-Cai/R-KV@d15c976 rkv/compression/r1_kv.py (R1KV.update_kv)"
    # 3: R-KV's schedule (prefill from the budget, then by length), cache order, column 0, lambda 0.07 (its code)
    revision = 3
    state_names = (STATE,)
    #: Importance is computed from the window's queries here, not from ``view.attention``.
    reads_whole_window = False

    #: length schedule: compress when the length is a multiple of this (R-KV's divide_length, 128; its paper's
    #: buffer); held schedule: compress at ``budget + buffer`` entries.
    buffer: int = 128
    #: Recent queries scoring importance, and recent entries kept (8 in R-KV's code).
    window_size: int = 8
    #: Max-pooling kernel along the cache (7 in R-KV's code).
    kernel_size: int = 7
    #: Weight of importance against redundancy (0.07 in R-KV's code; 0.1 in its paper and README).
    mix_lambda: float = 0.07
    #: Cosine similarity above which two keys count as copies (0.5 in R-KV's code).
    threshold: float = 0.5
    #: How the query heads of a GQA group are combined (R-KV's code takes the max of the logits).
    gqa: str = "max"
    #: length: R-KV's schedule (prefill, then by sequence length); held: at budget + buffer entries (kvbench's).
    schedule: str = "length"
    #: cache: R-KV's physical cache order; position: token order (kvbench's revision-2 rule).
    order: str = "cache"

    @property
    def query_window(self) -> int:
        return self.window_size

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window_size < 1 or self.kernel_size < 1:
            raise ValueError(f"rkv: window_size and kernel_size must be >= 1, got {self.window_size}, "
                             f"{self.kernel_size}")
        if not (0.0 <= self.mix_lambda <= 1.0 and -1.0 <= self.threshold <= 1.0):
            raise ValueError(f"rkv: mix_lambda must be in [0, 1] and threshold in [-1, 1], got {self.mix_lambda}, "
                             f"{self.threshold}")
        for field, value, allowed in (("gqa", self.gqa, ("mean", "max")), ("schedule", self.schedule,
                                      ("length", "held")), ("order", self.order, ("cache", "position"))):
            if value not in allowed:
                raise ValueError(f"rkv: {field} must be one of {allowed}, got {value!r}")

    def row_cadence(self, budget: int, prompt_length: int, compressions: int) -> tuple[int, int]:
        """length schedule: the entries held at R-KV's next compression (``modeling.py`` 288-325, 600-610)."""
        keep, most = budget, budget + self.buffer
        if self.schedule == "held":
            return keep, most
        period, prefill = self.buffer, prompt_length >= budget
        if compressions == 0:
            if prefill:  # update_kv on the prompt: compressed from budget entries on (keeps them all at budget)
                return keep, budget
            # the first forward at a position p = k * period holding p + 1 >= budget entries
            return keep, _next_multiple(max(prompt_length, budget - 1), period) + 1
        if prefill and compressions == 1:  # the prefill left budget entries up to position prompt_length - 1
            return keep, budget + _next_multiple(prompt_length, period) - prompt_length + 1
        return keep, most

    def score(self, view: View) -> torch.Tensor:
        index = fork_index(view) if self.order == "cache" and STATE in view.state else position_index(view)
        held = view.valid[:, 0].sum(dim=-1)  # [N] entries each row holds (alike in every head)
        prefix = view.valid & (index < (held - self.window_size)[:, None, None])
        # laid out over every slot: past a row's entries, -inf (max_pool1d's own padding), so no host length
        final = self._final(view, index, prefix, view.valid.shape[-1])
        if self.order == "position" or view.compress_to is None:  # the engine keeps the best; the window first
            return final.masked_fill(view.valid & ~prefix, INF)
        # the rows the engine compresses: keeping fewer than they hold, or exactly a held budget (a prompt of budget);
        # topk over each row's own length, so that its ties fall in R-KV's order
        lengths = held.tolist()
        compressing = [n if n > keep or n == keep == view.budget else 0 for n, keep in zip(lengths, view.compress_to)]
        ordered = to_fork_order(final, index, prefix, max(lengths), fill=-INF).to(view.keys.dtype)
        return reorder(view, index, self._topk(ordered, compressing, view.budget))

    @property
    def compile_refusal(self) -> str | None:
        """R-KV's cache order (``order=cache``) is replayed on the host; token order compiles."""
        return COMPILE_REFUSAL if self.order == "cache" else None

    def _final(self, view, index: torch.Tensor, prefix: torch.Tensor, width: int) -> torch.Tensor:
        """[N, H, S] R-KV's final score of each slot before the window (``r1_kv.py`` 49-77)."""
        importance = window_softmax(view, prefix, self.gqa).to(view.keys.dtype).float()
        ordered = to_fork_order(importance, index, prefix, width, fill=-INF)  # -inf: max_pool1d's own padding
        pooled = F.max_pool1d(ordered, self.kernel_size, stride=1, padding=self.kernel_size // 2)[..., :width]
        pooled = from_fork_order(pooled, index).masked_fill(~prefix, 0.0)
        similarity = redundancy(view, index, self.threshold, exempt_first=self.order == "cache")
        return self.mix_lambda * pooled - (1 - self.mix_lambda) * similarity

    def _topk(self, ordered: torch.Tensor, lengths: list[int], budget: int) -> list[torch.Tensor | None]:
        """Per compressing row (length > 0), R-KV's new order of cache indices: ``topk(budget - window)`` of the
        entries before the window, in topk's order, then the window (``r1_kv.py`` 82, 168-179)."""
        out: list[torch.Tensor | None] = [None] * len(lengths)
        window = min(self.window_size, budget)  # a budget within the window: its newest entries (R-KV asserts)
        for length in sorted(set(lengths) - {0}):
            rows = [r for r, n in enumerate(lengths) if n == length]
            top = ordered[rows, :, :length - self.window_size].topk(budget - window, dim=-1).indices
            tail = torch.arange(length - window, length, device=top.device).expand(*top.shape[:2], window)
            for r, indices in zip(rows, torch.cat([top, tail], dim=-1)):
                out[r] = indices
        return out


def redundancy(view, index: torch.Tensor, threshold: float, exempt_first: bool = True) -> torch.Tensor:
    """R-KV's ``cal_similarity`` per slot, in the cache order ``index``: the mean cosine similarity of each key to
    the keys of the cache (its own term, and each key's term to it from the last key similar to it, zeroed),
    softmaxed over the cache. ``exempt_first``: a key with no similar key exempts the first entry (R-KV)."""
    keys = view.keys.float()
    unit = keys / (keys.norm(dim=-1, keepdim=True) + 1e-8)
    sim = unit @ unit.transpose(-1, -2)  # [B, H, S, S]: row i, column j
    pair_valid = view.valid[..., :, None] & view.valid[..., None, :]
    pair_valid &= ~torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device)
    sim = sim.masked_fill(~pair_valid, 0.0)
    similar = torch.where(sim > threshold, index[..., None, :], -1)
    latest = similar.argmax(dim=-1, keepdim=True)  # row i's last similar key in the cache order
    has_similar = similar.amax(dim=-1, keepdim=True) >= 0
    if exempt_first:  # utils.py 63-92: no similar key -> column 0 (the cache's first entry) zeroed
        first = index.argmin(dim=-1)[..., None, None].expand_as(latest)
        sim = sim.scatter(-1, torch.where(has_similar, latest, first), 0.0)
    else:
        sim = sim.scatter(-1, latest, torch.where(has_similar, 0.0, sim.gather(-1, latest)))
    n_valid = view.valid.sum(dim=-1, keepdim=True).clamp(min=1)
    mean_sim = sim.sum(dim=-2) / n_valid
    return torch.softmax(mean_sim.masked_fill(~view.valid, -torch.inf), dim=-1).nan_to_num(0.0)


def position_index(view) -> torch.Tensor:
    """[N, H, S] each valid slot's rank in token order (invalid slots: a large number)."""
    rank = view.positions.masked_fill(~view.valid, _BIG).argsort(dim=-1).argsort(dim=-1)
    return rank.masked_fill(~view.valid, _BIG)


def _next_multiple(n: int, period: int) -> int:
    """The least multiple of ``period`` that is at least ``n``."""
    return -(-n // period) * period
