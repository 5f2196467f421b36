"""The one sync-and-time step every benchmark loop uses: device work is asynchronous, so a step is timed between
two synchronisations."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator


def timed_step(steps: Generator, sync: Callable[[], None]) -> tuple[float, bool, object]:
    """Advance ``steps`` by one, timed from a synchronised start to a synchronised end: (seconds, whether it
    finished, its return value if it did)."""
    sync()
    start = time.perf_counter()
    finished, value = False, None
    try:
        next(steps)
    except StopIteration as end:
        finished, value = True, end.value
    sync()
    return time.perf_counter() - start, finished, value
