"""Child processes and the pipe to each: the one harness with which the tests,
the soak, the benchmark and the demo start, drive and end their processes.

Rules
-----
* A child runs ``target(link, *args, **kwargs)``, by default in a fresh
  interpreter (``spawn``: no inherited bus instances, locks or event loops),
  or in a fork of the parent where the caller asks (the benchmark's children
  start as warm as their parent). *link* is the child's end of one duplex
  pipe to the parent, a :class:`BlockingLink`; a child on an event loop
  watches it with an :class:`AsyncLink`. The parent holds a :class:`Child`.
* A message is any picklable value. Its *kind* (:func:`kind_of`) is the
  message itself if it is a ``str`` (``"ready"``, ``"go"``, ``"stop"``), or
  the first item of a tuple that starts with a ``str`` (``("drain", n)``,
  ``("final", figures)``); other messages (a report dict) have none. Its
  *data* (:func:`data_of`) is what follows the kind.
* The other end going away (the pipe's EOF) is received as the message
  :data:`EOF`, and from then on every receive returns it at once. Sending
  never raises and never blocks on a dead peer: a send to a gone end is
  dropped, and the next receive tells.
* A child that raises sends ``("error", {"error": "Type: message", "trace":
  traceback})`` and exits with code 1; the parent's next receive raises
  :class:`ChildFailed` carrying both.
* A child ignores SIGINT from the exec of its interpreter on (Ctrl-C reaches
  the whole process group; stopping children is the parent's call) and dies
  on SIGTERM.
* Every wait of the parent has a deadline (:meth:`Child.recv`,
  :meth:`Child.join`, :func:`wait_all`, :func:`stop_all`); a missed one
  raises :class:`ChildFailed` naming the child, its pid, and whether it is
  alive or its exit code.
* :func:`running` and :func:`stop_all` leave no child behind: whatever
  happens, each one is stopped (asked, then SIGTERM, then SIGKILL, each step
  bounded) or killed at once, then reaped, and its pipe closed.
  :func:`end_process` does the same for a :class:`subprocess.Popen` (the
  servers some tests and peers need).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import multiprocessing.resource_tracker
import os
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Final, Self, TypeVar

__all__ = [
    "DEADLINE",
    "EOF",
    "Agent",
    "AsyncLink",
    "BlockingLink",
    "Child",
    "ChildFailed",
    "await_all",
    "data_of",
    "end_process",
    "kind_of",
    "running",
    "stop_all",
    "stop_resource_tracker",
    "wait_all",
]

log = logging.getLogger("shmbus_tools.children")

#: What a link receives once the other end of its pipe is gone.
EOF: Final = "eof"
#: The kind of the message a failing child sends before it exits.
ERROR: Final = "error"
#: Default bound of one exchange with a child, in seconds: generous, children
#: start a fresh interpreter on a busy machine.
DEADLINE: Final = 30.0
#: How long reaping a SIGKILLed child may take.
_REAP_TIMEOUT: Final = 10.0
#: Longest single block of :func:`wait_all` (so *done* is re-checked).
_WAIT_SLICE: Final = 0.5

_PROCESSES: Final[dict[str, type[BaseProcess]]] = {
    "spawn": multiprocessing.context.SpawnProcess,
    "fork": multiprocessing.context.ForkProcess,
}

C = TypeVar("C", bound="Child")


def kind_of(message: Any) -> str | None:
    """The kind of *message*: itself if a ``str``, the first item of a tuple
    that starts with a ``str``, else None."""
    if isinstance(message, str):
        return message
    if isinstance(message, tuple) and message and isinstance(message[0], str):
        return message[0]
    return None


def data_of(message: Any) -> Any:
    """What follows the kind of *message*: the second item of a pair, the
    items after the kind of a longer tuple, None for a bare kind; a message
    without a kind is all data."""
    if kind_of(message) is None:
        return message
    if isinstance(message, str) or len(message) == 1:
        return None
    return message[1] if len(message) == 2 else message[1:]


class ChildFailed(Exception):
    """A child process died, reported an error, sent something unexpected or
    missed a deadline. :attr:`summary` is one line; :attr:`trace` the
    child's traceback, if it sent one (``str()`` has both)."""

    def __init__(self, summary: str, trace: str = "") -> None:
        super().__init__(f"{summary}\n{trace}" if trace else summary)
        self.summary = summary
        self.trace = trace


def _unexpected(message: Any, kinds: Sequence[str]) -> RuntimeError:
    wanted = " or ".join(repr(kind) for kind in kinds)
    return RuntimeError(f"expected {wanted}, got {message!r:.300}")


# ─── A child's end ───────────────────────────────────────────────────────────


