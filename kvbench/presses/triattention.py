"""TriAttention: keys scored without queries, from calibrated pre-RoPE query centres, over future distances."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from kvbench.presses.base import INF, Press, View, file_digest

_BIG = torch.iinfo(torch.long).max


@dataclass(frozen=True)
class FrequencyStats:
    """Per layer and query head, the calibration's pre-RoPE query centre in each RoPE frequency (complex, the
    dims ``i`` and ``i + d/2`` of a frequency as real and imaginary parts) and its mean modulus: [L, H_q, d/2]."""

    q_mean: torch.Tensor  # complex64
    q_abs_mean: torch.Tensor  # float32
    metadata: dict


def load_frequency_stats(path: str) -> FrequencyStats:
    """Read a statistics file in TriAttention's layout (``{"metadata": {..., "sampled_heads"}, "stats":
    {"layerLL_headHH": {"q_mean_real", "q_mean_imag", "q_abs_mean"}}}``): the files TriAttention ships and the
    ones ``kvbench calibrate`` writes. Every head of every layer must be present."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"triattention: no statistics file {str(file)!r} (kvbench calibrate writes one for a model)")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
        metadata, stats = payload["metadata"], payload["stats"]
        heads = sorted({(int(layer), int(head)) for layer, head in metadata["sampled_heads"]})
    except Exception as err:  # not a torch file, or another layout
        first = (str(err).splitlines() or [""])[0][:120]
        raise ValueError(f"triattention: {str(file)!r} is not a TriAttention statistics file ({type(err).__name__}"
                         f"{': ' + first if len(first) < 80 else ''})") from None
    if metadata.get("rope_style", "half") != "half":
        raise ValueError(f"triattention: {str(file)!r} pairs RoPE dims as {metadata['rope_style']!r}; kvbench's "
                         "models pair them as 'half' (dims i and i + d/2)")
    n_layers, n_heads = 1 + max(layer for layer, _ in heads), 1 + max(head for _, head in heads)
    if len(heads) != n_layers * n_heads:
        raise ValueError(f"triattention: {str(file)!r} holds {len(heads)} heads, not every head of its {n_layers} "
                         f"layers x {n_heads} query heads (TriAttention's fallback for unsampled heads is not "
                         "implemented)")
    rows = [stats[f"layer{layer:02d}_head{head:02d}"] for layer, head in heads]
    stack = {name: torch.stack([row[name].float() for row in rows]).view(n_layers, n_heads, -1)
             for name in ("q_mean_real", "q_mean_imag", "q_abs_mean")}
    return FrequencyStats(torch.complex(stack["q_mean_real"], stack["q_mean_imag"]), stack["q_abs_mean"],
                          dict(metadata))


