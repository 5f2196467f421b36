from dataclasses import dataclass

import torch

from kvbench.presses.base import Press, View
from kvbench.presses.source_order import COMPILE_REFUSAL, STATE, compress, fork_index, to_fork_order, valid_lengths


@dataclass
class HottKNormPress(Press):
    """KNorm as the paper's harness ran it: ``topk(budget)`` of ``-keys.norm(dim=-1)`` over the fork's cache order.

    The fork's ``KnormPress`` (``knorm_press.py`` at 43d9e37, with ``scorer_press.py``'s compressions): the score
    is the negated L2 norm of each cached key, computed in the keys' own dtype (bfloat16 on the paper's models,
    where many norms tie); no sinks, no recent window, every layer. The prompt is cut to ``budget`` at the prefill
    when it is longer, then every decoding step that leaves a layer holding ``budget + 1`` keeps
    ``topk(budget)``, and the cache is gathered in topk's order (smallest norm first, ties in topk's own order),
    new tokens appended at the end. Here the same scores go through the same ``topk`` on scores laid out in that
    order (``source_order``), so exact ties fall as the fork's topk broke them on this device.

    kvbench's ``knorm`` is another rule for the same idea: norms in float32 rounded to 16 significant bits (so
    nearby norms tie) and ties broken newest first. The price of the fork's exact norms: this press is not
    batch-invariant. Keys differ by float noise between batch shapes (a projection of 1 row or of 7), so where two
    norms at the budget's edge are within a few float steps of each other, a sequence run alone and the same
    sequence in a continuous batch can keep different tokens (the fork's rule, run at other batch shapes, would
    too). So runs decode it one sequence at a time, as the fork did (``batch_invariant = False``: rows record
    ``batch_size`` 1 whatever ``--batch-size`` says).
    """

    name = "hott-knorm"
    compile_refusal = COMPILE_REFUSAL
    summary = "the paper's harness's KNorm: topk of -||k|| in the keys' dtype, over its topk-ordered cache"
    source = "the kvpress fork of arXiv 2512.12008 (knorm_press.py @43d9e37)"
    reference = ("minghui-liu/kvpress@43d9e37 kvpress/presses/knorm_press.py (KnormPress.score; "
                 "ScorerPress.compress_prefilling, compress_decoding)")
    state_names = (STATE,)
    batch_invariant = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.buffer != 1:
            raise ValueError(f"{self.name}: needs buffer 1 (the fork compresses every decoding step)")

    def score(self, view: View) -> torch.Tensor:
        index, lengths = fork_index(view), valid_lengths(view)
        scores = -view.keys.norm(dim=-1)  # in the keys' dtype, as the fork scores its cache
        return compress(self, view, index, lengths, to_fork_order(scores, index, view.valid, max(lengths)))
