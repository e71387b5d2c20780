"""Helpers for the tests that drive shmbus from child processes: the ``shmbus``
command (``python -m shmbus``) and small ``python -c`` scripts.

Every child is started by :func:`started`, which kills and reaps it on the
way out whatever happens in the test. Waiting is bounded polling with a
deadline (:func:`wait_until`), never a fixed sleep.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, TypeVar

from shmbus._core.inspection import read_bus
from shmbus._core.leftovers import cleanup
from shmbus._core.shmfiles import bus_file_paths

T = TypeVar("T")

#: Generous: children start a fresh interpreter on a busy 2-core machine.
DEADLINE = 30.0

#: Child that connects to bus argv[1] with a 1 MiB ring, subscribes to
#: everything (so it owns a wake-up FIFO) and publishes one event, prints
#: "ready", then waits until its standard input closes.
CONNECTED_CHILD = """
import asyncio, sys
from shmbus import ShmBus

async def main():
    bus = ShmBus(sys.argv[1], capacity=1 << 20, max_event_size=64 * 1024)
    await bus.connect()
    sub = bus.subscribe(">")
    bus.publish_nowait("child.started", {"pid": 1})
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await sub.aclose()
    await bus.close()

asyncio.run(main())
"""


def shmbus_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "shmbus", *args]


def run_shmbus(
    *args: str, stdin_text: str | None = None, timeout: float = DEADLINE
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m shmbus ARGS`` to completion (stdin: *stdin_text* or empty)."""
    return subprocess.run(
        shmbus_command(*args),
        input=stdin_text if stdin_text is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@contextlib.contextmanager
def started(
    argv: Sequence[str],
    *,
    stdin: int | None = subprocess.DEVNULL,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[subprocess.Popen[str]]:
    """Start *argv* with piped stdout/stderr; kill and reap it on exit."""
    process = subprocess.Popen(
        list(argv),
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env=env,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.communicate(timeout=DEADLINE)


def wait_until(predicate: Callable[[], T], what: str, timeout: float = DEADLINE) -> T:
    """Poll *predicate* until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


def has_subscriber(bus: str, pid: int) -> bool:
    """True once process *pid* has a live instance with a subscription on *bus*."""
    try:
        info = read_bus(bus)
    except Exception:  # not created yet, or being reset
        return False
    return any(s.pid == pid and s.alive and s.subscriptions > 0 for s in info.instances)


class LineReader:
    """Reads a child's stream on a thread, so tests can wait for a line with
    a deadline."""

    def __init__(self, stream: IO[str]) -> None:
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        with contextlib.suppress(ValueError, OSError):
            for line in stream:
                self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def next_line(self, timeout: float = DEADLINE) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line from the child within {timeout:.0f} s") from None
        if line is None:
            raise AssertionError("the child's output ended")
        return line


@contextlib.contextmanager
def crashed_bus(name: str) -> Iterator[list[str]]:
    """A bus whose only process was SIGKILLed: its files are left in /dev/shm.

    Yields the paths left behind; removes whatever is left on exit.
    """
    try:
        with started([sys.executable, "-c", CONNECTED_CHILD, name], stdin=subprocess.PIPE) as child:
            assert child.stdout is not None
            line = child.stdout.readline()
            assert line.strip() == "ready", f"child failed: {line!r} {child.stderr}"
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=DEADLINE)
        paths = bus_file_paths(name)
        assert paths, f"the killed child left no files for bus {name!r}"
        yield paths
    finally:
        with contextlib.suppress(Exception):
            cleanup(name, force=True)
