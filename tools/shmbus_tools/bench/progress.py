"""The benchmark's progress display, on stderr.

Owns
----
One status line per run: its number, what it runs, elapsed time and an
estimate of the time left (the remaining runs' durations plus the mean
overhead the finished runs had over theirs). On a terminal the line is
rewritten in place; otherwise each run gets a plain line of its own. Failed
runs always leave a line. ``--quiet`` silences it all.
"""

from __future__ import annotations

import shutil
import time
from typing import TextIO

from .spec import RunSpec

__all__ = ["Progress"]


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Writes the benchmark's progress to *stream* (None: nowhere)."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self.tty = bool(stream is not None and _isatty(stream))
        self.total = 0
        self.done = 0
        self._began = time.monotonic()
        self._overhead = 0.0
        self._current = ""
        self._durations: list[float] = []

    def begin(self, durations: list[float]) -> None:
        """*durations*: the planned runs' durations, in order."""
        self._durations = list(durations)
        self.total = len(durations)
        self.done = 0
        self._began = time.monotonic()

    def run_started(self, spec: RunSpec) -> None:
        rep = f" rep {spec.rep + 1}"
        self._current = f"{spec.describe()}{rep}"
        left = self.total - self.done
        estimate = sum(self._durations[self.done :]) + left * (self._overhead or 0.5)
        self._show(
            f"[{self.done + 1:>3}/{self.total}] {self._current:<28} "
            f"{_clock(time.monotonic() - self._began)} elapsed, ~{_clock(estimate)} left"
        )

    def run_finished(self, wall_s: float, duration: float, error: str | None) -> None:
        self.done += 1
        overhead = max(wall_s - duration, 0.0)
        # Running mean of how much longer than its duration a run takes.
        self._overhead += (overhead - self._overhead) / self.done
        if error:
            self._line(f"[{self.done:>3}/{self.total}] {self._current} FAILED: {error}")

    def note(self, text: str) -> None:
        self._line(text)

    def end(self) -> None:
        if self.stream is None:
            return
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write(f"{self.done} runs in {_clock(time.monotonic() - self._began)}\n")
        self.stream.flush()

    def _show(self, text: str) -> None:
        if self.stream is None:
            return
        if self.tty:
            width = shutil.get_terminal_size((100, 24)).columns
            self.stream.write("\r\x1b[K" + text[: max(width - 1, 20)])
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _line(self, text: str) -> None:
        if self.stream is None:
            return
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (ValueError, OSError):
        return False
