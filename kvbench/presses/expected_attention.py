from dataclasses import dataclass

import torch

from kvbench.presses.base import INF, View
from kvbench.presses.decoding_schedule import DecodingPressSchedule

_BIG = torch.iinfo(torch.long).max


@dataclass
class ExpectedAttentionPress(DecodingPressSchedule):
    """Keep the entries future queries are expected to attend to, from the recent queries' Gaussian statistics.

    Expected Attention as kvpress computes it (``ExpectedAttentionPress.score``) under its ``DecodingPress``
    schedule (``buffer`` decoding forwards between compressions, 512; see ``keydiff``): at a compression, the
    pre-RoPE queries of the last ``query_buffer + 1`` decoding tokens (DecodingPress keeps ``hidden_states_buffer_
    size`` = 256 and the compressing forward adds its own before the buffer is trimmed; at most ``buffer``, the
    buffer being cleared at each compression), their oldest ``n_sink`` dropped (kvpress's ``hidden_states[:,
    n_sink:]``), give each query head a mean μ
    and covariance Σ; both are rotated by RoPE averaged over ``n_future_positions`` (512) positions starting at the
    number of buffered queries (kvpress's ``q_len``: the buffer's length, not the sequence's position); a key's
    expected logit is ``μ·k·s + ½ kᵀΣk·s²`` (s the attention scaling; kvpress: ``1/sqrt(d)``, the same on Llama and
    Qwen), softmaxed over the cache but its first ``n_sink`` entries, averaged over the GQA group, times the value's
    norm (``use_vnorm``; plus ``epsilon`` before). The first ``n_sink`` tokens are always kept.

    Differences from kvpress (see ``keydiff`` for the schedule's; ``tests/reference/test_expected_attention.py``):
    float32 throughout (kvpress: the model's dtype); the logits' scale is the model's attention scaling (kvpress:
    ``1/sqrt(d)``, the same on Llama and Qwen); queries are the ones attention used, with the model's RoPE undone
    (kvpress re-projects the hidden states: the same vectors, also under a RoPE that scales them, YaRN's); a
    partial rotary embedding (Phi-3) is averaged over its rotated dims only (kvpress's rotation is head-wide and
    does not run there); exact ties keep the newest entry; a budget under ``n_sink`` keeps the newest of the sink
    tokens (kvpress then takes its first physical entries, new tokens among them, as sinks).
    """

    name = "expected-attention"
    summary = "expected attention of future queries (Gaussian query statistics, averaged RoPE) x value norm"
    source = "Devoto et al. 2025, arXiv 2510.00636 (Expected Attention)"
    reference = ("NVIDIA/kvpress@8bb29b9 kvpress/presses/expected_attention_press.py (ExpectedAttentionPress.score) "
                 "under kvpress/presses/decoding_press.py (DecodingPress.forward_hook)")
    reads_whole_window = False
    reads_rope = True

    #: DecodingPress's ``hidden_states_buffer_size``: the statistics read the queries of this many recent decoding
    #: tokens and the compressing one's.
    query_buffer: int = 256
    #: Future positions the RoPE rotation is averaged over (kvpress: 512).
    n_future_positions: int = 512
    #: First tokens always kept, and oldest buffered queries left out of the statistics (kvpress: 4).
    n_sink: int = 4
    #: Include the queries' covariance (kvpress: true).
    use_covariance: bool = True
    #: Multiply by the value's L2 norm (kvpress: true).
    use_vnorm: bool = True
    #: Added to the scores before the value norm (kvpress: 0).
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.query_window <= self.n_sink or self.n_sink < 0 or self.n_future_positions < 1:
            raise ValueError(f"expected-attention: query_buffer and buffer must exceed n_sink >= 0 and "
                             f"n_future_positions be >= 1, got {self.query_buffer}, {self.buffer}, {self.n_sink}, "
                             f"{self.n_future_positions}")

    @property
    def query_window(self) -> int:
        return min(self.query_buffer + 1, self.buffer)

    def score(self, view: View) -> torch.Tensor:
        window = view.window
        n, hq, w, d = window.queries.shape
        h = view.keys.shape[1]
        mean, cov, buffered = self._statistics(window)
        rotation = _average_rotation(window.rope, buffered, self.n_future_positions, d)  # [N, D, D]
        mean = torch.einsum("nhd,ned->nhe", mean, rotation)
        keys = view.keys.float().repeat_interleave(hq // h, dim=1)  # [N, H_q, S, D]
        logits = torch.einsum("nhd,nhsd->nhs", mean, keys) * window.scaling
        if cov is not None:
            cov = rotation[:, None] @ cov @ rotation[:, None].transpose(-1, -2)
            logits = logits + torch.einsum("nhsi,nhij,nhsj->nhs", keys, cov, keys) * window.scaling ** 2 / 2
        sink = view.positions < self.n_sink
        scored = (view.valid & ~sink).repeat_interleave(hq // h, dim=1)
        probs = torch.softmax(logits.masked_fill(~scored, -torch.inf), dim=-1).nan_to_num(0.0)
        scores = probs.view(n, h, hq // h, -1).mean(dim=2)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * view.values.float().norm(dim=-1)
        return scores.masked_fill(sink & view.valid, INF)

    def _statistics(self, window) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Per row and query head the pre-RoPE queries' mean [N, H_q, D] and covariance [N, H_q, D, D] over the
        buffered queries but the oldest ``n_sink``, and [N] how many were buffered."""
        cos, sin = window.rope(window.positions.flatten())
        n, hq, w, d = window.queries.shape
        scale = cos * cos + sin * sin  # RoPE's own scaling squared (YaRN's a^2; 1 for most models)
        queries = _unrotate(window.queries.float(), (cos / scale).view(n, 1, w, -1), (sin / scale).view(n, 1, w, -1))
        rank = window.positions.masked_fill(~window.valid, _BIG).argsort(dim=-1).argsort(dim=-1)
        used = (window.valid & (rank >= self.n_sink)).float()[:, None, :, None]  # [N, 1, W, 1]
        count = used.sum(dim=2).clamp(min=1)
        mean = (queries * used).sum(dim=2) / count
        if not self.use_covariance:
            return mean, None, window.valid.sum(dim=-1)
        centred = (queries - mean[:, :, None]) * used
        cov = torch.einsum("nhwi,nhwj->nhij", centred, centred) / count[..., None]
        return mean, cov, window.valid.sum(dim=-1)


def _unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo rotate-half RoPE on the first ``cos.shape[-1]`` dims of ``x``."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    half = torch.cat([-rot[..., r // 2:], rot[..., : r // 2]], dim=-1)
    return torch.cat([rot * cos - half * sin, rest], dim=-1)


def _average_rotation(rope, starts: torch.Tensor, count: int, d: int) -> torch.Tensor:
    """[N, D, D]: RoPE's rotation matrix averaged over positions ``start .. start + count - 1`` of each row
    (kvpress's ``apply_avg_rope``; dims past the rotary ones are left as they are). The rotation is linear in
    (cos, sin), so it is the rotation built from their means; on the device, with no host read."""
    positions = starts[:, None] + torch.arange(count, device=starts.device)
    cos, sin = rope(positions.flatten())
    n, r = len(starts), cos.shape[-1]
    cos, sin = cos.view(n, count, r).mean(dim=1), sin.view(n, count, r).mean(dim=1)  # [N, r]
    swap = torch.zeros(r, r, device=cos.device)
    swap[r // 2:, : r // 2] = torch.eye(r // 2, device=cos.device)
    swap[: r // 2, r // 2:] = -torch.eye(r // 2, device=cos.device)
    rotation = torch.eye(d, device=cos.device).repeat(n, 1, 1)
    rotation[:, :r, :r] = cos[:, :, None] * torch.eye(r, device=cos.device) + sin[:, :, None] * swap
    return rotation
