"""Threads in blocking tests: a call run in a thread of its own, and bounded
polling from plain threads, never fixed sleeps."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

#: Longest any of these waits, in seconds, unless told otherwise.
FINISH = 30.0
#: How often a condition is looked at again, in seconds.
_POLL = 0.002


class InThread:
    """Run *work* in a thread of its own; :meth:`result` joins it and returns
    what *work* returned, or raises what it raised."""

    def __init__(self, work: Callable[[], Any]) -> None:
        self._outcome: list[Any] = []
        self._error: list[BaseException] = []

        def run() -> None:
            try:
                self._outcome.append(work())
            except BaseException as exc:  # handed to the test's thread
                self._error.append(exc)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self, timeout: float = FINISH) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the thread is still blocked"
        if self._error:
            raise self._error[0]
        return self._outcome[0]


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = FINISH) -> None:
    """Poll *predicate* until it holds; fail naming *what* after *timeout* s."""
    pause = threading.Event()
    for _ in range(int(timeout / _POLL)):
        if predicate():
            return
        pause.wait(_POLL)
    raise AssertionError(f"never happened: {what}")
