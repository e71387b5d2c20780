"""A child process's end of its pipe to a parent, read by an event loop.

Owns the one small piece of plumbing that the demo and the benchmark share:
``(kind, data)`` messages from the other end land in :attr:`PipeLink.messages`
as soon as the loop sees the pipe readable, and the other end going away
(EOF, or a failed send) arrives once as an ``("eof", {})`` message, so a
child never blocks its loop on the pipe and always learns that its parent
is gone.
"""

from __future__ import annotations

import asyncio
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["Message", "PipeLink"]

Message = tuple[str, dict[str, Any]]


class PipeLink:
    """*conn* watched by *loop* (default: the running loop)."""

    def __init__(self, conn: Connection, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.conn = conn
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        self.gone = False
        self._fd = conn.fileno()
        self.loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                self.messages.put_nowait(self.conn.recv())
        except (EOFError, OSError):
            self._lost()

    def _lost(self) -> None:
        if not self.gone:
            self.gone = True
            self.loop.remove_reader(self._fd)
            self.messages.put_nowait(("eof", {}))

    def send(self, kind: str, data: dict[str, Any] | None = None) -> None:
        """Send ``(kind, data)``; a failure means the other end is gone."""
        if self.gone:
            return
        try:
            self.conn.send((kind, data or {}))
        except OSError:
            self._lost()

    def close(self) -> None:
        """Stop watching the pipe and close this end."""
        if not self.gone:
            self.gone = True
            self.loop.remove_reader(self._fd)
        self.conn.close()
