"""Child-side behaviours for the fault-injection tests (run by :mod:`spawn`).

Same conventions as :mod:`agents`: every function takes the pipe to the
parent first, connects its own :class:`~shmbus.ShmBus`, sends ``"ready"`` once
it is connected (and subscribed, for a subscriber), and answers the parent's
small messages. Payloads are ``{"pub": publisher id, "seq": n}`` so that the
parent can check order, duplicates and losses per publisher.

Crash points
------------
A *doomed* publisher stops, on its chosen publish, at one point of the
writer's critical section, tells the parent ``("dying", point)`` and blocks
forever, so that the parent can SIGKILL it exactly there:

==============  ============================================================
``unrecorded``  semaphore taken, holder record not yet written (pid 0)
``locked``      holder recorded, no sequence number reserved yet
                (``ShmBus._critical_section_hook("locked")``)
``mid-record``  sequence number reserved, record written, not committed
                (``ShmBus._critical_section_hook("mid-record")``)
``committed``   ``write_cursor`` stored (the commit), ``published`` not yet
                counted
``unreleased``  holder record cleared, semaphore not yet released
==============  ============================================================

With ``stall=True`` it stalls there alive instead, until told to resume (a
holder that is slow, not dead).

``locked`` and ``mid-record`` use the documented test hook. The other three
have no hook; they wrap private attributes of the instance (its writer lock's
``_record`` and ``_semaphore``, its ring writer's ``_words``), so they follow
those names if the core renames them.
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import random
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from shmbus import ShmBus
from shmbus.inspect import read_bus
from shmbus.layout import W_WRITE_CURSOR
from shmbus.segment import resource_paths

#: Where a doomed publisher can die, in the order the writer passes them.
CRASH_POINTS = ("unrecorded", "locked", "mid-record", "committed", "unreleased")
#: Crash points the dying writer passes after reserving its sequence number.
RESERVED_AT = frozenset({"mid-record", "committed", "unreleased"})
#: Crash points the dying writer passes after committing its record.
COMMITTED_AT = frozenset({"committed", "unreleased"})

_CHECK_PIPE_EVERY = 16


def _block_forever() -> None:
    while True:
        time.sleep(3600)


class _Armed:
    """Whether the crash point fires on the next pass (one publish only)."""

    def __init__(self) -> None:
        self.on = False


class _WordsDyingAfterCommit:
    """Stands in for a ring writer's word view; dies right after the store
    of ``write_cursor`` (the commit) when armed."""

    def __init__(self, words: Any, armed: _Armed, die: Callable[[], None]) -> None:
        self._words = words
        self._armed = armed
        self._die = die

    def __getitem__(self, index: int) -> int:
        value: int = self._words[index]
        return value

    def __setitem__(self, index: int, value: int) -> None:
        self._words[index] = value
        if index == W_WRITE_CURSOR and self._armed.on:
            self._die()


class _SemaphoreDyingBeforeRelease:
    """Stands in for the writer semaphore; dies instead of releasing when armed
    (the writer lock has cleared its holder record by then)."""

    def __init__(self, semaphore: Any, armed: _Armed, die: Callable[[], None]) -> None:
        self._semaphore = semaphore
        self._armed = armed
        self._die = die

    def acquire(self, timeout: float | None = None) -> None:
        self._semaphore.acquire(timeout)

    def release(self) -> None:
        if self._armed.on:
            self._die()
        self._semaphore.release()


def _install_crash_point(bus: ShmBus, point: str, armed: _Armed, die: Callable[[], None]) -> None:
    if point in ("locked", "mid-record"):

        def hook(stage: str) -> None:
            if armed.on and stage == point:
                die()

        ShmBus._critical_section_hook = hook
    elif point == "unrecorded":
        lock = bus._writer_lock
        assert lock is not None
        record = lock._record

        def record_or_die() -> None:
            if armed.on:
                die()
            record()

        lock._record = record_or_die  # type: ignore[method-assign]
    elif point == "committed":
        writer = bus._writer
        assert writer is not None
        writer._words = _WordsDyingAfterCommit(writer._words, armed, die)  # type: ignore[assignment]
    elif point == "unreleased":
        lock = bus._writer_lock
        assert lock is not None
        lock._semaphore = _SemaphoreDyingBeforeRelease(lock._semaphore, armed, die)  # type: ignore[assignment]
    else:
        raise ValueError(f"unknown crash point {point!r}; known: {CRASH_POINTS}")


def doomed_publisher(
    conn: Connection,
    name: str,
    pub_id: int,
    point: str,
    *,
    before: int = 0,
    topic: str = "fault.doomed",
    stall: bool = False,
    bus_kwargs: dict[str, Any] | None = None,
) -> None:
    """Connect, send ``"ready"``, wait for ``"go"``, publish *before* events
    normally, then publish event number *before*, which stops at crash point
    *point*: send ``("dying", point)`` and block until killed.

    With *stall*, it only stalls there: it sends ``("stalled", point)``,
    waits for ``"resume"``, finishes that publish, sends ``{"bus": stats}``
    and closes on ``"close"``."""

    def die() -> None:
        if stall:
            armed.on = False
            conn.send(("stalled", point))
            message = conn.recv()
            if message != "resume":
                raise RuntimeError(f"stalled publisher expected 'resume', got {message!r}")
            return
        conn.send(("dying", point))
        _block_forever()

    armed = _Armed()

    async def main() -> None:
        bus = ShmBus(name, **(bus_kwargs or {}))
        await bus.connect()
        _install_crash_point(bus, point, armed, die)
        conn.send("ready")
        message = conn.recv()
        if message != "go":
            raise RuntimeError(f"doomed publisher expected 'go', got {message!r}")
        for seq in range(before):
            await bus.publish(topic, {"pub": pub_id, "seq": seq})
        armed.on = True
        await bus.publish(topic, {"pub": pub_id, "seq": before})
        if not stall:
            raise RuntimeError(f"the publish did not stop at crash point {point!r}")
        conn.send({"bus": dict(bus.stats())})
        message = conn.recv()
        if message != "close":
            raise RuntimeError(f"stalled publisher expected 'close', got {message!r}")
        await bus.close()

    asyncio.run(main())


def timed_publisher(
    conn: Connection,
    name: str,
    pub_id: int,
    count: int,
    *,
    topic: str = "fault.survivor",
    bus_kwargs: dict[str, Any] | None = None,
) -> None:
    """Connect, send ``"ready"``, wait for ``"go"``, send ``"started"`` and
    publish *count* events; report when the first and the last publish
    returned (``time.monotonic()``, one clock for the whole host) and the
    instance's stats, then close."""

    async def main() -> None:
        bus = ShmBus(name, **(bus_kwargs or {}))
        await bus.connect()
        try:
            conn.send("ready")
            message = conn.recv()
            if message != "go":
                raise RuntimeError(f"timed publisher expected 'go', got {message!r}")
            conn.send("started")
            first_done = 0.0
            for seq in range(count):
                await bus.publish(topic, {"pub": pub_id, "seq": seq})
                if seq == 0:
                    first_done = time.monotonic()
            report = {
                "published": count,
                "first_done": first_done,
                "last_done": time.monotonic(),
                "bus": dict(bus.stats()),
            }
        finally:
            await bus.close()
        conn.send(report)

    asyncio.run(main())


