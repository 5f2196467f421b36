"""kvpress's ``DecodingPress`` schedule (its decoding-time wrapper), shared by the presses transcribed under it."""

from dataclasses import dataclass

from kvbench.errors import KvbenchError
from kvbench.presses.base import Press


@dataclass
class DecodingPressSchedule(Press):
    """Nothing evicted at the prefill; every ``buffer`` decoding forwards (kvpress's ``compression_interval``),
    counted from the first, a cache holding more than the budget (its ``target_size``) keeps the budget's best,
    the prompt included. A prompt over ``budget + buffer`` is cut to the budget at the prefill (kvpress holds it
    whole until its first interval): the cache holds at most ``budget + 2 × buffer`` entries."""

    #: Decoding forwards between two compressions: DecodingPress's ``compression_interval`` (512 there).
    buffer: int = 512

    def cadence(self, budget: int) -> tuple[int, int]:
        if budget < 1:
            raise KvbenchError(f"{self.name}: budget must be >= 1, got {budget}")
        return budget, budget + self.buffer

    def row_cadence(self, budget: int, prompt_length: int, compressions: int) -> tuple[int, int]:
        """The first compression at the first multiple of the interval where the cache holds more than the budget
        (the prompt and that many tokens), then every interval."""
        if compressions > 0:
            return budget, budget + self.buffer
        intervals = max(1, (budget - prompt_length) // self.buffer + 1)
        first = prompt_length + intervals * self.buffer
        if first > self.capacity(budget, 1, 1):  # a prompt over budget + buffer: cut to the budget at the prefill
            return budget, prompt_length
        return budget, first

    def capacity(self, budget: int, n_layers: int, n_heads: int) -> int:
        return budget + 2 * self.buffer  # a prompt up to budget + buffer waits for its first interval
