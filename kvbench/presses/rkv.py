from dataclasses import dataclass

import torch

from kvbench.presses.base import Press, pool_by_position, protect, recent_positions, window_softmax


@dataclass
class RKVPress(Press):
    """R-KV: importance (attention of recent queries) minus redundancy (key cosine similarity), buffered.

    score = mix_lambda * importance - (1 - mix_lambda) * redundancy; higher = keep, so the *least*
    redundant keys survive (the paper's harness had the sign reversed). Importance follows R-KV's code: each
    window query's logits, the maximum over its GQA group, softmaxed over the keys before the window, averaged
    over the window and max-pooled along the sequence. For each key, the most recent of the keys very similar
    to it (cosine > ``threshold``) does not count against it, so the latest copy of a repeated pattern is kept;
    R-KV's code also zeroes column 0 for a key with no similar key, which this press does not.
    """

    name = "rkv"
    summary = "importance - redundancy (key cosine similarity), buffered"
    source = "Cai et al. 2025, arXiv 2505.24133"
    revision = 2  # importance from group-max logits softmaxed over the pre-window keys (1: max of probabilities)
    #: Importance is computed from the window's queries here, not from ``view.attention``.
    reads_whole_window = False

    #: Compress every 128 new tokens (R-KV's buffer).
    buffer: int = 128
    #: Recent queries scoring importance, and recent tokens protected (8 in R-KV's code).
    window_size: int = 8
    #: Max-pooling kernel over token order (7 in R-KV's code).
    kernel_size: int = 7
    #: Weight of importance against redundancy (lambda = 0.1 in the R-KV paper).
    mix_lambda: float = 0.1
    #: Cosine similarity above which two keys count as copies (0.5 in R-KV's code).
    threshold: float = 0.5
    #: How the query heads of a GQA group are combined (R-KV's code takes the max).
    gqa: str = "max"

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
        if self.gqa not in ("mean", "max"):
            raise ValueError(f"rkv: gqa must be 'mean' or 'max', got {self.gqa!r}")

    def score(self, view) -> torch.Tensor:
        prefix = view.valid & ~recent_positions(view, self.window_size)
        importance = pool_by_position(window_softmax(view, prefix, self.gqa), view, self.kernel_size, "max",
                                      among=prefix)
        return protect(
            self.mix_lambda * importance - (1 - self.mix_lambda) * redundancy(view, self.threshold),
            view, recent=self.window_size,
        )


def redundancy(view, threshold: float) -> torch.Tensor:
    """Mean cosine similarity of each key to the other valid keys, softmax-normalised over the slots."""
    keys = view.keys.float()
    unit = keys / (keys.norm(dim=-1, keepdim=True) + 1e-8)
    sim = unit @ unit.transpose(-1, -2)  # [B, H, S, S]: row i, column j
    pair_valid = view.valid[..., :, None] & view.valid[..., None, :]
    s = sim.shape[-1]
    pair_valid &= ~torch.eye(s, dtype=torch.bool, device=sim.device)
    sim = sim.masked_fill(~pair_valid, 0.0)
    # For each key i, its most recent similar key j keeps sim[i, j] = 0: the latest copy is not penalised.
    similar_pos = torch.where(sim > threshold, view.positions[..., None, :], -1)
    latest = similar_pos.argmax(dim=-1, keepdim=True)
    has_similar = similar_pos.amax(dim=-1, keepdim=True) >= 0
    sim = sim.scatter(-1, latest, torch.where(has_similar, 0.0, sim.gather(-1, latest)))
    n_valid = view.valid.sum(dim=-1, keepdim=True).clamp(min=1)
    mean_sim = sim.sum(dim=-2) / n_valid
    return torch.softmax(mean_sim.masked_fill(~view.valid, -torch.inf), dim=-1).nan_to_num(0.0)
