from dataclasses import dataclass

import torch

from kvbench.presses.base import Press, protect


@dataclass
class StreamingLLMPress(Press):
    """Keep the first ``n_sink`` tokens (attention sinks) and the most recent ones."""

    name = "streaming_llm"
    summary = "attention sinks + most recent tokens"
    source = "Xiao et al. 2023, arXiv 2309.17453"

    #: Attention-sink tokens always kept (4 in Xiao et al.).
    n_sink: int = 4

    def score(self, view) -> torch.Tensor:
        return protect(view.positions.float(), view, n_sink=self.n_sink)
