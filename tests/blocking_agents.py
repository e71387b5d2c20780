"""Child-side behaviours for tests/test_blocking_processes.py (run by
:mod:`spawn`): processes that consume blocking subscriptions, or publish,
without an event loop unless they say so.

Messages: an agent sends ``"ready"`` once its subscriptions exist
(``subscribe_sync()`` returned) or, for a publisher, once it is connected;
the parent answers ``"go"`` (publish, or start taking), and ``"close"``
(close and send ``"closed"``). Events travel as ``(topic, payload)`` tuples;
a subscription's counters as ``statistics()`` turned into a dict.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import threading
from typing import Any

from shmbus_tools.children import BlockingLink

from shmbus import ShmBus, SubscriptionClosedError
from shmbus._core.ring import RingWriter
from shmbus.delivery import BlockingSubscription

#: Bound on a blocking wait in an agent: turns a hang into a report.
_PATIENCE = 60.0


def _take(sub: BlockingSubscription, count: int, end_topic: str | None) -> dict[str, Any]:
    """Take events until *count* are received or counted dropped, or one on
    *end_topic* arrives (not kept); report them and the counters."""
    received: list[tuple[str, dict[str, Any]]] = []
    error = None
    try:
        while len(received) + sub.dropped < count:
            event = sub.get(_PATIENCE)
            if event.topic == end_topic:
                break
            received.append((event.topic, event.payload))
    except (TimeoutError, SubscriptionClosedError) as exc:
        error = repr(exc)
    return {
        "received": received,
        "stats": dataclasses.asdict(sub.statistics()),
        "error": error,
    }


def blocking_subscriber(
    conn: BlockingLink,
    name: str,
    pattern: str,
    count: int,
    *,
    threads: int = 1,
    bus_kwargs: dict[str, Any] | None = None,
    wait_for_go: bool = False,
    end_topic: str | None = None,
) -> None:
    """No event loop. Connect and make *threads* blocking subscriptions to
    *pattern*, send ``"ready"`` (after ``"go"`` too, with *wait_for_go*: the
    subscriptions then read nothing until told), and have each thread take
    *count* events (see :func:`_take`). Send ``{"takes": [per thread],
    "bus": stats}``; close on ``"close"``."""
    bus = ShmBus(name, **(bus_kwargs or {}))
    bus.connect_sync()
    try:
        subs = [bus.subscribe_sync(pattern) for _ in range(threads)]
        conn.send("ready")
        if wait_for_go:
            conn.expect("go")
        takes: list[dict[str, Any]] = [{} for _ in subs]

        def run(index: int) -> None:
            takes[index] = _take(subs[index], count, end_topic)

        workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        conn.send({"takes": takes, "bus": dataclasses.asdict(bus.stats())})
        conn.expect("close")
    finally:
        bus.close_sync()
    conn.send("closed")


def async_subscriber(
    conn: BlockingLink,
    name: str,
    pattern: str,
    count: int,
    *,
    bus_kwargs: dict[str, Any] | None = None,
) -> None:
    """An asyncio subscriber: subscribe, send ``"ready"``, take *count*
    events, send them."""

    async def main() -> None:
        async with ShmBus(name, **(bus_kwargs or {})) as bus:
            async with bus.subscribe(pattern) as sub:
                conn.send("ready")
                received = []
                for _ in range(count):
                    event = await asyncio.wait_for(anext(aiter(sub)), _PATIENCE)
                    received.append((event.topic, event.payload))
                conn.send({"received": received})

    asyncio.run(main())


def plain_publisher(
    conn: BlockingLink,
    name: str,
    topic: str,
    count: int,
    *,
    pub_id: int = 0,
    bus_kwargs: dict[str, Any] | None = None,
) -> None:
    """No event loop: connect, send ``"ready"``, on ``"go"`` publish *count*
    events ``{"pub": pub_id, "seq": i}`` with ``publish_nowait``, send
    ``{"published": count}``; close on ``"close"``."""
    bus = ShmBus(name, **(bus_kwargs or {}))
    bus.connect_sync()
    try:
        conn.send("ready")
        while True:
            message = conn.recv()
            if message == "close":
                break
            if message != "go":
                raise RuntimeError(f"expected 'go' or 'close', got {message!r}")
            for seq in range(count):
                bus.publish_nowait(topic, {"pub": pub_id, "seq": seq})
            conn.send({"published": count})
    finally:
        bus.close_sync()
    conn.send("closed")


def stuck_publisher(
    conn: BlockingLink,
    name: str,
    topic: str,
    point: str,
    *,
    before: int = 0,
    stop: bool = False,
    bus_kwargs: dict[str, Any] | None = None,
) -> None:
    """No event loop: connect, send ``"ready"``, on ``"go"`` publish
    *before* events ``{"seq": i}``, then one more that halts at *point*:
    ``"mid-record"`` (written, not committed) or ``"committed"`` (committed,
    no reader rung yet). There it sends ``("halted", point)`` and either
    SIGSTOPs itself (*stop*; once continued it finishes, sends
    ``{"published": before + 1}`` and closes on ``"close"``) or blocks until
    it is killed."""
    halted = threading.Event()

    def halt() -> None:
        if halted.is_set():
            return
        halted.set()
        conn.send(("halted", point))
        if stop:
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            threading.Event().wait()  # until SIGKILL

    if point == "mid-record":

        def hook(stage: str) -> None:
            if armed and stage == "mid-record":
                halt()

        ShmBus._critical_section_hook = hook
    elif point == "committed":
        append = RingWriter.append

        def append_then_halt(self: RingWriter, topic: bytes, body: bytes, checksum: int) -> int:
            seq = append(self, topic, body, checksum)
            if armed:
                halt()
            return seq

        RingWriter.append = append_then_halt  # type: ignore[method-assign]
    else:
        raise ValueError(f"unknown point {point!r}")
    armed = False
    bus = ShmBus(name, **(bus_kwargs or {}))
    bus.connect_sync()
    try:
        conn.send("ready")
        conn.expect("go")
        for seq in range(before):
            bus.publish_nowait(topic, {"seq": seq})
        armed = True
        bus.publish_nowait(topic, {"seq": before})
        armed = False
        conn.send({"published": before + 1})
        conn.expect("close")
    finally:
        bus.close_sync()
    conn.send("closed")


def leaves_without_closing(
    conn: BlockingLink,
    name: str,
    pattern: str,
    *,
    thread: str,
    bus_kwargs: dict[str, Any] | None = None,
) -> None:
    """Subscribe with ``subscribe_sync`` and never close anything. *thread*:
    ``"none"`` (take one event in the main thread, then return),
    ``"daemon"`` or ``"worker"`` (a daemon or a non-daemon thread iterates
    the subscription, and the main thread returns while it waits). Sends
    ``"ready"`` once subscribed, and ``("took", payload)`` for each event a
    thread takes; the process then exits normally."""
    bus = ShmBus(name, **(bus_kwargs or {}))
    sub = bus.subscribe_sync(pattern)

    def iterate() -> None:
        for event in sub:
            conn.send(("took", event.payload))

    if thread == "none":
        conn.send("ready")
        conn.send(("took", sub.get(_PATIENCE).payload))
        return
    worker = threading.Thread(target=iterate, daemon=thread == "daemon")
    worker.start()
    conn.send("ready")
    conn.expect("return")


def forking_consumer(
    conn: BlockingLink, name: str, *, waiting: bool, bus_kwargs: dict[str, Any] | None = None
) -> None:
    """No event loop. Subscribe with ``subscribe_sync`` and, with *waiting*,
    have a thread wait in ``get()`` on it; fork (while it waits). The fork child reports what
    ``get()`` on the inherited subscription does, and whether a new bus of its
    own delivers to a blocking subscription, then leaves with ``os._exit``.
    The parent then publishes: its waiting thread gets the event. Sends
    ``{"child": ..., "parent_got": payload, "child_exit": code,
    "parent_reader_after_fork": (doorbells, live readers)}``."""
    import json

    bus = ShmBus(name, **(bus_kwargs or {}))
    sub = bus.subscribe_sync("fork.*")
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(sub.get(_PATIENCE).payload))
    if waiting:
        waiter.start()
        segment = bus._segment
        assert segment is not None
        reader = bus._sync_readers[sub]
        from shmbus._core.layout import OFF_SLEEP_FLAGS

        while segment.mm[OFF_SLEEP_FLAGS + reader.slot] != 1:  # the waiter sleeps
            threading.Event().wait(0.002)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        outcome: dict[str, Any] = {}
        try:
            try:
                sub.get(0)
                outcome["inherited"] = "returned an event"
            except Exception as exc:
                outcome["inherited"] = type(exc).__name__
            own = ShmBus(name, **(bus_kwargs or {}))
            with own.subscribe_sync("child.*") as mine:
                own.publish_nowait("child.x", {"n": 1})
                outcome["own"] = mine.get(_PATIENCE).payload
            own.close_sync()
        except Exception as exc:
            outcome["error"] = repr(exc)
        os.write(write_end, json.dumps(outcome).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child = json.loads(pipe.read())
    _, status = os.waitpid(pid, 0)
    from shmbus._core.inspection import read_bus
    from shmbus._core.shmfiles import bus_file_paths

    # What the child left of the parent's reader: its doorbell, its live slot.
    bells = [path for path in bus_file_paths(name) if "/sem.shmbus." in path]
    readers = read_bus(name).readers
    bus.publish_nowait("fork.x", {"n": 2})
    if not waiting:
        waiter.start()
    waiter.join(_PATIENCE)
    bus.close_sync()
    conn.send(
        {
            "child": child,
            "parent_got": got,
            "child_exit": os.waitstatus_to_exitcode(status),
            "parent_reader_after_fork": (len(bells), readers),
        }
    )
