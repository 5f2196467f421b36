from dataclasses import dataclass

import torch

from kvbench.presses.base import Press, protect


@dataclass
class KNormPress(Press):
    """Keep the keys with the lowest L2 norm (they draw the most attention)."""

    name = "knorm"
    summary = "lowest key L2 norm"
    source = "Devoto et al. 2024, arXiv 2406.11430"
    revision = 3  # norms rounded to 16 significant bits (2: to an absolute 2^-12, which tied small norms)

    #: First tokens always kept. 0 = no protection, as in Devoto et al., kvpress and the paper.
    n_sink: int = 0
    #: Most recent tokens always kept. 0 = no protection (the paper's variant).
    recent_window: int = 0

    def score(self, view) -> torch.Tensor:
        # RoPE preserves norms, so a repeated token's keys tie exactly in the first layer. Rounding to 16 significant
        # bits makes float noise (which differs between batch shapes) a tie too, and ties go to the newest entry;
        # a relative quantum keeps small norms, the ones kept, apart.
        mantissa, exponent = torch.frexp(view.keys.float().norm(dim=-1))
        norms = torch.ldexp(torch.round(mantissa * 2**16) / 2**16, exponent)
        return protect(-norms, view, n_sink=self.n_sink, recent=self.recent_window)