@dataclass
class TriAttentionPress(Press):
    """Keep the prompt and the decoded entries that calibrated query centres will attend to, scored without queries.

    TriAttention (``TriAttention.compute_keep_indices``) as its own experiment scripts configure it
    (``scripts/cli.py``:
    ``per_head_pruning``, ``count_prompt_tokens``, ``slack_budget_trigger``, normalised scores, ``divide_length``
    128, offsets up to 65,536, mean aggregation): once the cache holds ``budget + buffer`` entries (prompt included)
    it is cut back to ``budget``. The prompt's entries are never evicted (the first ``budget`` of them where the
    prompt is longer: the source then keeps its first ``budget`` physical entries). Each decoded key, RoPE undone,
    is scored by each query head's calibrated centre ``q̄`` (per RoPE frequency f, complex) and mean modulus
    ``E|q|``: ``Σ_f |q̄_f||k_f| s_f² cos((p₀ + o - p)ω_f + φ_f) + Σ_f (E|q_f| - |q̄_f|)|k_f| s_f²`` averaged over the
    offsets ``o`` = 1, 2, 4, ... ``offset_max_length`` (p₀ the next token's position, p the key's, φ_f the phase of
    ``q̄_f conj(k_f)``, s_f the RoPE's attention scaling); z-normalised per query head over the decoded entries;
    the maximum over a KV head's query heads, averaged over layers, ranks that KV head's entries in every layer
    (so all layers keep the same positions per KV head).

    Statistics come from ``-a stats=FILE``: ``kvbench calibrate``'s output for any model, or the files TriAttention
    ships (its ``triattention/calibration/``, the same layout). Differences from the source
    (``tests/reference/test_triattention.py``): no seeded noise of 1e-6 added to break ties (exact ties keep the
    newest entry); s_f² is read per frequency (the source reads every other dim of the half-split table, the same
    value under every RoPE it runs); a partial RoPE (Phi-3) counts its unrotated dims as frequency 0 (the source
    pairs the head's halves and does not run there); a prompt of at least ``budget + buffer`` tokens is cut to its
    first ``budget`` at the prefill (the source first compresses at the next decoding forward, keeping those and
    dropping that forward's token, so its compressions then fall one forward later: the recent entries held between
    compressions differ).
    """

    name = "triattention"
    summary = "query-free: calibrated pre-RoPE query centres score keys over future distances (trigonometric)"
    source = "Mao et al. 2026, arXiv 2604.04921 (TriAttention)"
    reference = ("WeianMao/triattention@c3744ee triattention/methods/triattention.py (TriAttention."
                 "compute_keep_indices, _select_per_head_independent) and methods/pruning_utils.py "
                 "(score_keys_for_round)")
    reads_whole_window = False
    reads_rope = True
    calibration = "stats"
    #: Every layer keeps the same positions per KV head (one score averaged over layers): not wrappable.
    layers_keep_alike = True

    #: The calibration statistics (``kvbench calibrate`` writes them; TriAttention's shipped files read as well).
    stats: str = ""
    #: Decoded entries between two compressions (TriAttention's ``divide_length``: 128).
    buffer: int = 128
    #: The largest future offset scored; offsets are the powers of two up to it (TriAttention: 65536).
    offset_max_length: int = 65536
    #: How the offsets' scores combine: ``mean`` (TriAttention's) or ``max``.
    aggregation: str = "mean"
    #: z-normalise each query head's scores over the decoded entries before combining heads (TriAttention's
    #: experiment scripts do).
    normalize: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.stats:
            raise ValueError("triattention: give its calibration statistics, -a stats=FILE (kvbench calibrate "
                             "--model MODEL --text FILE --out FILE writes them)")
        if self.aggregation not in ("mean", "max"):
            raise ValueError(f"triattention: aggregation must be 'mean' or 'max', got {self.aggregation!r}")
        if self.offset_max_length < 1:
            raise ValueError(f"triattention: offset_max_length must be >= 1, got {self.offset_max_length}")
        self.frequency_stats = load_frequency_stats(self.stats)
        self.digest = file_digest(self.stats)

    def data_digest(self) -> str:
        return self.digest

    def check_model(self, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        layers, heads, half = self.frequency_stats.q_mean.shape
        if (layers, heads, 2 * half) != (num_layers, num_heads, head_dim):
            model = self.frequency_stats.metadata.get("model_name") or "another model"
            raise ValueError(f"triattention: {self.stats!r} holds statistics of {model} ({layers} layers x {heads} "
                             f"query heads of {2 * half} dims); this model has {num_layers} x {num_heads} of {head_dim}"
                             " (kvbench calibrate writes its own)")

    def score(self, view: View) -> torch.Tensor:
        layers = view.layers
        batch = view.keys.shape[0] // layers
        prompt = view.prompt_length if view.prompt_length is not None else torch.zeros_like(view.query_position)
        pinned = view.positions < torch.clamp(prompt, max=view.budget or _BIG)[:, None, None]
        candidates = view.valid & ~pinned
        first = 0 if layers > 1 else (getattr(view, "layer_idx", None) or 0)
        per_layer = [self._layer_scores(view, rows, first + layer, candidates[rows])
                     for layer, rows in enumerate(_layer_rows(layers, batch))]
        scores = _mean_over_layers(torch.cat(per_layer), view.positions, candidates, layers)
        return scores.masked_fill(pinned, INF)

    def _layer_scores(self, view: View, rows: slice, layer: int, candidates: torch.Tensor) -> torch.Tensor:
        """[B, H, S]: one layer's normalised scores, the maximum over each KV head's query heads."""
        stats = self.frequency_stats
        if layer >= stats.q_mean.shape[0]:
            raise ValueError(f"triattention: the statistics have {stats.q_mean.shape[0]} layers; this model has more")
        keys, positions = view.keys[rows].float(), view.positions[rows]
        h, d = keys.shape[1], keys.shape[3]
        q_mean, q_abs = (t[layer].to(keys.device) for t in (stats.q_mean, stats.q_abs_mean))  # [H_q, d/2]
        if q_mean.shape[-1] * 2 != d or q_mean.shape[0] % h:
            raise ValueError(f"triattention: the statistics have {q_mean.shape[0]} query heads of "
                             f"{2 * q_mean.shape[-1]} dims; this model's {h} KV heads of {d} dims do not match")
        k_pairs, omega, scale_sq = unrotated_pairs(view.rope, keys, positions)  # [b, h, s, d/2] complex
        group = q_mean.shape[0] // h
        q_mean, q_abs = q_mean.view(h, group, 1, -1), q_abs.view(h, group, 1, -1)
        k_abs = k_pairs.abs()[:, :, None]  # [b, h, 1, s, d/2]
        relative = q_mean * k_pairs.conj()[:, :, None]
        amp, phi = q_mean.abs() * k_abs, torch.atan2(relative.imag, relative.real)
        extra = (q_abs - q_mean.abs()) * k_abs
        offsets = 2.0 ** torch.arange(int(math.log2(self.offset_max_length)) + 1, device=keys.device)
        delta = (view.query_position[rows] + 1)[:, None, None, None].float() - positions[:, :, None].float()
        phase = (delta[..., None] + offsets)[..., None] * omega + phi[..., None, :]  # [b, h, g, s, O, d/2]
        combined = (amp[..., None, :] * scale_sq * torch.cos(phase)).sum(-1) + (extra * scale_sq).sum(-1)[..., None]
        scores = combined.mean(-1) if self.aggregation == "mean" else combined.amax(-1)  # [b, h, g, s]
        if self.normalize:
            scores = _z_scores(scores, candidates[:, :, None])
        return scores.amax(dim=2)


def _layer_rows(layers: int, batch: int) -> list[slice]:
    return [slice(layer * batch, (layer + 1) * batch) for layer in range(layers)]


def unrotated_pairs(rope, keys: torch.Tensor, positions: torch.Tensor):
    """The keys with RoPE undone as complex pairs [B, H, S, d/2] (rotated dims i, i + r/2, then the unrotated
    dims likewise), each pair's angle per position ω [d/2] (0 for unrotated dims) and the RoPE's squared
    scaling s² [d/2] (1 for unrotated dims)."""
    if rope is None:
        raise ValueError("triattention: needs the model's RoPE (a model with a rotary embedding)")
    d = keys.shape[-1]
    cos, sin = rope(positions.reshape(-1))
    r = cos.shape[-1]
    cos, sin = (t.to(keys.device).view(*positions.shape, r) for t in (cos, sin))
    cos0, sin0 = (t.to(keys.device)[0] for t in rope(torch.zeros(1, dtype=torch.long)))
    scale = cos0[0]  # the attention scaling RoPE multiplies by (1 but under YaRN): cos at position 0
    rotated, base = keys[..., :r] / scale, None
    half = r // 2
    turned = torch.cat([-rotated[..., half:], rotated[..., :half]], dim=-1)
    base = rotated * (cos / scale) - turned * (sin / scale)  # TriAttention's ``invert_rope``
    rest = keys[..., r:]
    real = torch.cat([base[..., :half], rest[..., : (d - r) // 2]], dim=-1)
    imag = torch.cat([base[..., half:], rest[..., (d - r) // 2:]], dim=-1)
    zeros = torch.zeros((d - r) // 2, device=keys.device)
    omega = torch.cat([rope.inv_freq.to(keys.device)[:half], zeros])
    scale_sq = torch.cat([cos0[:half] ** 2 + sin0[:half] ** 2, zeros + 1.0])
    return torch.complex(real, imag), omega, scale_sq


def _z_scores(scores: torch.Tensor, among: torch.Tensor) -> torch.Tensor:
    """Each row's scores minus their mean over ``among``, over their standard deviation there (population; at
    least 1e-6), as TriAttention normalises over the decoded entries."""
    count = among.sum(-1, keepdim=True).clamp(min=1)
    mean = scores.masked_fill(~among, 0.0).sum(-1, keepdim=True) / count
    spread = ((scores - mean).masked_fill(~among, 0.0) ** 2).sum(-1, keepdim=True) / count
    return (scores - mean) / spread.sqrt().clamp(min=1e-6)


def _mean_over_layers(scores: torch.Tensor, positions: torch.Tensor, candidates: torch.Tensor,
                      layers: int) -> torch.Tensor:
    """[N, H, S]: each KV head's scores averaged over the layers position by position (every layer holds the same
    positions, in its own slot order), in every layer's slots."""
    if layers == 1:
        return scores
    order = positions.masked_fill(~candidates, _BIG).argsort(dim=-1)
    ordered = scores.gather(-1, order)
    n, h, s = ordered.shape
    mean = ordered.view(layers, n // layers, h, s).mean(dim=0).repeat(layers, 1, 1)
    return torch.empty_like(scores).scatter_(-1, order, mean)
