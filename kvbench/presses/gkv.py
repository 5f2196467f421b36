from dataclasses import dataclass

import torch

from kvbench.presses.base import INF, Press, View, window_logits, window_mean
from kvbench.presses.rkv import position_index, redundancy

HISTORY = "history"


@dataclass
class GKVPress(Press):
    """G-KV: the window's attention smoothed with each entry's score at the last compression, minus redundancy.

    G-KV's ``ScoreBasedKV.update_kv`` with the configuration its ``scripts/inference.sh`` names G-KV
    (``--suppressing_redundancy --mix_lambda 0.5 --enable_score_cache --alpha 0.8``, ``smooth_method=max``,
    ``--window_size 16 --divide_length 128``). At a compression of a layer holding more than the budget:

    - attention: each of the ``window_size`` newest queries' softmax over the whole cache (causal, the window's own
      entries included), the maximum over the query heads of a GQA group, averaged over the window, on the entries
      before the window; divided by its maximum over them;
    - history: ``max(alpha × the entry's score at the last compression, attention)``; an entry that was not kept
      from before the window at the last compression (the window then, newer tokens) has none: its attention;
    - redundancy: R-KV's key cosine similarity (``cal_similarity_triton``: each key's mean similarity to the cache,
      its own term and each key's term from the last key similar to it zeroed, softmaxed over the cache), on the
      entries before the window, divided by its maximum over them;
    - score ``mix_lambda × history − (1 − mix_lambda) × redundancy``; the window and the best ``budget −
      window_size`` of the rest are kept, and the history of those kept entries stored.

    Schedule (``gen_patch.py``): the prefill compresses a prompt over the budget; then every ``buffer`` decoding
    forwards (``divide_length``, counted from the prefill) a cache over the budget is compressed.

    Differences from G-KV's code: scores in float32 (G-KV in the model's dtype, bf16 in its runs; its similarity
    adds in float32 per block), logits scaled by the model's attention scaling (G-KV: ``1/sqrt(head_dim)``, the
    same for Llama and Qwen), key norms offset by 1e-8 (its kernel: 1e-6); exact ties keep the newest entry (G-KV:
    whichever ``topk`` returns); exact copies of one key have equal similarity sums in exact arithmetic, which the
    two codes round differently (each adds in its own order), so the copy kept can differ. G-KV's batches share one
    schedule and count left padding toward the budget; kvbench schedules each sequence as G-KV's batch of one
    (``tests/reference/test_gkv.py``: identical kept sets at every compression otherwise). G-KV asserts ``budget >
    window_size``; here a budget within the window keeps the newest ``budget`` entries. G-KV's RL-trained
    checkpoints are not part of the rule: this is its eviction rule on whatever model is given.
    """

    name = "gkv"
    summary = "window attention smoothed with its history (max(α·old, new)) minus redundancy; every 128 steps"
    source = "Liao et al. 2025, arXiv 2512.00504 (G-KV)"
    reference = "microsoft/G-KV@6db3b2e gkv/model/compression/score_based.py (ScoreBasedKV.update_kv)"
    state_names = (HISTORY,)
    reads_whole_window = False

    #: Decoding forwards between two compressions (G-KV's ``divide_length``, 128).
    buffer: int = 128
    #: Newest queries scoring the cache, and newest entries kept (16 in G-KV's inference script; 64 its CLI default).
    window_size: int = 16
    #: Weight of the smoothed attention against redundancy (G-KV: 0.5).
    mix_lambda: float = 0.5
    #: Decay of an entry's score from the last compression (G-KV: 0.8); 0 = no history.
    alpha: float = 0.8
    #: Cosine similarity above which two keys count as copies (G-KV's kernel: 0.5).
    threshold: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window_size < 1:
            raise ValueError(f"gkv: window_size must be >= 1, got {self.window_size}")
        if not (0.0 <= self.mix_lambda <= 1.0 and 0.0 <= self.alpha <= 1.0 and -1.0 <= self.threshold <= 1.0):
            raise ValueError(f"gkv: mix_lambda and alpha must be in [0, 1] and threshold in [-1, 1], got "
                             f"{self.mix_lambda}, {self.alpha}, {self.threshold}")

    @property
    def query_window(self) -> int:
        return self.window_size

    def row_cadence(self, budget: int, prompt_length: int, compressions: int) -> tuple[int, int]:
        """A prompt over the budget at the prefill; otherwise at the first multiple of ``buffer`` decoding forwards
        where the cache holds more than the budget; then every ``buffer``."""
        if compressions > 0:
            return budget, budget + self.buffer
        if prompt_length > budget:
            return budget, prompt_length
        return budget, prompt_length + ((budget - prompt_length) // self.buffer + 1) * self.buffer

    def score(self, view: View) -> torch.Tensor:
        recent = view.positions > view.query_position[:, None, None] - self.window_size
        prefix = view.valid & ~recent
        smoothed = self._history(view, _normalised(self._attention(view), prefix))
        similarity = _normalised(redundancy(view, position_index(view), self.threshold, exempt_first=False), prefix)
        if view.compress_to is not None:  # store the history of the rows this compression changes
            held = view.valid[:, 0].sum(dim=-1)
            compressing = (held > torch.as_tensor(view.compress_to, device=held.device))[:, None, None]
            stored = view.state[HISTORY]
            stored.copy_(torch.where(compressing, smoothed.masked_fill(~prefix, 0.0), stored))
        scores = self.mix_lambda * smoothed - (1 - self.mix_lambda) * similarity
        return scores.masked_fill(view.valid & recent, INF)

    def _attention(self, view: View) -> torch.Tensor:
        """[N, H, S]: the window queries' causal softmax over the cache, the group's maximum, the window's mean."""
        window = view.window
        seen = view.valid[:, :, None, None, :] & (view.positions[:, :, None, None, :]
                                                   <= window.positions[:, None, None, :, None])
        probs = torch.softmax(window_logits(view).masked_fill(~seen, -torch.inf), dim=-1).nan_to_num(0.0)
        return window_mean(probs.amax(dim=2), window)

    def _history(self, view: View, attention: torch.Tensor) -> torch.Tensor:
        if self.alpha <= 0:
            return attention
        return torch.maximum(self.alpha * view.state[HISTORY], attention)


def _normalised(scores: torch.Tensor, among: torch.Tensor) -> torch.Tensor:
    """``scores`` on the slots ``among`` divided by their maximum there (G-KV's ``div_(max)``); 0 elsewhere."""
    scores = scores.masked_fill(~among, 0.0)
    return scores / scores.amax(dim=-1, keepdim=True).where(among.any(dim=-1, keepdim=True), 1.0)
