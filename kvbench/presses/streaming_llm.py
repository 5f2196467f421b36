from dataclasses import dataclass

import torch

from kvbench.presses.base import Press, View, protect


@dataclass
class StreamingLLMPress(Press):
    """Keep the first ``n_sink`` tokens (attention sinks) and the most recent ones.

    StreamingLLM's ``StartRecentKVCache`` with ``start_size + recent_size = budget``, evicting after each forward as
    its ``eval_long_ppl.py`` does: identical kept sets (``tests/reference/test_streaming_llm.py``). Not done:
    StreamingLLM re-rotates cached keys to their positions in the cache (``pos_shift``); here every key keeps
    its original position, as in kvpress and the paper's harness.
    """

    name = "streaming_llm"
    summary = "attention sinks + most recent tokens"
    source = "Xiao et al. 2023, arXiv 2309.17453"
    reference = "mit-han-lab/streaming-llm@2e50426 streaming_llm/kv_cache.py (StartRecentKVCache.__call__)"

    #: Attention-sink tokens always kept (4 in Xiao et al.).
    n_sink: int = 4

    def score(self, view: View) -> torch.Tensor:
        return protect(view.positions.float(), view, n_sink=self.n_sink)
