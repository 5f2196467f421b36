"""The progress display shared by long-running commands: a rich bar on a terminal, plain lines in a log.

Redirected to a file (a SLURM log, ``nohup``, CI) a live bar writes nothing readable, so there each task prints a
line ``description: done/total (percent), rate, eta`` when it starts, at most every ``KVBENCH_PROGRESS_SECONDS``
(30) seconds as it advances, and when it completes. A task with nothing to do (total 0) shows nothing either way.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

INTERVAL_VARIABLE = "KVBENCH_PROGRESS_SECONDS"


def progress_bar(transient: bool = False, stream=None):
    """A rich bar on stderr when it is a terminal, else ``LogProgress`` lines; both hide tasks with nothing to do."""
    stream = stream if stream is not None else sys.stderr
    if not stream.isatty():
        return LogProgress(stream)
    return _Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn(), console=Console(file=stream), transient=transient)


class _Bar(Progress):
    """rich's Progress, with a task whose total is 0 hidden (no empty ``0/0`` bar when everything is stored)."""

    def add_task(self, description, start=True, total=100.0, completed=0, visible=True, **fields) -> TaskID:
        return super().add_task(description, start, total, completed, visible and total != 0, **fields)

    def update(self, task_id, *, total=None, visible=None, **kwargs) -> None:
        if total == 0:
            visible = False
        super().update(task_id, total=total, visible=visible, **kwargs)


@dataclass
class _Task:
    description: str
    total: float | None
    started: float
    completed: float = 0.0
    printed: float | None = None
    finished: bool = False
    fields: dict = field(default_factory=dict)


class LogProgress:
    """The subset of rich's Progress that kvbench's commands use, printing plain lines (see the module's doc)."""

    def __init__(self, stream, interval: float | None = None, clock=time.monotonic) -> None:
        self.stream, self.clock = stream, clock
        self.interval = float(os.environ.get(INTERVAL_VARIABLE, 30)) if interval is None else interval
        self.tasks: dict[int, _Task] = {}

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        for task in self.tasks.values():
            if task.printed is not None and not task.finished:
                self._print(task)

    def add_task(self, description: str, total: float | None = None, **_) -> int:
        task_id = len(self.tasks)
        self.tasks[task_id] = _Task(description, total, self.clock())
        self._report(self.tasks[task_id])
        return task_id

    def update(self, task_id: int, *, total=None, completed=None, advance=None, description=None, **_) -> None:
        task = self.tasks[task_id]
        if total is not None and total != task.total:
            task.total, task.started = total, self.clock()
        if description is not None:
            task.description = description
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        self._report(task)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def remove_task(self, task_id: int) -> None:
        self.tasks.pop(task_id, None)

    def _report(self, task: _Task) -> None:
        if not task.total or task.finished:  # nothing to do, or no total yet (loading)
            return
        if task.completed >= task.total:
            task.finished = True
            self._print(task)
        elif task.printed is None or self.clock() - task.printed >= self.interval:
            self._print(task)

    def _print(self, task: _Task) -> None:
        now = self.clock()
        task.printed = now
        elapsed = max(now - task.started, 1e-9)
        rate = task.completed / elapsed
        share = 100 * task.completed / task.total
        line = f"{task.description.strip()}: {task.completed:g}/{task.total:g} ({share:.0f}%)"
        if task.completed and elapsed >= 1.0:  # a rate over less than a second says nothing yet
            eta = (task.total - task.completed) / rate if rate > 0 else 0.0
            line += f", {rate:.2f}/s, elapsed {_clock(elapsed)}, eta {_clock(eta)}"
        print(line, file=self.stream, flush=True)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
