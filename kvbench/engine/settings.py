"""What a generation is asked to do (``GenerationSettings``) and the prompts it starts from (``PaddedBatch``): the
types the decode loop, sampling and ``generate`` share."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.engine.loops import LoopDetector, RepetitionStop


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 512
    #: 0 = greedy.
    temperature: float = 0.0
    top_p: float = 1.0
    #: Keep the k most likely tokens before top-p (0 = all), as transformers' ``top_k``.
    top_k: int = 0
    #: transformers' repetition penalty: logits of tokens already in the sequence (prompt included) divided by it
    #: when positive, multiplied when negative (1 = none). Applied to each row's own tokens only.
    repetition_penalty: float = 1.0
    seed: int = 0
    eos_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    #: End a sequence with finish_reason "loop" once it repeats itself (see ``LoopDetector``).
    stop_on_loop: bool = False
    loop_detector: LoopDetector = LoopDetector()
    #: End a sequence with finish_reason "repetition" at this rule (the paper's harness's ``StopOnRepetition``).
    repetition_stop: RepetitionStop | None = None


@dataclass
class PaddedBatch:
    """Left-padded prompts: ids, valid and positions [B, width] on the device (padding is never a valid slot)."""

    ids: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor
    lengths: list[int]
    pad_token_id: int