def busy_publisher(
    conn: Connection,
    name: str,
    pub_id: int,
    *,
    topic: str = "fault.busy",
    progress_at: int | None = None,
    max_pad: int = 200,
    seed: int = 0,
    bus_kwargs: dict[str, Any] | None = None,
) -> None:
    """Connect and send ``"ready"``. Then, for every ``"go"``: publish as fast
    as it can (payloads padded with 0 to *max_pad* random bytes) until
    ``"stop"`` arrives, and send ``{"published": n, "bus": stats}`` for that
    round (``seq`` keeps counting across rounds). ``"close"`` ends it.

    With *progress_at*, sends ``"progress"`` once that many events of the
    first round are out, and keeps publishing: the parent kills it at a
    moment of its choosing.
    """
    rng = random.Random(seed)

    async def main() -> None:
        bus = ShmBus(name, **(bus_kwargs or {}))
        await bus.connect()
        try:
            conn.send("ready")
            seq = 0
            while True:
                message = conn.recv()
                if message == "close":
                    return
                if message != "go":
                    raise RuntimeError(f"busy publisher expected 'go', got {message!r}")
                first = seq
                while True:
                    payload = {"pub": pub_id, "seq": seq, "pad": "x" * rng.randrange(max_pad + 1)}
                    await bus.publish(topic, payload)
                    seq += 1
                    if progress_at is not None and seq == progress_at:
                        conn.send("progress")
                    if seq % _CHECK_PIPE_EVERY == 0 and conn.poll():
                        message = conn.recv()
                        if message != "stop":
                            raise RuntimeError(f"busy publisher expected 'stop', got {message!r}")
                        break
                conn.send({"published": seq - first, "bus": dict(bus.stats())})
        finally:
            await bus.close()

    asyncio.run(main())


