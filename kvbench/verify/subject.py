"""What a check runs on: a tiny model, its prompt, and a way to build the press under test; and what a check
returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvbench.errors import KvbenchError
from kvbench.presses.base import Press

PROMPT = "Tom has 12 apples. He buys 7 more and gives 5 to Ann. How many apples does Tom have now?"
#: The longest run a check makes: a press whose buffer or window needs more is checked with smaller ones (-a).
MAX_NEW_TOKENS = 600


@dataclass(frozen=True)
class Outcome:
    """One check on one architecture: ``status`` pass, fail or n/a; ``worst`` the largest deviation measured (in
    the check's unit); ``where`` the first failure (step, layer, head) or why the check does not apply."""

    check: str
    status: str
    worst: str = ""
    where: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "fail"


@dataclass
class Subject:
    """A tiny model and tokenizer, and ``make`` building a fresh press (with the user's parameters) per call."""

    model: object
    tokenizer: object
    make: Callable[[], Press]

    def __post_init__(self) -> None:
        make, tokenizer = self.make, self.tokenizer
        self.make = lambda: make().for_tokenizer(tokenizer)  # what a press reads of the tokenizer, resolved

    def prompt(self, length: int) -> list[int]:
        ids = self.tokenizer(PROMPT)["input_ids"]
        return (ids * (length // len(ids) + 1))[:length]

    @property
    def shape(self) -> tuple[int, int]:
        """(layers, KV heads)."""
        config = self.model.config
        return config.num_hidden_layers, config.num_key_value_heads


class NotApplicable(KvbenchError):
    """The check does not apply to this press (the message says why)."""


def decode_length(press: Press, budget: int, prompt_length: int, floor: int) -> int:
    """New tokens for a run that compresses at least twice at ``budget`` (a prompt above the trigger is compressed
    at the prefill), at least ``floor``."""
    if press.selects:  # nothing is compressed: every step attends a selection
        return floor
    keep, trigger = press.cadence(budget)
    first = trigger - prompt_length if prompt_length < trigger else trigger - keep
    n = max(floor, first + (trigger - keep) + 4)
    if getattr(press, "grows", False):  # RPC: the budget is its period; it compresses after period + window
        n = max(n, budget + getattr(press, "window_size", 0) + 12)
    if n > MAX_NEW_TOKENS:
        raise NotApplicable(f"needs {n} tokens to compress twice at budget {budget}: give a smaller buffer or "
                            "window with -a")
    return n


def where(step: int, layer: int | None = None, head: int | None = None, row: int | None = None) -> str:
    """The first place a check failed, as the CLI prints it."""
    parts = [f"step {step}"]
    if row is not None:
        parts.append(f"sequence {row}")
    if layer is not None:
        parts.append(f"layer {layer}")
    if head is not None:
        parts.append(f"KV head {head}")
    return ", ".join(parts)


def first_kept_difference(a: list, b: list) -> tuple[int, int, int] | None:
    """(step, layer, head) where two runs' kept sets (per step, per layer, per head) first differ."""
    for step, (x, y) in enumerate(zip(a, b)):
        for layer, (xl, yl) in enumerate(zip(x, y)):
            for head, (xh, yh) in enumerate(zip(xl, yl)):
                if xh != yh:
                    return step, layer, head
    return None
