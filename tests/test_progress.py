"""Progress in logs: plain lines when stderr is not a terminal, nothing for a task with nothing to do."""

import io
import os
import subprocess
import sys

from kvbench.cli.progress import LogProgress, _Bar, progress_bar


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_log_lines_at_start_cadence_and_end():
    out, clock = io.StringIO(), Clock()
    with LogProgress(out, interval=30, clock=clock) as progress:
        task = progress.add_task("loading tiny", total=None)
        assert out.getvalue() == ""  # no total yet: nothing to count
        progress.update(task, total=4, description="generating")
        clock.now += 10
        progress.update(task, advance=1, description="generating h2o@24")  # within the interval: silent
        clock.now += 25
        progress.update(task, advance=1)
        clock.now += 5
        progress.update(task, advance=2)
    lines = out.getvalue().splitlines()
    assert lines == ["generating: 0/4 (0%)",
                     "generating h2o@24: 2/4 (50%), 0.06/s, elapsed 0:35, eta 0:35",
                     "generating h2o@24: 4/4 (100%), 0.10/s, elapsed 0:40, eta 0:00"]


def test_nothing_to_do_prints_nothing():
    out = io.StringIO()
    with LogProgress(out, interval=0) as progress:
        task = progress.add_task("sweep (3 runs)", total=0)
        progress.advance(task, 0)
        other = progress.add_task("loading", total=None)
        progress.update(other, total=0, description="generating")
    assert out.getvalue() == ""


def test_unfinished_task_reports_where_it_stopped():
    out, clock = io.StringIO(), Clock()
    with LogProgress(out, interval=30, clock=clock) as progress:
        task = progress.add_task("replaying", total=10)
        clock.now += 4
        progress.advance(task, 3)
    assert out.getvalue().splitlines()[-1] == "replaying: 3/10 (30%), 0.75/s, elapsed 0:04, eta 0:09"


def test_terminal_gets_a_bar_without_empty_tasks():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    bar = progress_bar(stream=Terminal())
    assert isinstance(bar, _Bar)
    empty = bar.add_task("sweep (0 runs)", total=0)
    loading = bar.add_task("loading", total=None)
    bar.update(loading, total=0)
    assert not bar.tasks[empty].visible and not bar.tasks[loading].visible
    assert isinstance(progress_bar(stream=io.StringIO()), LogProgress)


def test_redirected_run_logs_plain_progress(tmp_path):
    """`kvbench run` with stderr to a pipe: progress lines a log can show; rerun with everything stored: none."""
    store = tmp_path / "store"
    command = [sys.executable, "-m", "kvbench", "run", "--model", "tiny-llama", "-p", "h2o", "-b", "24", "-n", "2",
               "--max-new-tokens", "6", "--store", str(store)]
    env = {**os.environ, "KVBENCH_PROGRESS_SECONDS": "0"}
    first = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr
    lines = first.stderr.splitlines()
    assert lines[0] == "generating: 0/2 (0%)"
    assert lines[-1].startswith("generating h2o@24: 2/2 (100%)")  # with rate and eta once a second has passed
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and again.stderr == ""
