"""How full each sequence of a ``BudgetCache`` is, kept on the host so that deciding when to evict costs no
device synchronisation."""

from __future__ import annotations

#: What ``Occupancy`` keeps per sequence.
_PER_ROW = ("held", "layer_held", "head_most", "peak", "evicted", "row_keep", "row_trigger", "layer_keep",
            "compressions", "prompt_held", "high", "fed")


class Occupancy:
    """Entries per KV head (one entry = one token's key and value) of each sequence.

    ``held[row]`` is what a sequence holds, the same in every layer: what triggers a compression. Under a press
    that allocates (PyramidKV, AdaKV) it is what a uniform press would hold; then ``layer_held`` is the exact
    mean held per KV head in each layer (what is reported) and ``head_most`` an upper bound on any one head's.
    ``row_keep`` / ``row_trigger`` are each sequence's next (entries a compression keeps, entries that start
    one), from ``press.row_cadence``; ``peak`` and ``evicted`` are summed over layers.
    """

    def __init__(self, batch: int, num_layers: int, allocates: bool):
        self.num_layers, self.allocates = num_layers, allocates
        self.held = [0] * batch
        self.layer_held = [[0] * num_layers for _ in range(batch)] if allocates else None
        self.head_most = [[0] * num_layers for _ in range(batch)] if allocates else None
        self.peak = [0] * batch
        self.evicted = [0] * batch
        self.row_keep: list[int | None] = []
        self.row_trigger: list[int | None] = []
        #: What each layer keeps at the sequence's next compression, where the press staggers its layers (None:
        #: the cache's ``layer_keep``).
        self.layer_keep: list[tuple[int, ...] | None] = []
        self.compressions = [0] * batch
        self.prompt_held: list[int] = []  # set by the prefill
        #: The most entries one head of each sequence has held: its valid slots all lie below it.
        self.high = [0] * batch
        #: Whether each sequence took a token in the last forward: one that did not (finished, frozen in its
        #: batch) never compresses, even where it holds its trigger's count (a press whose full heads keep all).
        self.fed = [False] * batch

    def add(self, valid_counts: list[int], capacity: int) -> None:
        """A forward's valid tokens per sequence: written, so held (until a compression)."""
        self.fed = [n > 0 for n in valid_counts]
        for i, n in enumerate(valid_counts):
            self.held[i] += n
            if not self.allocates:
                self.peak[i] = max(self.peak[i], min(self.held[i], capacity) * self.num_layers)
                self.high[i] = max(self.high[i], min(self.held[i], capacity))
            elif n:
                self.layer_held[i] = [c + n for c in self.layer_held[i]]
                self.head_most[i] = [min(c + n, capacity) for c in self.head_most[i]]
                self.peak[i] = max(self.peak[i], sum(min(c, capacity) for c in self.layer_held[i]))
                self.high[i] = max(self.high[i], *self.head_most[i])

    def most_held(self) -> int:
        """The most entries one head of one layer may hold (where the next write may land)."""
        return max(max(bound) for bound in self.head_most) if self.allocates else max(self.held)

    def at_trigger(self) -> tuple[bool, ...]:
        return tuple(t is not None and c >= t and fed for c, t, fed in zip(self.held, self.row_trigger, self.fed))

    def compressed(self, row: int, keep: int, layer_keep: list[int] | None, head_capacity: list[int] | None) -> None:
        """Sequence ``row`` after a compression that keeps ``keep`` (each layer its share, under allocation)."""
        if self.allocates:
            before = self.layer_held[row]
            after = [min(c, b) for c, b in zip(before, layer_keep)]
            self.head_most[row] = [min(bound, cap) for bound, cap in zip(self.head_most[row], head_capacity)]
            self.evicted[row] += sum(before) - sum(after)
            self.layer_held[row] = after
        else:
            self.evicted[row] += (self.held[row] - keep) * self.num_layers
        self.held[row] = keep
        self.compressions[row] += 1

    def counted(self, row: int, held: int, layer_held: list[float], head_most: list[int]) -> None:
        """Sequence ``row`` after a compression whose counts were read from the device (a press that keeps
        fewer): the most one head holds, and per layer the mean and the most per KV head."""
        before = sum(self.layer_held[row]) if self.allocates else self.held[row] * self.num_layers
        if self.allocates:
            self.layer_held[row], self.head_most[row] = list(layer_held), list(head_most)
        self.evicted[row] += before - (sum(layer_held) if self.allocates else held * self.num_layers)
        self.held[row] = held
        self.compressions[row] += 1

    def set_schedule(self, row: int, keep: int | None, trigger: int | None,
                     layer_keep: list[int] | None = None) -> None:
        own = None if layer_keep is None else tuple(layer_keep)
        if row == len(self.row_keep):
            self.row_keep.append(keep)
            self.row_trigger.append(trigger)
            self.layer_keep.append(own)
        else:
            self.row_keep[row], self.row_trigger[row], self.layer_keep[row] = keep, trigger, own

    def entries(self, row: int) -> float:
        """Valid entries per KV head held by sequence ``row``, averaged over layers."""
        return sum(self.layer_held[row]) / self.num_layers if self.allocates else self.held[row]

    def keep_rows(self, rows: list[int]) -> None:
        """Only sequences ``rows`` stay, in that order."""
        for name in _PER_ROW:
            values = getattr(self, name)
            if values is not None:
                setattr(self, name, [values[i] for i in rows])

    def splice(self, row: int, other: Occupancy) -> None:
        """Row ``row`` takes the counts of ``other``'s one sequence (continuous batching)."""
        batch = len(self.held)
        for name in ("row_keep", "row_trigger", "layer_keep", "prompt_held"):
            if not getattr(self, name):  # no prefill in this cache: every row comes spliced
                setattr(self, name, [None if name != "prompt_held" else 0] * batch)
        for name in _PER_ROW:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is not None:
                mine[row] = list(theirs[0]) if isinstance(theirs[0], list) else theirs[0]