def tally_subscriber(
    conn: Connection,
    name: str,
    pattern: str,
    *,
    bus_kwargs: dict[str, Any] | None = None,
    timeout: float = 60.0,
) -> None:
    """Subscribe to *pattern*, send ``"ready"`` and consume continuously,
    keeping ``(pub, seq)`` of every event. Answers:

    * ``("tally", expected, quiet)``: once received + dropped reaches
      *expected* and no event came for *quiet* seconds (or *timeout* passed),
      send ``{"events": [(pub, seq), ...] since the last tally, "received":
      total, "dropped": total, "bus": stats}``;
    * ``"close"``: close the bus and send ``"closed"``.
    """

    async def main() -> None:
        loop = asyncio.get_running_loop()
        bus = ShmBus(name, **(bus_kwargs or {}))
        await bus.connect()
        messages: asyncio.Queue[Any] = asyncio.Queue()

        def on_readable() -> None:
            try:
                while conn.poll():
                    messages.put_nowait(conn.recv())
            except (EOFError, OSError):
                loop.remove_reader(conn.fileno())
                messages.put_nowait("close")

        try:
            sub = bus.subscribe(pattern)
            events: list[tuple[Any, Any]] = []
            received = 0
            last_event = loop.time()

            async def consume() -> None:
                nonlocal received, last_event
                async for event in sub:
                    events.append((event.payload.get("pub"), event.payload.get("seq")))
                    received += 1
                    last_event = loop.time()

            consumer = asyncio.ensure_future(consume())
            loop.add_reader(conn.fileno(), on_readable)
            conn.send("ready")
            while True:
                message = await messages.get()
                if message == "close":
                    break
                if not (isinstance(message, tuple) and message[0] == "tally"):
                    raise RuntimeError(f"tally subscriber got {message!r}")
                _, expected, quiet = message
                deadline = loop.time() + timeout
                while loop.time() < deadline and (
                    received + sub.dropped < expected or loop.time() - last_event < quiet
                ):
                    await asyncio.sleep(0.01)
                batch, events[:] = list(events), []
                conn.send(
                    {
                        "events": batch,
                        "received": received,
                        "dropped": sub.dropped,
                        "bus": dict(bus.stats()),
                    }
                )
            loop.remove_reader(conn.fileno())
            consumer.cancel()
        finally:
            await bus.close()
        conn.send("closed")

    asyncio.run(main())