class BlockingLink:
    """One end of a pipe, used with blocking calls."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        #: The other end is gone: every receive returns :data:`EOF`.
        self.gone = False

    def send(self, message: Any) -> None:
        """Send *message*; dropped if the other end is gone."""
        with contextlib.suppress(OSError):
            self.conn.send(message)

    def poll(self, timeout: float = 0.0) -> bool:
        """Whether a receive would return at once (a message, or :data:`EOF`),
        waiting up to *timeout* seconds for it."""
        if self.gone:
            return True
        try:
            return self.conn.poll(timeout)
        except (EOFError, OSError):
            self.gone = True
            return True

    def recv(self, timeout: float | None = None) -> Any:
        """The next message (:data:`EOF` once the other end is gone);
        :class:`TimeoutError` if none comes within *timeout* seconds."""
        if self.gone:
            return EOF
        try:
            if timeout is None or self.conn.poll(timeout):
                return self.conn.recv()
        except (EOFError, OSError):
            self.gone = True
            return EOF
        raise TimeoutError(f"no message within {timeout:g} s")

    def expect(self, *kinds: str, timeout: float | None = None) -> Any:
        """The next message, which must be of one of *kinds*; RuntimeError
        naming it if not (:data:`EOF` included)."""
        message = self.recv(timeout)
        if kind_of(message) not in kinds:
            raise _unexpected(message, kinds)
        return message

    def wait_start(self, start: str = "start") -> bool:
        """Wait for a message of kind *start*; False if a ``"stop"`` (or
        :data:`EOF`) comes first."""
        while True:
            kind = kind_of(self.recv())
            if kind == start:
                return True
            if kind in ("stop", EOF):
                return False

    def wait_stop(self, timeout: float | None = None) -> None:
        """Wait for ``"stop"`` or :data:`EOF`, at most *timeout* seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with contextlib.suppress(TimeoutError):
            while True:
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                if kind_of(self.recv(left)) in ("stop", EOF):
                    return


