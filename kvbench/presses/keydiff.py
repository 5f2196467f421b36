from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.presses.base import View
from kvbench.presses.decoding_schedule import DecodingPressSchedule


@dataclass
class KeyDiffPress(DecodingPressSchedule):
    """Keep the keys least similar to the mean key direction: query-free, every ``buffer`` decoding steps.

    KeyDiff's score as kvpress computes it (``KeyDiffPress.score``): the anchor is the mean of the cached keys
    normalised to unit length, per layer and KV head, and a key's score is minus its cosine similarity to the
    anchor, so the most distinctive keys are kept. Its schedule is kvpress's ``DecodingPress`` (its decoding-time
    wrapper): nothing is evicted at the prefill; every ``compression_interval`` decoding forwards
    (kvbench's ``buffer``, 512 by default as there), counted from the first, a cache holding more than the target
    (kvbench's budget) keeps the target's ``topk`` of the scores, over the whole cache, the prompt included; a
    cache holding no more is left as it is. So a sequence compresses first at the first multiple of the interval
    where it holds more than the budget, then every interval.

    Identical kept sets to kvpress's rule at every forward whenever the prompt has at most ``budget + buffer``
    tokens (``tests/reference/test_keydiff.py``). Named differences: a longer prompt is cut to the budget at the
    prefill by the same score (the cache holds at most ``budget + 2 × buffer`` entries; kvpress holds the prompt
    whole until its first interval, then chooses from prompt + interval entries); exact ties go to the newest entry
    (kvpress keeps what CPU ``topk`` returns); at budget 1, kvpress's ``q_len >= target_size`` clause compresses at
    every decoding forward, kvbench every ``buffer``. Scores are float32 (kvpress scores in the model's dtype, bf16
    on the paper's models), the anchor's mean over each row's valid slots in kvbench's slot order. KeyDiff's paper
    compresses block by block during the prefill (kvpress: ``BlockPress``); that is not what runs here.
    """

    name = "keydiff"
    summary = "keys least similar to the mean key direction (cosine), query-free; every interval"
    source = "Park et al. 2025, arXiv 2504.15364 (KeyDiff)"
    reference = ("NVIDIA/kvpress@8bb29b9 kvpress/presses/keydiff_press.py (KeyDiffPress.score) under "
                 "kvpress/presses/decoding_press.py (DecodingPress.forward_hook) and scorer_press.py (compress)")

    def score(self, view: View) -> torch.Tensor:
        keys = view.keys.float()
        valid = view.valid[..., None]
        held = valid.sum(dim=2, keepdim=True).clamp(min=1)
        anchor = (F.normalize(keys, p=2, dim=-1) * valid).sum(dim=2, keepdim=True) / held  # [N, H, 1, D]
        return -F.cosine_similarity(keys, anchor, dim=-1)