def scribbler(
    conn: Connection,
    name: str,
    *,
    start: int,
    end: int,
    seed: int,
    max_len: int = 16,
    per_ms: int = 4,
) -> None:
    """Map the segment of bus *name* (without attaching to the bus), send
    ``"ready"``, and after ``"go"`` write random runs of 1 to *max_len*
    random bytes at random offsets in ``[start, end)``, about *per_ms* runs
    per millisecond, until ``"stop"``; then send ``{"writes": n}``."""
    rng = random.Random(seed)
    with open(f"/dev/shm/shmbus.{name}", "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        conn.send("ready")
        message = conn.recv()
        if message != "go":
            raise RuntimeError(f"scribbler expected 'go', got {message!r}")
        writes = 0
        while not conn.poll():
            for _ in range(per_ms):
                size = rng.randint(1, max_len)
                offset = rng.randrange(start, end - size)
                mm[offset : offset + size] = rng.randbytes(size)
                writes += 1
            time.sleep(0.001)
        message = conn.recv()
        if message != "stop":
            raise RuntimeError(f"scribbler expected 'stop', got {message!r}")
    conn.send({"writes": writes})


def as_user(
    conn: Connection,
    name: str,
    uid: int,
    gid: int,
    groups: list[int],
    *,
    bus_kwargs: dict[str, Any] | None = None,
    pattern: str | None = None,
) -> None:
    """Become user *uid* (primary group *gid*, supplementary *groups*), then
    connect. If that raises, send ``("refused", type name, message)`` and
    stop. Otherwise subscribe to *pattern* (if given), send ``"ready"`` and
    answer:

    * ``("publish", topic)``: publish ``{"uid": uid}`` on *topic*, send
      ``"published"``;
    * ``"receive"``: send ``("got", topic, payload)`` for the next event;
    * ``"close"``: close the bus, send ``("closed", None)`` or
      ``("closed", "TypeName: message")`` if close() raised, and stop.
    """
    # Everything is imported by now: after the switch, this user may not be
    # able to read the interpreter's library (a pyenv under /root, say).
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        bus = ShmBus(name, **(bus_kwargs or {}))
        try:
            await bus.connect()
        except Exception as exc:
            conn.send(("refused", type(exc).__name__, str(exc)))
            return
        sub = bus.subscribe(pattern) if pattern is not None else None
        messages: asyncio.Queue[Any] = asyncio.Queue()

        def on_readable() -> None:
            try:
                messages.put_nowait(conn.recv())
            except (EOFError, OSError):  # the parent went away
                loop.remove_reader(conn.fileno())
                messages.put_nowait("close")

        loop.add_reader(conn.fileno(), on_readable)
        conn.send("ready")
        while True:
            message = await messages.get()
            if isinstance(message, tuple) and message[0] == "publish":
                await bus.publish(message[1], {"uid": uid})
                conn.send("published")
            elif message == "receive":
                assert sub is not None
                event = await asyncio.wait_for(anext(aiter(sub)), 30)
                conn.send(("got", event.topic, event.payload))
            elif message == "close":
                loop.remove_reader(conn.fileno())
                try:
                    await bus.close()
                except Exception as exc:
                    conn.send(("closed", f"{type(exc).__name__}: {exc}"))
                else:
                    conn.send(("closed", None))
                return
            else:
                raise RuntimeError(f"as_user got {message!r}")

    asyncio.run(main())


def _outcome(call: Callable[[], object]) -> dict[str, Any]:
    """What calling *call* did: raised what (and whether it is a
    RuntimeError), or returned."""
    try:
        call()
    except Exception as exc:
        return {
            "raised": type(exc).__name__,
            "runtime_error": isinstance(exc, RuntimeError),
            "message": str(exc),
        }
    return {"raised": None}


def forking_owner(conn: Connection, name: str, *, bus_kwargs: dict[str, Any] | None = None) -> None:
    """Connect a bus, subscribe to ``>`` and fork (from plain code: no event
    loop runs at that moment). The fork child tries the inherited instance
    (publish, subscribe, close), then publishes ``child.new`` from a new
    instance, reports on a pipe and waits (alive) until released; it leaves
    with ``os._exit``. The parent then publishes ``parent.after``, collects
    what its subscription received, closes its instance while the child is
    still alive, notes the bus's files, releases the child and sends the
    report."""
    kwargs = bus_kwargs or {}
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    bus = ShmBus(name, **kwargs)

    async def setup() -> Any:
        await bus.connect()
        return bus.subscribe(">")

    sub = loop.run_until_complete(setup())
    report_r, report_w = os.pipe()
    gate_r, gate_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # ── the fork child ──
        code = 1
        try:
            os.close(report_r)
            os.close(gate_w)
            results: dict[str, Any] = {}

            async def child_main() -> None:
                results["publish"] = _outcome(lambda: bus.publish_nowait("child.inherited", {}))
                results["subscribe"] = _outcome(lambda: bus.subscribe(">"))
                try:
                    await bus.close()
                except Exception as exc:
                    results["close"] = {"raised": type(exc).__name__, "message": str(exc)}
                else:
                    results["close"] = {"raised": None}
                fresh = ShmBus(name, **kwargs)
                await fresh.connect()
                await fresh.publish("child.new", {"pid": os.getpid()})
                results["new_bus_stats"] = dict(fresh.stats())
                await fresh.close()

            asyncio.run(child_main())
            os.write(report_w, json.dumps(results).encode())
            os.close(report_w)
            os.read(gate_r, 1)  # stay alive until the parent has closed
            code = 0
        finally:
            os._exit(code)
    # ── the parent ──
    os.close(report_w)
    os.close(gate_r)
    chunks = []
    while chunk := os.read(report_r, 65536):
        chunks.append(chunk)
    os.close(report_r)
    child_results = json.loads(b"".join(chunks) or b"null")

    async def after() -> dict[str, Any]:
        await bus.publish("parent.after", {"pid": os.getpid()})
        received = []
        while len(received) < 2:
            event = await asyncio.wait_for(anext(aiter(sub)), 30)
            received.append(event.topic)
        me = [s for s in read_bus(name).instances if s.pid == os.getpid()]
        report = {
            "received": received,
            "parent_alive_in_read_bus": bool(me) and me[0].alive,
            "parent_stats": dict(bus.stats()),
        }
        await bus.close()
        report["files_after_parent_close"] = resource_paths(name)
        return report

    try:
        report = loop.run_until_complete(after())
    finally:
        os.write(gate_w, b"x")
        os.close(gate_w)
        _, status = os.waitpid(pid, 0)
        loop.close()
    report["child"] = child_results
    report["child_exit"] = os.waitstatus_to_exitcode(status)
    conn.send(report)


def stalled_closer(
    conn: Connection, name: str, *, bus_kwargs: dict[str, Any] | None = None
) -> None:
    """Connect, send ``"attached"``; on ``"close"``, close the bus as its
    last instance, but stop inside the removal of its files right after the
    writer semaphore is unlinked (the segment is still there): send
    ``"removing"`` and block until killed. Wraps ``os.unlink``, which the
    removal calls for each file, semaphore first."""

    async def main() -> None:
        bus = ShmBus(name, **(bus_kwargs or {}))
        await bus.connect()
        unlink = os.unlink

        def unlink_then_stop(path: Any, *args: Any, **kwargs: Any) -> None:
            unlink(path, *args, **kwargs)
            if str(path).endswith(f"sem.shmbus.{name}:lock"):
                conn.send("removing")
                _block_forever()

        os.unlink = unlink_then_stop  # type: ignore[assignment]
        conn.send("attached")
        message = conn.recv()
        if message != "close":
            raise RuntimeError(f"stalled closer expected 'close', got {message!r}")
        await bus.close()
        raise RuntimeError("close() did not remove the bus's files")

    asyncio.run(main())