class AsyncLink:
    """*link*'s pipe watched by the running event loop (``loop.add_reader``):
    messages land in :attr:`messages` as soon as the loop sees them, so the
    loop never blocks on the pipe."""

    def __init__(self, link: BlockingLink) -> None:
        self.link = link
        self.loop = asyncio.get_running_loop()
        self.messages: asyncio.Queue[Any] = asyncio.Queue()
        #: Set once a ``"stop"`` arrives or the other end is gone.
        self.stopped = asyncio.Event()
        self._fd = link.conn.fileno()
        self._watching = not link.gone
        if self._watching:
            self.loop.add_reader(self._fd, self._readable)
        else:
            self._arrived(EOF)

    def _readable(self) -> None:
        link = self.link
        while not link.gone and link.poll():
            self._arrived(link.recv())
        if link.gone:
            self.close()

    def _arrived(self, message: Any) -> None:
        if kind_of(message) in ("stop", EOF):
            self.stopped.set()
        self.messages.put_nowait(message)

    def send(self, message: Any) -> None:
        """Send *message*; dropped if the other end is gone."""
        self.link.send(message)

    async def recv(self, timeout: float | None = None) -> Any:
        """The next message (:data:`EOF` once the other end is gone);
        :class:`TimeoutError` if none comes within *timeout* seconds."""
        if self.messages.empty() and self.link.gone:
            return EOF
        if timeout is None:
            return await self.messages.get()
        return await asyncio.wait_for(self.messages.get(), timeout)

    async def expect(self, *kinds: str, timeout: float | None = None) -> Any:
        """The next message, which must be of one of *kinds*; RuntimeError
        naming it if not (:data:`EOF` included)."""
        message = await self.recv(timeout)
        if kind_of(message) not in kinds:
            raise _unexpected(message, kinds)
        return message

    async def wait_start(self, start: str = "start") -> bool:
        """Wait for a message of kind *start*; False if a ``"stop"`` (or
        :data:`EOF`) comes first."""
        while True:
            kind = kind_of(await self.recv())
            if kind == start:
                return True
            if kind in ("stop", EOF):
                return False

    async def wait_stop(self, timeout: float | None = None) -> None:
        """Wait for ``"stop"`` or :data:`EOF`, at most *timeout* seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopped.wait(), timeout)

    def close(self) -> None:
        """Stop watching the pipe (closing it is the child's entry point's job)."""
        if self._watching:
            self._watching = False
            self.loop.remove_reader(self._fd)


def _child_main(
    conn: Connection, target: Callable[..., None], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Entry point of every child: run *target* with the link, report failures."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A forked child inherits a parent's SIGTERM handler; a child just dies.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    link = BlockingLink(conn)
    try:
        target(link, *args, **kwargs)
    except BaseException as exc:  # reported to the parent, which decides
        error = f"{type(exc).__name__}: {exc}"
        link.send((ERROR, {"error": error, "trace": traceback.format_exc()}))
        raise SystemExit(1) from None
    finally:
        conn.close()


# ─── The parent's handle ─────────────────────────────────────────────────────


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored meanwhile (a spawned child inherits that through exec, so
    it ignores Ctrl-C before its own code runs); only the main thread can."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class Child:
    """The parent's handle on one child process running ``target(link,
    *args, **kwargs)``, started with *method* (``"spawn"`` or ``"fork"``)."""

    #: Default bound of :meth:`recv` and :meth:`expect`, in seconds.
    deadline: float = DEADLINE

    def __init__(
        self,
        target: Callable[..., None],
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        name: str | None = None,
        method: str = "spawn",
    ) -> None:
        self.name = name or target.__name__
        if method not in _PROCESSES:
            raise ValueError(f"method must be one of {sorted(_PROCESSES)}, got {method!r}")
        parent_end, self._child_end = multiprocessing.Pipe()
        self.link = BlockingLink(parent_end)
        self.process = _PROCESSES[method](
            target=_child_main,
            args=(self._child_end, target, tuple(args), dict(kwargs or {})),
            name=self.name,
            daemon=True,
        )
        #: What :meth:`pump` read: the data of the latest message of each kind.
        self.latest: dict[str | None, Any] = {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} pid={self.process.pid} {self.state()}>"

    @property
    def pid(self) -> int:
        pid = self.process.pid
        if pid is None:
            raise RuntimeError(f"child {self.name} was not started")
        return pid

    def start(self) -> Self:
        with _sigint_ignored():
            self.process.start()
        self._child_end.close()  # only the child holds it now: its death reads as EOF
        return self

    # ── Messages ──

    def send(self, message: Any) -> None:
        """Send *message*; dropped if the child is gone (the next receive says so)."""
        self.link.send(message)

    def poll(self, timeout: float = 0.0) -> bool:
        """Whether :meth:`recv` would return at once, waiting up to *timeout* s."""
        return self.link.poll(timeout)

    def recv(self, timeout: float | None = None) -> Any:
        """The child's next message; :class:`ChildFailed` if none comes within
        *timeout* seconds (default :attr:`deadline`), its pipe ends first, or
        it reported an error."""
        timeout = self.deadline if timeout is None else timeout
        try:
            message = self.link.recv(timeout)
        except TimeoutError:
            raise ChildFailed(self.describe(f"sent nothing within {timeout:g} s")) from None
        if message == EOF and self.link.gone:
            self.process.join(1.0)
            raise ChildFailed(self.describe("closed its pipe without sending"))
        self._raise_reported(message)
        return message

    def expect(self, value: Any, timeout: float | None = None) -> Any:
        """The child's next message, which must equal *value*; else as :meth:`recv`."""
        got = self.recv(timeout)
        if got != value:
            raise ChildFailed(self.describe(f"sent {got!r:.300}, expected {value!r}"))
        return got

    def pump(self) -> bool:
        """Read every message waiting, without blocking, into :attr:`latest`;
        :class:`ChildFailed` if one reports an error. True once the pipe has
        ended."""
        link = self.link
        while not link.gone and link.poll():
            message = link.recv()
            if link.gone:
                break
            self._raise_reported(message)
            self.latest[kind_of(message)] = data_of(message)
        return link.gone

    def _raise_reported(self, message: Any) -> None:
        if kind_of(message) != ERROR:
            return
        data = data_of(message)
        report = data if isinstance(data, dict) else {"error": data}
        self.process.join(1.0)
        log.debug("%s failed:\n%s", self.name, report.get("trace", ""))
        raise ChildFailed(self.describe(f"raised {report.get('error')}"), report.get("trace", ""))

    # ── Its life ──

    def signal(self, signum: int) -> None:
        """Send *signum* to the child unless it has been reaped."""
        if self.process.pid is not None and self.process.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def join(self, timeout: float = 10.0) -> int:
        """Wait for the child to exit and return its exit code; if it takes
        longer than *timeout* seconds, kill it and raise :class:`ChildFailed`."""
        self.process.join(timeout)
        exitcode = self.process.exitcode
        if exitcode is None:
            self.kill()
            raise ChildFailed(self.describe(f"did not exit within {timeout:g} s; killed"))
        return exitcode

    def kill(self) -> None:
        """SIGKILL the child (if it still runs) and reap it."""
        if self.process.pid is None:
            return
        self.signal(signal.SIGKILL)
        self.process.join(_REAP_TIMEOUT)

    def close(self) -> None:
        """Close the parent's end of the pipe (and the child's, if never started)."""
        self.link.conn.close()
        self._child_end.close()

    def state(self) -> str:
        """``"not started"``, ``"alive"`` or ``"exited with code N"``."""
        if self.process.pid is None:
            return "not started"
        exitcode = self.process.exitcode
        return "alive" if exitcode is None else f"exited with code {exitcode}"

    def describe(self, what: str) -> str:
        """*what* happened, said of this child with its pid and state."""
        return f"{self.name} (pid {self.process.pid}) {what} [{self.state()}]"


