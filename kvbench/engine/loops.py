"""Degenerate repetition: the recent tokens are one short pattern repeated back to back.

Aggressive eviction can make a model loop (the paper's "thinks forever"); this measures it. A tail of
``span`` tokens that is ``repeats`` consecutive copies of a period of at most ``max_period`` tokens, with
``repeats >= min_repeats`` and ``span >= min_tokens``, is a loop.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoopDetector:
    #: Longest repeated pattern looked for, in tokens (a repeated sentence or line).
    max_period: int = 64
    #: Copies of the pattern needed back to back.
    min_repeats: int = 4
    #: Tokens the repetition must cover (so "no no no no" is not a loop, 32 copies of a token are).
    min_tokens: int = 32

    def period(self, tokens: list[int]) -> int | None:
        """The shortest period whose repetition at the end of ``tokens`` counts as a loop, else None."""
        n = len(tokens)
        for p in range(1, min(self.max_period, n // self.min_repeats) + 1):
            needed = max(self.min_repeats * p, self.min_tokens)
            if needed > n:
                continue
            tail = tokens[n - needed:]
            if all(tail[i] == tail[i - p] for i in range(p, needed)):
                return p
        return None

    def looped(self, tokens: list[int]) -> bool:
        return self.period(tokens) is not None
