"""math-verify, run in a separate worker process: it times out with signals, which only work in a main thread.

The worker is ``python -m kvbench.tasks.mathverify`` speaking JSON lines over pipes, so it does not depend on
how the caller was started (a process pool would re-import the caller's ``__main__``). A worker that hangs
past the timeout is killed and replaced.
"""

from __future__ import annotations

import atexit
import json
import queue
import subprocess
import sys
import threading

_TIMEOUT_S = 30


class _Worker:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvbench.tasks.mathverify"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, bufsize=1,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")  # EOF: the worker died

    def ask(self, gold: str, answer: str) -> bool | None:
        """True/False, or None if the worker died or timed out."""
        try:
            self.proc.stdin.write(json.dumps({"gold": gold, "answer": answer}) + "\n")
            self.proc.stdin.flush()
            line = self.lines.get(timeout=_TIMEOUT_S)
        except (OSError, queue.Empty):
            return None
        return json.loads(line)["equal"] if line else None

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


_worker: _Worker | None = None
_lock = threading.Lock()


def _close() -> None:
    global _worker
    if _worker is not None:
        _worker.close()
        _worker = None


def math_equal(gold: str, answer: str) -> bool:
    """math-verify equivalence of two LaTeX answers; False on timeout or parser failure."""
    global _worker
    with _lock:
        if _worker is None:
            _worker = _Worker()
            atexit.register(_close)
        result = _worker.ask(gold, answer)
        if result is None:  # hung or crashed on this input: replace the worker, count it as not verified
            _close()
        return bool(result)


_STRIP = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "$", " ", "\\displaystyle", "^\\circ", "^{\\circ}")


def strict_string(text: str) -> str:
    """A conservative normal form for the secondary strict match: spacing and sizing commands removed."""
    out = text
    for s in _STRIP:
        out = out.replace(s, "")
    out = out.replace("dfrac", "frac").replace("tfrac", "frac").replace("\\text{", "{")
    return out.rstrip(".")


def _serve() -> None:
    from math_verify import parse, verify

    for line in sys.stdin:
        request = json.loads(line)
        try:
            gold = parse(f"${request['gold']}$")
            answer = parse(f"$\\boxed{{{request['answer']}}}$")
            equal = bool(gold) and bool(answer) and bool(verify(gold, answer))
        except Exception:  # noqa: BLE001 - a parser failure on odd LaTeX means "not verified"
            equal = False
        sys.stdout.write(json.dumps({"equal": equal}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
