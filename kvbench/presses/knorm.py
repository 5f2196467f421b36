from dataclasses import dataclass

import torch

from kvbench.presses.base import Press, View, protect


@dataclass
class KNormPress(Press):
    """Keep the keys with the lowest L2 norm (they draw the most attention).

    Devoto et al.'s rule (``l2_compress`` in alessiodevoto/l2compress, ``cache.py``: keep the lowest-norm keys per
    layer and head) at a fixed budget, as kvpress runs it (``KnormPress``: ``topk`` of ``-keys.norm(dim=-1)``),
    with one deliberate difference: **each norm is rounded to 16 significant bits** (float32 norm, mantissa
    rounded to 2^-16 of its power of two, so a relative step of 2^-16 to 2^-15) before ranking, and tied
    entries go to the newest. So norms closer than that step tie, and of tied keys (a token repeated exactly,
    whose first-layer keys have the same norm since RoPE preserves norms; two norms within float noise) kvbench
    keeps the newest, where the plain rule keeps the strictly smaller norm or whichever tied entry ``topk``
    returns first. This makes the choice the same in every batch shape (float noise differs between them). On
    continuous keys it changes a kept set only when the norms at the budget's edge are that close
    (``tests/reference/test_knorm.py`` measures about 1 in 2,000 layer-head compressions on random keys).
    Devoto et al.'s experiments also left the first layers uncompressed (``skip_layers``); kvbench, like kvpress,
    compresses every layer.
    """

    name = "knorm"
    summary = "lowest key L2 norm (rounded to 16 significant bits; ties keep the newest)"
    source = "Devoto et al. 2024, arXiv 2406.11430"
    reference = "NVIDIA/kvpress@8bb29b9 kvpress/presses/knorm_press.py (KnormPress.score, ScorerPress.compress)"
    revision = 3  # norms rounded to 16 significant bits (2: to an absolute 2^-12, which tied small norms)

    #: First tokens always kept. 0 = no protection, as in Devoto et al., kvpress and the paper.
    n_sink: int = 0
    #: Most recent tokens always kept. 0 = no protection (the paper's variant).
    recent_window: int = 0

    def score(self, view: View) -> torch.Tensor:
        # RoPE preserves norms, so a repeated token's keys tie exactly in the first layer. Rounding to 16 significant
        # bits makes float noise (which differs between batch shapes) a tie too, and ties go to the newest entry;
        # a relative quantum keeps small norms, the ones kept, apart.
        mantissa, exponent = torch.frexp(view.keys.float().norm(dim=-1))
        norms = torch.ldexp(torch.round(mantissa * 2**16) / 2**16, exponent)
        return protect(-norms, view, n_sink=self.n_sink, recent=self.recent_window)
