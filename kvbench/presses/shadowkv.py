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
    ``local_window`` to ``local_window + chunk_size - 1`` tokens. Each step, per KV head, the chunks with the
    highest query·landmark (the group's mean logit; ShadowKV takes the maximum over the group of each head's
    softmax) are rebuilt (keys from the coefficients, RoPE at their own positions; values from the host) and
    attended with the outliers and the exact tokens. ``budget`` = prompt tokens attended per step (ShadowKV's
    sparse budget with its outliers and local chunks); every generated token is kept exact and attended on top,
    as in ShadowKV (``generated=exact``). ``generated=projected`` is a kvbench extension, not ShadowKV: generated
    tokens join the chunks as they leave the local window, projected on the prompt's basis (which a short prompt
    spans poorly), and ``budget`` bounds every token attended.
    """

    name = "shadowkv"
    summary = "low-rank pre-RoPE keys + host values; top chunks by query·landmark rebuilt each step"
    source = "Sun et al. 2024, arXiv 2410.21465"
    revision = 2  # generated tokens exact by default (1: projected on the prompt's basis)
    #: Nothing is evicted: the engine builds a ``ShadowCache`` instead of a ``BudgetCache``.
    sparse = True

    #: Rank of the pre-RoPE key coefficients (ShadowKV: 160, for 8 KV heads x 128 dims); capped at heads x dims.
    rank: int = 160
    #: Tokens per chunk (ShadowKV: 8).
    chunk_size: int = 8
    #: Most recent tokens always attended exactly (between this and this + chunk_size - 1).
    local_window: int = 32
    #: Chunks per KV head kept exact on the device because their keys stray most from their landmark.
    outlier_chunks: int = 2
    #: exact: generated tokens kept exact and always attended (ShadowKV); projected: chunked on the prompt's basis.
    generated: str = "exact"

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("rank", "chunk_size", "local_window"):
            if getattr(self, field) < 1:
                raise ValueError(f"shadowkv: {field} must be >= 1, got {getattr(self, field)}")
        if self.outlier_chunks < 0:
            raise ValueError(f"shadowkv: outlier_chunks must be >= 0, got {self.outlier_chunks}")
        if self.generated not in ("exact", "projected"):
            raise ValueError(f"shadowkv: generated must be 'exact' or 'projected', got {self.generated!r}")

    def cadence(self, budget: int) -> tuple[int, int]:
        """(budget, budget): nothing is evicted; fails with one line on a budget below the fixed part."""
        least = self.local_window + self.chunk_size - 1 + (self.outlier_chunks + 1) * self.chunk_size
        if budget < least:
            raise KvbenchError(f"shadowkv: budget {budget} is below the {least} tokens of its local "
                               f"window ({self.local_window} + {self.chunk_size - 1}), outliers "
                               f"({self.outlier_chunks} x {self.chunk_size}) and one chunk")
        return budget, budget
