"""The control channel between the benchmark's parent and its child processes.

Owns
----
* The message protocol over one :func:`multiprocessing.Pipe` per child::

      child  -> parent   ("ready", {})         set up: connected, subscribed
      parent -> child    ("start", {})          begin publishing / measuring
      child  -> parent   ("final", {...})       the child's figures
      parent -> sub      ("drain", {"expected": n, "deadline": t})
      parent -> child    ("stop", {})           clean up and exit
      child  -> parent   ("error", {"error": text})

  A child whose parent's end closes (EOF) behaves as if told to stop.
* :class:`BlockingLink` (for children driven through a blocking API) and
  :class:`AsyncLink` (the same pipe watched by an event loop).
* :func:`child_main`, the entry point of every child process, and
  :class:`Child`, the parent's handle on one: spawning with ``fork`` and
  waiting for its messages with deadlines (:func:`wait_for`). Stopping
  children for sure is :func:`shmbus_tools.bench.runner.execute`'s job.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from ..pipelink import Message, PipeLink

__all__ = [
    "AsyncLink",
    "BlockingLink",
    "Child",
    "ChildFailed",
    "Message",
    "child_main",
    "wait_for",
]

log = logging.getLogger("shmbus_tools.bench")


_MP = multiprocessing.get_context("fork")


class ChildFailed(Exception):
    """A child process died, reported an error, or missed a deadline."""


# ─── Child side ──────────────────────────────────────────────────────────────


class BlockingLink:
    """A child's end of its pipe, read with blocking calls."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.gone = False

    def send(self, kind: str, data: dict[str, Any] | None = None) -> None:
        if self.gone:
            return
        try:
            self.conn.send((kind, data or {}))
        except OSError:
            self.gone = True

    def recv(self, timeout: float | None = None) -> Message:
        """The next message; ``("eof", {})`` if the parent went away,
        ``("timeout", {})`` after *timeout* seconds."""
        if self.gone:
            return ("eof", {})
        try:
            if timeout is not None and not self.conn.poll(timeout):
                return ("timeout", {})
            message: Message = self.conn.recv()
            return message
        except (EOFError, OSError):
            self.gone = True
            return ("eof", {})

    def wait_start(self) -> bool:
        """Wait for "start"; False if told to stop (or the parent is gone) first."""
        while True:
            kind, _ = self.recv()
            if kind == "start":
                return True
            if kind in ("stop", "eof"):
                return False

    def wait_stop(self, timeout: float = 120.0) -> None:
        """Wait until told to stop (or EOF, or *timeout*)."""
        deadline = time.monotonic() + timeout
        while True:
            kind, _ = self.recv(max(deadline - time.monotonic(), 0.0))
            if kind in ("stop", "eof", "timeout"):
                return


class AsyncLink(PipeLink):
    """A child's end of its pipe, watched by the running event loop."""

    async def wait_start(self) -> bool:
        while True:
            kind, _ = await self.messages.get()
            if kind == "start":
                return True
            if kind in ("stop", "eof"):
                return False

    async def wait_stop(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                kind, _ = await asyncio.wait_for(
                    self.messages.get(), max(deadline - time.monotonic(), 0.0)
                )
            except TimeoutError:
                return
            if kind in ("stop", "eof"):
                return

    def close(self) -> None:
        if not self.gone:
            self.gone = True
            self.loop.remove_reader(self._fd)


def child_main(conn: Connection, target: Callable[[Connection], None]) -> None:
    """Entry point of every child: run *target* with the pipe, report failures."""
    # Ctrl-C reaches the whole process group; stopping is the parent's call.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The parent turns SIGTERM into KeyboardInterrupt; a child just dies.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        target(conn)
    except BaseException as exc:  # reported to the parent, which decides
        try:
            conn.send(("error", {"error": f"{type(exc).__name__}: {exc}", "trace": _trace()}))
        except OSError:
            pass
        raise SystemExit(1) from None
    finally:
        conn.close()


def _trace() -> str:
    return "".join(traceback.format_exc(limit=8))


# ─── Parent side ─────────────────────────────────────────────────────────────


class Child:
    """The parent's handle on one child process."""

    def __init__(self, label: str, target: Callable[[Connection], None]) -> None:
        self.label = label
        parent_end, child_end = _MP.Pipe()
        self.conn = parent_end
        self.process: BaseProcess = _MP.Process(
            target=child_main, args=(child_end, target), name=f"bench-{label}", daemon=True
        )
        self.process.start()
        child_end.close()
        self.final: dict[str, Any] | None = None
        self.ready = False
        self.eof = False

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def send(self, kind: str, data: dict[str, Any] | None = None) -> None:
        try:
            self.conn.send((kind, data or {}))
        except OSError:
            pass  # it died; the wait that follows reports it

    def signal(self, signum: int) -> None:
        if self.process.is_alive():
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def handle(self, message: Message) -> None:
        kind, data = message
        if kind == "ready":
            self.ready = True
        elif kind == "final":
            self.final = data
        elif kind == "error":
            log.debug("%s failed:\n%s", self.label, data.get("trace", ""))
            raise ChildFailed(f"{self.label}: {data.get('error')}")


def wait_for(
    children: Sequence[Child],
    done: Callable[[Child], bool],
    deadline: float,
    what: str,
    on_deadline: Callable[[], float | None] | None = None,
) -> None:
    """Feed the children's messages to them until *done* holds for every one.

    Raises :class:`ChildFailed` if one dies first, reports an error, or the
    *deadline* (monotonic) passes. *on_deadline*, if given, is called once
    when the deadline passes and may return a new one.
    """
    while True:
        pending = [child for child in children if not done(child)]
        if not pending:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if on_deadline is not None:
                extended = on_deadline()
                on_deadline = None
                if extended is not None:
                    deadline = extended
                    continue
            names = ", ".join(child.label for child in pending)
            raise ChildFailed(f"timed out waiting for {what} from {names}")
        sources: list[Any] = []
        for child in pending:
            if not child.eof:
                sources.append(child.conn)
            sources.append(child.process.sentinel)
        for ready in multiprocessing.connection.wait(sources, min(remaining, 0.5)):
            for child in pending:
                if ready is child.conn:
                    _read_all(child)
        for child in pending:
            if not done(child) and not child.process.is_alive():
                _read_all(child)  # what it said before it went
                if not done(child):
                    raise ChildFailed(
                        f"{child.label} exited with code {child.process.exitcode} before {what}"
                    )


def _read_all(child: Child) -> None:
    if child.eof:
        return
    try:
        while child.conn.poll():
            child.handle(child.conn.recv())
    except (EOFError, OSError):
        child.eof = True
