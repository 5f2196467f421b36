from dataclasses import dataclass

from kvbench.errors import KvbenchError
from kvbench.presses.base import Press


@dataclass
class ShadowKVPress(Press):
    """ShadowKV: nothing is evicted; each decoding step attends to a sparse selection of the prompt, and to every
    generated token exactly.

    The prompt's keys are kept on the device as rank-``rank`` coefficients of the pre-RoPE keys over a basis from
    its SVD (per layer and sequence); its values go to host memory. Its tokens are grouped in chunks of
    ``chunk_size``, each with a landmark (the mean of its post-RoPE keys) on the device; the ``outlier_chunks``
    chunks per KV head whose keys stray most from their landmark stay exact on the device, and so do its last
    ``local_window`` to ``local_window + chunk_size - 1`` tokens. Each step, per KV head, the chunks that score
    highest for the head's query group (``chunk_scores``) are rebuilt (keys from the coefficients, RoPE at their
    own positions; values from the host) and attended with the outliers and the exact tokens. Every generated
    token is kept exact and attended on top, as in ShadowKV (``generated=exact``).

    ShadowKV's rule (ByteDance-Seed/ShadowKV, ``models/kv_cache.py``, ``ShadowKVCache``) with ``chunk_size=8`` and
    ``local_window=32`` (its 4 local chunks): chunks ranked per KV head by the maximum over the query group of each
    query head's softmax over the chunks (logits / sqrt(128), whatever the head size). The landmarks, outliers and
    chunks chosen are checked against it in ``tests/reference/test_shadowkv.py``. Differences from it:

    - ``chunk_scores=mean-logit`` (a kvbench variant, revision 2's default) ranks chunks by the group's mean
      query-landmark logit instead: the same chunks at GQA group 1, not with larger groups.
    - ``outlier_chunks``: 2 by default (ShadowKV: 48, i.e. 384 tokens, longer than a reasoning prompt).
    - ``budget`` = prompt tokens attended per step: the selected chunks, the outliers and the prompt's tail
      (ShadowKV's ``sparse_budget`` counts the selected chunks only); the generated tokens come on top.
    - ShadowKV's code handles only prompts of more than 4096 tokens (``models/base.py`` line 129: a shorter prompt
      takes its decoding path and builds no shadow store) with a sparse budget below the prompt's length
      (``kv_cache.py`` line 280), and at least 52 chunks (48 outliers, 4 local); kvbench chunks what it can of any
      prompt, so on a short reasoning prompt this is ShadowKV's rule applied far outside where its code runs.
    - float32 landmarks and scores (ShadowKV: bfloat16, ties broken by ``topk``).
    - ``generated=projected`` is a kvbench extension, not ShadowKV: generated tokens join the chunks as they leave
      the local window, projected on the prompt's basis (which a short prompt spans poorly), and ``budget`` bounds
      every token attended.
    """

    name = "shadowkv"
    summary = "low-rank pre-RoPE keys + host values; top chunks by query·landmark rebuilt each step"
    source = "Sun et al. 2024, arXiv 2410.21465"
    reference = ("ByteDance-Seed/ShadowKV@e51904c models/kv_cache.py (ShadowKVCache.prefill_kv_cache, "
                 "get_retrieval_position_ids)")
    revision = 3  # ShadowKV's chunk scores by default (2: the group's mean logit; 1: generated tokens projected)
    #: Nothing is evicted: the engine builds a ``ShadowCache`` instead of a ``BudgetCache``.
    sparse = True

    #: Rank of the pre-RoPE key coefficients (ShadowKV: 160, for 8 KV heads x 128 dims); capped at heads x dims.
    rank: int = 160
    #: Tokens per chunk (ShadowKV: 8).
    chunk_size: int = 8
    #: Most recent tokens always attended exactly (between this and this + chunk_size - 1).
    local_window: int = 32
    #: Chunks per KV head kept exact on the device because their keys stray most from their landmark (ShadowKV: 48).
    outlier_chunks: int = 2
    #: exact: generated tokens kept exact and always attended (ShadowKV); projected: chunked on the prompt's basis.
    generated: str = "exact"
    #: Chunk ranking per KV head: softmax-max (ShadowKV's: the maximum over the group of each query head's softmax
    #: over the chunks) or mean-logit (a kvbench variant: the group's mean logit).
    chunk_scores: str = "softmax-max"

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("rank", "chunk_size", "local_window"):
            if getattr(self, field) < 1:
                raise ValueError(f"shadowkv: {field} must be >= 1, got {getattr(self, field)}")
        if self.outlier_chunks < 0:
            raise ValueError(f"shadowkv: outlier_chunks must be >= 0, got {self.outlier_chunks}")
        if self.generated not in ("exact", "projected"):
            raise ValueError(f"shadowkv: generated must be 'exact' or 'projected', got {self.generated!r}")
        if self.chunk_scores not in ("mean-logit", "softmax-max"):
            raise ValueError(f"shadowkv: chunk_scores must be 'mean-logit' or 'softmax-max', got {self.chunk_scores!r}")

    def cadence(self, budget: int) -> tuple[int, int]:
        """(budget, budget): nothing is evicted; fails with one line on a budget below the fixed part."""
        least = self.local_window + self.chunk_size - 1 + (self.outlier_chunks + 1) * self.chunk_size
        if budget < least:
            raise KvbenchError(f"shadowkv: budget {budget} is below the {least} tokens of its local "
                               f"window ({self.local_window} + {self.chunk_size - 1}), outliers "
                               f"({self.outlier_chunks} x {self.chunk_size}) and one chunk")
        return budget, budget