class Agent(Child):
    """The tests' shorthand: ``Agent(target, *args, **kwargs)`` is a spawned
    :class:`Child` named after *target*."""

    def __init__(self, target: Callable[..., None], /, *args: Any, **kwargs: Any) -> None:
        super().__init__(target, args, kwargs)


# ─── Many children ───────────────────────────────────────────────────────────


def _pending(children: Iterable[C], done: Callable[[C], bool], what: str) -> list[C]:
    """The *children* that *done* does not hold for yet, once what they sent
    is read; :class:`ChildFailed` if one of them ended first."""
    pending = []
    for child in children:
        if done(child):
            continue
        child.pump()
        if not done(child) and child.process.exitcode is not None:
            child.pump()  # what it sent between the first read and its exit
            if not done(child):
                raise ChildFailed(child.describe(f"ended before {what}"))
        if not done(child):
            pending.append(child)
    return pending


def _timed_out(pending: Iterable[Child], what: str) -> ChildFailed:
    names = ", ".join(child.name for child in pending)
    return ChildFailed(f"timed out waiting for {what} from {names}")


def wait_all(
    children: Sequence[C],
    done: Callable[[C], bool],
    deadline: float,
    what: str,
    on_deadline: Callable[[], float | None] | None = None,
) -> None:
    """:meth:`~Child.pump` the *children* until *done* holds for every one.

    :class:`ChildFailed` if one of them reports an error or ends first, or
    the *deadline* (``time.monotonic()``) passes; *on_deadline*, if given, is
    called once when it passes and may return a later one.
    """
    while pending := _pending(children, done, what):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            extended = on_deadline() if on_deadline is not None else None
            on_deadline = None
            if extended is None:
                raise _timed_out(pending, what)
            deadline = extended
            continue
        sources: list[Any] = []
        for child in pending:
            if not child.link.gone:
                sources.append(child.link.conn)
            sources.append(child.process.sentinel)
        multiprocessing.connection.wait(sources, min(remaining, _WAIT_SLICE))


async def await_all(
    children: Sequence[C],
    done: Callable[[C], bool],
    deadline: float,
    what: str,
    *,
    every: float = 0.02,
) -> None:
    """:func:`wait_all` for a parent on an event loop: looks every *every*
    seconds instead of blocking."""
    while pending := _pending(children, done, what):
        if time.monotonic() >= deadline:
            raise _timed_out(pending, what)
        await asyncio.sleep(every)


@contextlib.contextmanager
def running(*children: C, grace: float = 0.0) -> Iterator[tuple[C, ...]]:
    """Start those of *children* not started yet; on the way out, whatever
    happens, :func:`stop_all` of them with *grace* (0: killed at once)."""
    try:
        for child in children:
            if child.process.pid is None:
                child.start()
        yield children
    finally:
        stop_all(children, grace)


def _join_all(children: Sequence[Child], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for child in children:
        child.process.join(max(deadline - time.monotonic(), 0.0))


def stop_all(children: Iterable[Child], grace: float = 0.0, *, stop: Any = "stop") -> None:
    """End every child and reap it. With a *grace* (seconds): send each the
    message *stop*, give them *grace* together, SIGTERM the rest and give them
    *grace* again; then (at once, without one) SIGKILL whatever still runs.
    Every pipe is closed."""
    children = list(children)
    started = [child for child in children if child.process.pid is not None]
    if grace > 0:
        for child in started:
            child.send(stop)
        _join_all(started, grace)
        stragglers = [child for child in started if child.process.exitcode is None]
        if stragglers:
            log.info("terminating %s", ", ".join(child.name for child in stragglers))
            for child in stragglers:
                child.signal(signal.SIGTERM)
            _join_all(stragglers, grace)
    for child in started:
        if grace > 0 and child.process.exitcode is None:
            log.warning("%s ignored SIGTERM; killing it", child.name)
        child.kill()
    for child in children:
        child.close()


def end_process(process: subprocess.Popen[Any], grace: float) -> None:
    """End *process* and reap it: SIGTERM, *grace* seconds, then SIGKILL (at
    once with no grace)."""
    if process.poll() is None and grace > 0:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace)
        if process.poll() is None:
            log.warning("%s did not stop on SIGTERM; killing it", process.args)
    if process.poll() is None:
        process.kill()
    process.wait()


def stop_resource_tracker() -> None:
    """Stop the helper process the ``spawn`` start method launches once per
    parent (it would otherwise outlive every test as a live child). It is
    restarted on demand by the next spawn."""
    # No public API for this; _stop() exists since Python 3.8.
    multiprocessing.resource_tracker._resource_tracker._stop()  # type: ignore[attr-defined]
