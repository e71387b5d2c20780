"""The one place where tests spawn processes.

An :class:`Agent` is a child process started with the ``spawn`` start method
(a fresh interpreter: no inherited bus instances, locks or event loops) plus a
pipe to it. The child runs ``target(conn, *args, **kwargs)`` from
:mod:`agents`; if it raises, the child sends ``("error", traceback)`` before
exiting, and the parent's next :meth:`Agent.recv` raises :class:`AgentError`
with that traceback.

Use :func:`running` to start agents: it kills and joins every one of them on
the way out, whatever happens in the test, so no test leaves a live child.
Spawning also starts multiprocessing's resource tracker, a helper process
that lives as long as the parent; :func:`stop_resource_tracker` ends it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.resource_tracker
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["Agent", "AgentError", "running", "stop_resource_tracker"]

_CTX = multiprocessing.get_context("spawn")
_ERROR = "error"


class AgentError(TimeoutError):
    """An agent did not send what the parent waited for: it timed out, died,
    or raised (the message has its state, exit code and traceback)."""


def _child_main(
    conn: Connection, target: Callable[..., None], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    try:
        target(conn, *args, **kwargs)
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send((_ERROR, traceback.format_exc()))
        raise SystemExit(1) from None
    finally:
        conn.close()


class Agent:
    """A child process running ``target(conn, *args, **kwargs)``."""

    def __init__(self, target: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        self.name = target.__name__
        self._conn, self._child_conn = _CTX.Pipe()
        self.process = _CTX.Process(
            target=_child_main,
            args=(self._child_conn, target, args, kwargs),
            name=f"agent-{self.name}",
            daemon=True,
        )

    def __repr__(self) -> str:
        return f"<Agent {self.name} pid={self.process.pid} {self._state()}>"

    @property
    def pid(self) -> int:
        pid = self.process.pid
        if pid is None:
            raise RuntimeError(f"agent {self.name} was not started")
        return pid

    def start(self) -> Agent:
        self.process.start()
        self._child_conn.close()  # only the child holds it now: its death reads as EOF
        return self

    def send(self, value: Any) -> None:
        self._conn.send(value)

    def recv(self, timeout: float = 30.0) -> Any:
        """The child's next message; :class:`AgentError` if none comes in
        *timeout* seconds, the child dies first, or it sent a traceback."""
        if not self._conn.poll(timeout):
            raise AgentError(self._describe(f"sent nothing within {timeout:g} s"))
        try:
            value = self._conn.recv()
        except (EOFError, OSError):
            self.process.join(1.0)
            raise AgentError(self._describe("closed its pipe without sending")) from None
        if isinstance(value, tuple) and len(value) == 2 and value[0] == _ERROR:
            self.process.join(1.0)
            raise AgentError(self._describe(f"raised:\n{value[1]}"))
        return value

    def expect(self, value: Any, timeout: float = 30.0) -> None:
        got = self.recv(timeout)
        if got != value:
            raise AssertionError(
                f"agent {self.name} (pid {self.pid}) sent {got!r}, expected {value!r}"
            )

    def join(self, timeout: float = 10.0) -> int:
        """Wait for the child to exit; kill it and raise if it takes longer."""
        self.process.join(timeout)
        if self.process.is_alive():
            self.kill()
            raise AgentError(self._describe(f"did not exit within {timeout:g} s; killed"))
        exitcode = self.process.exitcode
        assert exitcode is not None
        return exitcode

    def kill(self) -> None:
        """SIGKILL the child (if it is still running) and reap it."""
        if self.process.pid is None:
            return
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10.0)

    def close(self) -> None:
        self._conn.close()
        self._child_conn.close()

    def _state(self) -> str:
        if self.process.pid is None:
            return "not started"
        if self.process.is_alive():
            return "alive"
        return f"exited with code {self.process.exitcode}"

    def _describe(self, what: str) -> str:
        return f"agent {self.name} (pid {self.process.pid}) {what} [child {self._state()}]"


@contextlib.contextmanager
def running(*agents: Agent) -> Iterator[tuple[Agent, ...]]:
    """Start *agents*; on exit kill and join every one still running."""
    try:
        for agent in agents:
            agent.start()
        yield agents
    finally:
        for agent in agents:
            agent.kill()
            agent.close()


def stop_resource_tracker() -> None:
    """Stop the helper process the ``spawn`` start method launches once per
    parent (it would otherwise outlive every test as a live child). It is
    restarted on demand by the next spawn."""
    # No public API for this; _stop() exists since Python 3.8.
    multiprocessing.resource_tracker._resource_tracker._stop()  # type: ignore[attr-defined]
