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


@dataclass(frozen=True)
class RepetitionStop:
    """The paper's harness's stopping rule (its ``StopOnRepetition``, as ``reason/evaluate.py`` configures it).

    Among the last ``window`` generated tokens, some ``n``-gram (``ngram_min <= n <= ngram_max``) appears
    ``min_repeat`` times back to back. Checked after every token, a repetition appears first at the newest
    token (the window only drops tokens), so checking the repetitions that end there is the same rule.
    """

    ngram_min: int = 2
    ngram_max: int = 10
    min_repeat: int = 5
    window: int = 200

    def hit(self, tokens: list[int]) -> bool:
        if len(tokens) < self.ngram_min * self.min_repeat:
            return False
        tail = tokens[-self.window:]
        for n in range(self.ngram_min, self.ngram_max + 1):
            span = n * self.min_repeat
            if span > len(tail):
                break
            block = tail[-span:]
            if all(block[i] == block[i - n] for i in range(n, span)):
                return True
        return False
