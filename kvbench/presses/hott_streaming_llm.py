from dataclasses import dataclass

import torch

from kvbench.presses.base import Press, View
from kvbench.presses.source_order import COMPILE_REFUSAL, STATE, compress, fork_index, valid_lengths


@dataclass
class HottStreamingLLMPress(Press):
    """StreamingLLM as the paper's harness ran it: its rule on cache indices, over the order its ``topk`` leaves.

    Bug-compatible with the fork (``streaming_llm_press.py`` at 43d9e37). Its scores are by cache index: at the
    prefill ones with zeros on ``[n_sink, n_sink + pruned)``, while decoding ones on the first ``n_sink`` and the
    last ``budget - n_sink`` indices; it keeps ``topk(budget)`` and gathers in topk's output order. Every kept
    score is 1, so that order is topk's order for ties, which on the CPU is not ascending
    (``shared/reference/audit-evidence/topk_ties.py``): after the first compression "the last indices" are no
    longer the newest tokens, and a sink can be evicted. Here the same scores go through the same ``topk``, in
    the keys' dtype on the model's device, over each slot's index in the fork's cache. Whether CUDA's topk keeps
    tied indices in order is unverified; where it does, this press keeps what ``streaming_llm`` keeps.
    """

    name = "hott-streaming_llm"
    compile_refusal = COMPILE_REFUSAL
    summary = "the paper's harness's StreamingLLM: index rule over its topk-reordered cache (bug-compatible)"
    source = "the kvpress fork of arXiv 2512.12008 (streaming_llm_press.py @43d9e37)"
    reference = ("minghui-liu/kvpress@43d9e37 kvpress/presses/streaming_llm_press.py (StreamingLLMPress.score; "
                 "ScorerPress.compress_prefilling, compress_decoding)")
    state_names = (STATE,)

    #: Attention-sink entries the fork's rule keeps by index (4, as StreamingLLM).
    n_sink: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_sink < 0 or self.buffer != 1:
            raise ValueError(f"{self.name}: needs n_sink >= 0 and buffer 1 (the fork evicts every step)")

    def score(self, view: View) -> torch.Tensor:
        index, lengths = fork_index(view), valid_lengths(view)
        keep, _ = self.cadence(view.budget)
        length = torch.tensor(lengths, device=view.valid.device)[:, None, None]
        at = torch.arange(max(lengths), device=view.valid.device)[None, None, :]
        if view.step == 0:  # the prefill prunes the entries right after the sinks
            ones = ~((at >= self.n_sink) & (at < self.n_sink + length - keep))
        else:
            ones = (at < self.n_sink) | (at >= length - (keep - self.n_sink))
        return compress(self, view, index, lengths, ones.expand(*view.valid.shape[:2], -1))
