"""RLKV (and DuoAttention): the heads a gate file marks keep the whole cache; the others keep sinks + recent."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvbench.errors import KvbenchError
from kvbench.presses.base import INF, Press, View, file_digest, recent_positions

#: Slots a head may hold: every token (the cache then allocates the sequence's length).
_UNBOUNDED = 2**62


def load_gates(path: str) -> np.ndarray:
    """[layers, KV heads] gates from a tab-separated file (RLKV's ``adapter_weights.tsv``, DuoAttention's
    ``full_attention_heads.tsv``), clipped to [0, 1] as both read them."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"rlkv: no gates file {str(file)!r} (RLKV's head_dist/rlkv/<model>/<run>/adapter_weights.tsv "
                         "or DuoAttention's full_attention_heads.tsv)")
    try:
        rows = [[float(x) for x in line.split()] for line in file.read_text().splitlines() if line.strip()]
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"rlkv: {str(file)!r} is not a table of numbers ({err})") from None
    if not rows or len({len(r) for r in rows}) != 1 or not all(math.isfinite(x) for r in rows for x in r):
        raise ValueError(f"rlkv: {str(file)!r} must hold one row of finite gates per layer, one per KV head")
    return np.clip(np.array(rows, dtype=float), 0, 1)


def full_heads(gates: np.ndarray, sparsity: float, seed: int) -> np.ndarray:
    """[layers, KV heads] True for the heads that keep the whole cache: RLKV's ``sparsify_attention_heads``
    (``base/duo_attn/utils.py``): noise of up to 1e-6 breaks ties (numpy seeded with ``seed``, as ``pred.py``'s
    ``seed_everything(42)`` leaves it), the ``sparsity`` quantile is the threshold, gates at or above it are full."""
    noisy = gates + np.random.RandomState(seed).uniform(0, 1e-6, gates.shape)
    threshold = 2.0 if sparsity >= 1 else -1.0 if sparsity <= 0 else np.quantile(noisy, sparsity)
    return noisy >= threshold


@dataclass
class RLKVPress(Press):
    """Heads a gate file ranks high keep every entry; the others keep ``n_sink`` sinks and the newest entries.

    DuoAttention's inference rule as RLKV's evaluation runs it (``eval/bench/pred.py``, ``--method rlkv``, through
    ``enable_duo_attention_eval``): the per-KV-head gates (RLKV's learned ``adapter_weights.tsv``; DuoAttention's
    ``full_attention_heads.tsv`` gives DuoAttention), the ``sparsity`` share of heads with the lowest gates
    compressed (``kvbench calibrate -p rlkv`` computes gates by DuoAttention's optimisation for any model). Every
    head attends causally over the whole prompt at the prefill; after every forward a
    compressed head keeps its first ``n_sink`` and its newest ``budget - n_sink`` entries (RLKV: 16 + 64, so
    ``--budget 80``), a full head everything. RLKV's runs use sparsity 0.2 to 0.8.

    Differences from the source (``tests/reference/test_rlkv.py``): none in the entries kept from the prompt's end
    on. RLKV's evaluation script prefills all but the prompt's last 50 tokens and feeds those one at a time, so its
    compressed heads attend to sinks + recent for them; kvbench's prefill attends every head over the whole prompt
    (as the source's own first forward does). It runs where the source fails: a budget of n_sink or less is
    refused, one KV head per layer works. The cache allocates every head the sequence's length (full heads need
    it; RLKV's SGLang backend keeps two pools), while the reported KV entries and bytes are those held, averaged
    over heads. Each compression reads the counts back from the device (one synchronisation per decoding step).
    """

    name = "rlkv"
    summary = "gated heads keep the whole cache, the others sinks + recent (RLKV's or DuoAttention's gates)"
    source = "Du et al. 2025, arXiv 2510.08525 (RLKV); Xiao et al. 2024, arXiv 2410.10819 (DuoAttention)"
    reference = ("Kurt232/RLKV@6dadf85 base/patch/llama.py (llama_duo_attention_forward_one_way_reordered), "
                 "base/duo_attn/utils.py (sparsify_attention_heads), eval/bench/pred.py (--method rlkv)")
    reads_whole_window = False
    keeps_fewer = True
    calibration = "gates"

    #: The per-layer, per-KV-head gates (RLKV's adapter_weights.tsv, DuoAttention's full_attention_heads.tsv).
    gates: str = ""
    #: The share of KV heads compressed to sinks + recent (RLKV's --sparsity: 0.5 by default, 0.2-0.8 in its runs).
    sparsity: float = 0.5
    #: Sink tokens a compressed head keeps (RLKV's evaluation: 16; the rest of --budget are recent tokens).
    n_sink: int = 16
    #: numpy's seed for the tie-breaking noise (RLKV's pred.py: 42).
    seed: int = 42

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.gates:
            raise ValueError("rlkv: give its gates, -a gates=FILE (RLKV ships adapter_weights.tsv for "
                             "R1-Distill-Llama-8B, R1-Distill-Qwen-7B and Qwen3-4B-Thinking; kvbench calibrate -p rlkv "
                             "optimises DuoAttention's for any model)")
        if not 0.0 <= self.sparsity <= 1.0:
            raise ValueError(f"rlkv: sparsity must be in [0, 1], got {self.sparsity}")
        if self.n_sink < 0:
            raise ValueError(f"rlkv: n_sink must be >= 0, got {self.n_sink}")
        if self.buffer != 1:
            raise ValueError("rlkv: buffer does not apply (compressed heads are cut after every forward)")
        self.full = torch.from_numpy(full_heads(load_gates(self.gates), self.sparsity, self.seed))
        self.digest = file_digest(self.gates)

    def data_digest(self) -> str:
        return self.digest

    @property
    def allocates(self) -> bool:
        """Heads keep different numbers of entries: the host keeps each layer's mean and most per head."""
        return True

    @property
    def grows(self) -> bool:
        """Its full heads keep every entry (unless every head is compressed)."""
        return bool(self.full.any())

    def cadence(self, budget: int) -> tuple[int, int]:
        if budget <= self.n_sink:
            raise KvbenchError(f"rlkv: --budget {budget} must exceed n_sink {self.n_sink} (a compressed head keeps "
                               "n_sink sinks and budget - n_sink recent tokens)")
        return budget, budget + 1

    def capacity(self, budget: int, n_layers: int, n_heads: int) -> int:
        return _UNBOUNDED if self.grows else budget + 1

    def check_model(self, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        if tuple(self.full.shape) != (num_layers, num_kv_heads):
            raise ValueError(f"rlkv: {self.gates!r} holds gates for {self.full.shape[0]} layers x {self.full.shape[1]}"
                             f" KV heads; this model has {num_layers} x {num_kv_heads} (kvbench calibrate -p rlkv "
                             "writes gates for a model)")

    def score(self, view: View) -> torch.Tensor:
        n, h = view.positions.shape[:2]
        layers = self.full.to(view.positions.device)
        if view.layers > 1:
            full = layers.repeat_interleave(n // view.layers, dim=0)  # rows are layer-major
        else:
            full = layers[getattr(view, "layer_idx", None) or 0].expand(n, h)
        kept = full[..., None] | (view.positions < self.n_sink) | recent_positions(view, view.budget - self.n_sink)
        return torch.where(kept, INF, -INF)  # exactly these are kept (``keeps_fewer``)
