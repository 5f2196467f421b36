from dataclasses import dataclass

import torch

from kvbench.errors import KvbenchError
from kvbench.presses.base import Press, View

#: A trigger no cache reaches: Quest compresses nothing.
_NEVER = 2**62


@dataclass
class QuestPress(Press):
    """Quest: selection, not eviction. Every entry is kept; at each decoding step every query head attends only to
    the pages of the cache whose keys could score highest for its query.

    Quest's evaluation rule (``evaluation/quest_attention.py``, ``forward`` and ``local_heavy_hitter_mask``): the
    cache is cut into pages of ``chunk_size`` consecutive positions (from position 0); a page's bound for a query
    ``q`` is ``Σ_d max(q_d · min_t k_td, q_d · max_t k_td)`` over its keys (post-RoPE: Quest's
    ``sign(q) · k`` maximised over the page, times ``|q|``); per query head the ``max(3, budget // chunk_size)``
    pages with the highest bound (at most all of them; the budget at most the tokens held) are attended, the
    others masked. The prefill and the first ``dense_layers`` layers (2) attend to everything, as there.
    ``--budget`` is Quest's ``token_budget``: the tokens each query head attends to per step.

    The cache holds every token: its memory is the full cache's (the KV columns of a run and a report show it),
    nothing is evicted (attention loss, mass on evicted entries, is 0 by definition); what eviction is compared
    with is the attention of a budget of tokens. Differences from Quest's code: bounds in float32 (Quest: the query
    in float32, the keys in the model's dtype); exact ties of two pages' bounds go to the newer page (Quest:
    ``topk``'s order); at a budget of at least the tokens held every page is attended (Quest's ``token_budget //
    chunk_size`` pages can leave the partial last page out); the first ``dense_layers`` layers are dense in any
    model (Quest numbers its layers from 32 down, so its dense layers are the first N - 30 of an N-layer model: none
    on 30 layers or fewer, 10 on 40; ``tests/reference/test_quest.py``).
    """

    name = "quest"
    summary = "selection: each query head attends to the top pages by a q·k bound; every entry kept (full memory)"
    source = "Tang et al. 2024, arXiv 2406.10774 (Quest)"
    reference = "mit-han-lab/Quest@01c1623 evaluation/quest_attention.py (forward, local_heavy_hitter_mask)"
    selects = True

    #: Consecutive positions per page (Quest's ``chunk_size``, 16 in its scripts).
    chunk_size: int = 16
    #: First layers that attend to every token (Quest's ``layer_id < 2``).
    dense_layers: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_size < 1 or self.dense_layers < 0:
            raise ValueError(f"quest: chunk_size must be >= 1 and dense_layers >= 0, got {self.chunk_size}, "
                             f"{self.dense_layers}")

    def cadence(self, budget: int) -> tuple[int, int]:
        """Nothing is ever compressed: the cache keeps every entry."""
        if budget < 1:
            raise KvbenchError(f"quest: budget must be >= 1, got {budget}")
        return budget, _NEVER

    def capacity(self, budget: int, n_layers: int, n_heads: int) -> int:
        return _NEVER  # every token: the engine allocates the sequence's length

    def score(self, view: View) -> torch.Tensor:
        """Never used to evict (nothing is); every slot alike."""
        return torch.zeros(view.valid.shape, dtype=torch.float32, device=view.valid.device)

    def select(self, queries: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
               budget: int, layer_idx: int) -> torch.Tensor | None:
        if layer_idx < self.dense_layers:
            return None
        b, h, s, d = keys.shape
        pages = s // self.chunk_size + 2  # an upper bound read off the shape: no host read of the positions
        page = torch.div(positions, self.chunk_size, rounding_mode="floor").clamp(0, pages - 1).masked_fill(~valid, 0)
        high, low, filled = _page_extremes(keys.float(), page, valid, pages)
        q = queries.float()[:, :, :, None, :]  # [B, H, G, 1, D]
        bound = torch.maximum(q * high[:, :, None], q * low[:, :, None]).sum(dim=-1)  # [B, H, G, pages]
        bound = bound.masked_fill(~filled[:, :, None], -torch.inf)
        held = valid.sum(dim=-1).amax(dim=-1)  # [B] tokens held (nothing is evicted: the same in every head)
        n_filled = filled.sum(dim=-1).amax(dim=-1)
        wanted = torch.clamp(torch.minimum(held, torch.full_like(held, budget)) // self.chunk_size, min=3)
        count = torch.where(held <= budget, n_filled, torch.minimum(wanted, n_filled))  # [B]
        newest_first = torch.arange(pages - 1, -1, -1, device=keys.device)  # ties to the newer page
        order = bound[..., newest_first].argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(pages, device=keys.device).expand_as(order))
        chosen = rank.flip(-1) < count[:, None, None, None]  # [B, H, G, pages], back in page order
        return chosen.gather(-1, page[:, :, None, :].expand(-1, -1, queries.shape[2], -1)) & valid[:, :, None]


def _page_extremes(keys: torch.Tensor, page: torch.Tensor, valid: torch.Tensor, pages: int):
    """Per page and KV head, the keys' elementwise maximum and minimum [B, H, pages, D] over its valid slots, and
    whether it has any [B, H, pages]."""
    b, h, s, d = keys.shape
    index = page[..., None].expand(-1, -1, -1, d)
    big = torch.finfo(torch.float32).max
    high = keys.new_full((b, h, pages, d), -big).scatter_reduce(2, index, keys.masked_fill(~valid[..., None], -big),
                                                                "amax")
    low = keys.new_full((b, h, pages, d), big).scatter_reduce(2, index, keys.masked_fill(~valid[..., None], big),
                                                              "amin")
    filled = torch.zeros(b, h, pages, dtype=torch.long, device=keys.device).scatter_reduce(2, page, valid.long(),
                                                                                           "amax")
    return high, low, filled > 0
