"""The press interface: a dataclass that scores cache slots (higher = keep) for one eviction policy.

The engine (``kvbench.engine.cache``) owns the slots and decides *when* to evict; a press only says *what*
to keep, through ``score``. Protected tokens (sinks, recent window) get ``+inf``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F

INF = math.inf
#: The per-slot state holding each entry's token id (float32, exact below 2**24) for a press with ``reads_tokens``.
TOKEN_STATE = "token"


class View(Protocol):
    """What a press sees of the cache (the engine's ``View``): slots in physical order, rows = sequences
    (layers folded in when ``layers`` > 1), and the attention of the recent queries over the slots."""

    keys: torch.Tensor  # [N, H, S, D]
    values: torch.Tensor
    positions: torch.Tensor  # [N, H, S] each slot's token position
    valid: torch.Tensor  # [N, H, S]
    state: dict[str, torch.Tensor]  # per-slot press state ``state_names``, [N, H, S]
    query_position: torch.Tensor  # [N] the newest token's position
    budget: int | None
    seeds: torch.Tensor | None
    step: int  # 0 = the prefill
    #: [N] each row's own decoding step, or None when every row is at ``step``. Under continuous batching a
    #: sequence joins a running batch, so a press that draws by step reads this to stay batch-invariant.
    row_step: torch.Tensor | None
    prompt_length: torch.Tensor | None  # [N]
    layers: int
    #: the recent queries: ``queries`` [N, H_q, W, D], ``positions``, ``valid`` [N, W], ``scaling``, and ``rope``
    #: (positions [n] -> the model's cos, sin [n, rotary dims]) for a press with ``reads_rope``
    window: Any
    #: The model's RoPE for a press with ``reads_rope``: positions [n] -> (cos, sin) [n, rotary dims], and its
    #: ``inv_freq`` [rotary dims / 2]; None otherwise.
    rope: Any
    #: Entries each row keeps at this compression (a row keeping at least what it holds keeps all); None when the
    #: view is not scored for one of the engine's compressions.
    compress_to: list[int] | None

    def attention(self, gqa: str = "mean", last: int | None = None) -> torch.Tensor: ...


@dataclass
class Press:
    """Base class. Subclasses are dataclasses whose fields are the press's documented parameters."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    source: ClassVar[str] = ""
    #: The code this press's rule is transcribed from (``owner/repo@commit path (function)``) and checked against
    #: in ``tests/reference/``; empty for a press with no source code (the full cache, plug-ins).
    reference: ClassVar[str] = ""
    #: False only for the full cache: the engine then never evicts.
    evicts: ClassVar[bool] = True
    #: True for sparse attention over every token seen (ShadowKV): the engine builds a ``ShadowCache``.
    sparse: ClassVar[bool] = False
    #: Raised when a press's choices change for the same parameters, so stored runs are not reused as its own.
    revision: ClassVar[int] = 1
    #: Names of per-slot float state tensors the engine keeps aligned with the slots (zero for new tokens).
    state_names: ClassVar[tuple[str, ...]] = ()
    #: Where a plug-in press's class came from (``module:Class``, ``file.py:Class``); None for kvbench's own.
    origin: ClassVar[str | None] = None
    #: False if decoding scores read only the newest query of the window (the engine then keeps no window rows).
    reads_whole_window: ClassVar[bool] = True
    #: False where the rule's exact arithmetic lets float noise that differs between batch shapes decide what is
    #: kept (``hott-knorm``'s unrounded norms): runs then decode such a press one sequence at a time.
    batch_invariant: ClassVar[bool] = True
    #: True for selection (Quest): every entry is kept, and each decoding step's query heads attend to what
    #: ``select`` chooses; ``--budget`` is the tokens attended.
    selects: ClassVar[bool] = False
    #: True if the press reads the model's RoPE (``view.window.rope``), to undo it on the window's queries.
    reads_rope: ClassVar[bool] = False
    #: The parameter naming a per-model statistics file (``kvbench calibrate`` writes one), for a press that reads
    #: one (TriAttention's ``stats``); None: the press needs no calibration.
    calibration: ClassVar[str | None] = None
    #: True if the press reads each entry's token id (``view.state[TOKEN_STATE]``), e.g. to find separators.
    reads_tokens: ClassVar[bool] = False
    #: True if the press chooses how many entries a compression keeps: exactly those it scores above ``-inf``
    #: (SepLLM: only the separators it finds; RLKV: every entry of its full heads). The engine then reads the counts
    #: kept back from the device, once per compression; ``cadence``'s keep is only what it expects at most.
    keeps_fewer: ClassVar[bool] = False
    #: Why the press's decoding step cannot be compiled into one graph (``--compile``); None: it can.
    compile_refusal: ClassVar[str | None] = None

    #: Entries added between two compressions: the cache holds at most ``budget + buffer`` entries.
    buffer: int = 1

    def __post_init__(self) -> None:
        if self.buffer < 1:
            raise ValueError(f"{self.name}: buffer must be >= 1, got {self.buffer}")

    def data_digest(self) -> str | None:
        """A digest of the per-model file the press reads (``calibration``), so that stored rows made with other
        contents at the same path are not reused as this run's; None for a press that reads none."""
        return None

    def for_tokenizer(self, tokenizer) -> Press:
        """The press to run with ``tokenizer`` (the model's): itself, or a copy with what it reads of the tokenizer
        resolved (SepLLM's separator ids). Called where a run has its tokenizer, before generating."""
        return self

    def check_model(self, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        """Raise ValueError, in words, if the press cannot run on a model of these shapes (a calibrated press given
        another model's statistics); the engine asks before the first forward."""

    def cadence(self, budget: int) -> tuple[int, int]:
        """(entries kept by a compression, entries held that trigger one) at ``budget``."""
        return budget, budget + self.buffer

    def row_cadence(self, budget: int, prompt_length: int, compressions: int) -> tuple[int, int]:
        """``cadence`` for a sequence with ``prompt_length`` prompt tokens after ``compressions`` compressions: the
        same for every press but one whose schedule grows with the sequence (RPC's)."""
        return self.cadence(budget)

    def layer_keeps(self, budget: int, prompt_length: int, compressions: int, n_layers: int) -> list[int] | None:
        """What each layer keeps at that compression, for a press whose layers compress at different steps (a
        layer keeping at least what it holds does not compress); None: ``layer_budgets`` (needs ``allocates``)."""
        return None

    def capacity(self, budget: int, n_layers: int, n_heads: int) -> int:
        """Slots per KV head the cache allocates at ``budget``: the most one head may hold."""
        keep, trigger = self.cadence(budget)
        return max(self.head_capacity(b, n_heads) for b in self.layer_budgets(keep, n_layers)) + trigger - keep

    def layer_budgets(self, budget: int, n_layers: int) -> list[int]:
        """Entries each layer keeps per KV head on average at a compression (``budget`` everywhere but PyramidKV)."""
        return [budget] * n_layers

    def head_capacity(self, layer_budget: int, n_heads: int) -> int:
        """The most entries one KV head of a layer with ``layer_budget`` may keep (more with AdaKV)."""
        return layer_budget

    def head_counts(self, scores: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor) -> torch.Tensor | None:
        """Entries each KV head keeps [N, H], given scores [N, H, S] and each row's mean keep per head [N].

        None (the default) keeps ``keep`` in every head; AdaKV shares a row's total among its heads.
        """
        return None

    @property
    def allocates(self) -> bool:
        """True if layers or heads keep different numbers of entries (PyramidKV, AdaKV)."""
        return False

    @property
    def query_window(self) -> int:
        """How many recent queries (post-RoPE, with positions) each layer keeps for ``view.attention()``."""
        return 0

    @property
    def accumulates_attention(self) -> bool:
        """True if ``observe`` must receive every step's attention (costs one extra q·K per step)."""
        return False

    def observe(self, view: View, attention: torch.Tensor) -> None:
        """Receive the attention [B, H_kv, S] that this step's queries placed on the visible slots."""

    def score(self, view: View) -> torch.Tensor:
        """Return [B, H_kv, S] scores over ``view``'s slots; higher = keep. Invalid slots are ignored."""
        raise NotImplementedError

    def select(self, queries: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
               budget: int, layer_idx: int) -> torch.Tensor | None:
        """A selecting press's choice (``selects``): [B, H, G, S] the slots each query head of a decoding step
        attends to (queries [B, H, G, D]: the G query heads of each KV head; keys [B, H, S, D]; positions and valid
        [B, H, S]); None: every valid slot."""
        return None

    def params(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def file_digest(path: str) -> str:
    """The first 16 hex digits of the SHA-256 of a per-model file's bytes (``Press.data_digest``)."""
    return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()[:16]


def at_prefill(view: View) -> bool:
    """True if ``view`` is scored at the prefill (step 0). A compiled decoding step carries its step number as a 0-d
    tensor, so that one graph serves every step: it is never the prefill (which runs eagerly)."""
    return not isinstance(view.step, torch.Tensor) and view.step == 0


def recent_positions(view: View, recent: int) -> torch.Tensor:
    """[N, H, S]: the slots among each row's ``recent`` newest positions (the query's own included)."""
    return view.positions > view.query_position[:, None, None] - recent


def protect(scores: torch.Tensor, view: View, n_sink: int = 0, recent: int = 0) -> torch.Tensor:
    """Give ``+inf`` to the first ``n_sink`` positions and to the ``recent`` most recent positions."""
    keep = torch.zeros_like(view.valid)
    if n_sink > 0:
        keep |= view.positions < n_sink
    if recent > 0:
        keep |= recent_positions(view, recent)
    return scores.masked_fill(keep, INF)


def pool_by_position(scores: torch.Tensor, view: View, kernel_size: int, mode: str = "avg",
                     among: torch.Tensor | None = None, count_padding: bool = False) -> torch.Tensor:
    """1-D pooling of per-slot scores along token order (slots are stored in arbitrary order).

    Pools over the slots ``among`` (default: the valid ones), others counting as zeros beyond the sequence's end.
    ``count_padding`` averages over the whole kernel, zero padding included (``avg_pool1d``'s default, as in
    SnapKV's and R-KV's code); otherwise over the positions inside the sequence only.
    """
    if kernel_size <= 1:
        return scores
    members = view.valid if among is None else among
    order = view.positions.masked_fill(~members, torch.iinfo(torch.long).max).argsort(dim=-1)
    ordered = scores.gather(-1, order).masked_fill(~members.gather(-1, order), 0.0)
    b, h, s = ordered.shape
    flat = ordered.reshape(b * h, 1, s)
    pad = kernel_size // 2
    if mode == "max":
        pooled = F.max_pool1d(flat, kernel_size, stride=1, padding=pad)
    elif mode == "avg":
        pooled = F.avg_pool1d(flat, kernel_size, stride=1, padding=pad, count_include_pad=count_padding)
    else:
        raise ValueError(f"pooling must be 'avg' or 'max', got {mode!r}")
    pooled = pooled[..., :s].reshape(b, h, s)
    return torch.empty_like(scores).scatter_(-1, order, pooled)


def window_logits(view, sum_group: bool = False) -> torch.Tensor:
    """[N, H, G, W, S] float32: each window query's scaled logit on every slot, the query heads grouped by the KV
    head they read (G per KV head); ``sum_group``: [N, H, W, S], the group's logits summed in the same contraction."""
    window = view.window
    n, hq, w, d = window.queries.shape
    h = view.keys.shape[1]
    queries = window.queries.float().view(n, h, hq // h, w, d)
    out = "nhws" if sum_group else "nhgws"
    return torch.einsum(f"nhgwd,nhsd->{out}", queries, view.keys.float()) * window.scaling


def window_mean(probs: torch.Tensor, window) -> torch.Tensor:
    """[N, H, S]: ``probs`` [N, H, W, S] averaged over each row's valid window queries."""
    probs = probs * window.valid[:, None, :, None]
    return probs.sum(dim=2) / window.valid.sum(dim=-1).clamp(min=1)[:, None, None]


def window_softmax(view, prefix: torch.Tensor, gqa: str = "max") -> torch.Tensor:
    """[N, H, S]: the window queries' attention over the ``prefix`` keys only (all older than every window query,
    so no causal mask is needed), averaged over the valid window queries. ``gqa="max"``: softmax of the maximum
    of the group's logits (R-KV's code); ``"mean"``: each query head's softmax, averaged over the group (RPC's)."""
    masked = window_logits(view).masked_fill(~prefix[:, :, None, None, :], -torch.inf)
    grouped = masked.amax(dim=2) if gqa == "max" else masked
    probs = torch.softmax(grouped, dim=-1)
    probs = probs if gqa == "max" else probs.mean(dim=2)
    return window_mean(probs.nan_to_num(0.0), view.window)
