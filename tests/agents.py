"""Child-side behaviours for the cross-process tests (run by
:class:`shmbus_tools.children.Agent`).

Every function takes its link to the parent first, connects its own
:class:`~shmbus.ShmBus` and talks to the parent in small messages:

* ``"ready"`` is sent only once the agent's subscription exists
  (``subscribe()`` returned) or, for a publisher, once it is connected;
* the parent answers ``"go"`` / ``"stop"`` / ``"drain"`` / ``"close"``;
* a final *report* dict carries what the agent saw and its counters.

Events are reported as ``(topic, payload)`` tuples; a report's ``"sub"`` is
``sub.statistics()`` as a dict plus ``evicted`` (queue overflow) and ``lost``
(skipped in the ring), and ``"bus"`` is ``bus.stats()`` as a dict.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from shmbus_tools.children import AsyncLink, BlockingLink

from shmbus import ShmBus, ShmBusError
from shmbus.delivery import QueueSubscription

Received = list[tuple[str, dict[str, Any]]]

#: How often a collecting agent re-checks counters that change without an
#: event being delivered (events counted as dropped), in seconds.
_RECHECK = 0.05


# ─── Helpers ────────────────────────────────────────────────────────────────


async def _collect(
    sub: QueueSubscription,
    received: Received,
    *,
    count: int | None,
    stop: asyncio.Event,
    timeout: float,
) -> None:
    """Append events to *received* until ``len(received) + dropped`` reaches
    *count* (None: no count), *stop* is set, or *timeout* seconds pass."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    stopper = asyncio.ensure_future(stop.wait())
    pending: asyncio.Future[Any] | None = None
    try:
        while not stop.is_set():
            if count is not None and len(received) + sub.dropped >= count:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            if pending is None:
                pending = asyncio.ensure_future(sub.__anext__())
            await asyncio.wait(
                {pending, stopper},
                timeout=min(remaining, _RECHECK),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not pending.done():
                continue
            event = pending.result()
            pending = None
            received.append((event.topic, event.payload))
            # Whatever is already queued comes without waiting.
            while sub.statistics().queued and not (
                count is not None and len(received) + sub.dropped >= count
            ):
                event = await sub.__anext__()
                received.append((event.topic, event.payload))
    finally:
        stopper.cancel()
        if pending is not None:
            pending.cancel()


async def _linger(sub: QueueSubscription, received: Received, quiet: float) -> None:
    """Keep collecting until no event arrives for *quiet* seconds (catches
    duplicates or strays that would arrive after the expected ones)."""
    while True:
        try:
            event = await asyncio.wait_for(sub.__anext__(), quiet)
        except TimeoutError:
            return
        received.append((event.topic, event.payload))


def _spin_until(instant: float) -> None:
    """Busy-wait until ``time.monotonic()`` (one clock for every process of
    the host) reaches *instant*: lines processes up to within microseconds,
    to provoke races, which a sleep's wake-up jitter would blur."""
    while time.monotonic() < instant:
        pass


def _report(bus: ShmBus, sub: QueueSubscription, received: Received) -> dict[str, Any]:
    return {
        "received": received,
        "sub": {
            **dataclasses.asdict(sub.statistics()),
            "evicted": sub.evicted,
            "lost": sub.lost,
        },
        "bus": dict(bus.stats()),
    }


# ─── Agents ─────────────────────────────────────────────────────────────────


def subscriber(
    link: BlockingLink,
    name: str,
    pattern: str,
    *,
    count: int | None = None,
    bus_kwargs: dict[str, Any] | None = None,
    timeout: float = 30.0,
    linger: float = 0.0,
) -> None:
    """Subscribe to *pattern*, send ``"ready"``, collect until *count* events
    are received or counted dropped (or ``"stop"``, or *timeout*), keep
    collecting for *linger* quiet seconds, then send the report."""

    async def main() -> None:
        bus = ShmBus(name, **(bus_kwargs or {}))
        await bus.connect()
        try:
            sub = bus.subscribe(pattern)
            inbox = AsyncLink(link)
            link.send("ready")
            received: Received = []
            await _collect(sub, received, count=count, stop=inbox.stopped, timeout=timeout)
            if linger:
                await _linger(sub, received, linger)
            report = _report(bus, sub, received)
            inbox.close()
        finally:
            await bus.close()
        link.send(report)

    asyncio.run(main())


def publisher(
    link: BlockingLink,
    name: str,
    pub_id: int,
    topics: Sequence[str],
    count: int,
    *,
    bus_kwargs: dict[str, Any] | None = None,
    pad: int = 0,
    pace: tuple[int, float] | None = None,
    progress_at: int | None = None,
    rounds: int = 1,
) -> None:
    """Connect, send ``"ready"``, then *rounds* times: wait for ``"go"``,
    publish *count* events (event ``i`` on ``topics[i % len(topics)]`` with
    payload ``{"pub": pub_id, "seq": i}`` plus *pad* bytes of filler; ``seq``
    goes on counting across rounds) and send ``{"published": ..., "bus":
    stats}``. Closes after the last round.

    *pace* ``(n, seconds)`` sleeps *seconds* after every *n* events;
    *progress_at* sends ``"progress"`` once that many events of a round are out.
    """

    async def main() -> None:
        bus = ShmBus(name, **(bus_kwargs or {}))
        await bus.connect()
        try:
            link.send("ready")
            filler = {"pad": "x" * pad} if pad else {}
            for first in range(0, rounds * count, count):
                message = link.recv()
                if message != "go":
                    raise RuntimeError(f"publisher expected 'go', got {message!r}")
                for i in range(count):
                    payload = {"pub": pub_id, "seq": first + i, **filler}
                    await bus.publish(topics[i % len(topics)], payload)
                    if progress_at is not None and i + 1 == progress_at:
                        link.send("progress")
                    if pace is not None and (i + 1) % pace[0] == 0:
                        await asyncio.sleep(pace[1])
                link.send({"published": count, "bus": dict(bus.stats())})
        finally:
            await bus.close()

    asyncio.run(main())


def stalled_subscriber(
    link: BlockingLink,
    name: str,
    pattern: str,
    *,
    bus_kwargs: dict[str, Any] | None = None,
    quiet: float = 0.3,
    timeout: float = 30.0,
) -> None:
    """Subscribe, send ``"ready"``, then stall: block the event loop (as a
    consumer stuck in synchronous work would, so the bus's reader cannot run
    either) until ``("drain", expected)`` arrives. Then consume until
    received + dropped reaches *expected* and no event has come for *quiet*
    seconds, and send the report."""

    async def main() -> None:
        bus = ShmBus(name, **(bus_kwargs or {}))
        await bus.connect()
        try:
            sub = bus.subscribe(pattern)
            link.send("ready")
            message = link.recv()  # blocks the loop on purpose
            if not (isinstance(message, tuple) and message[0] == "drain"):
                raise RuntimeError(f"stalled subscriber expected ('drain', n), got {message!r}")
            received: Received = []
            await _collect(sub, received, count=message[1], stop=asyncio.Event(), timeout=timeout)
            await _linger(sub, received, quiet)
            report = _report(bus, sub, received)
        finally:
            await bus.close()
        link.send(report)

    asyncio.run(main())


def subscriber_behind(
    link: BlockingLink,
    name: str,
    pattern: str,
    *,
    count: int,
    bus_kwargs: dict[str, Any] | None = None,
    timeout: float = 30.0,
    linger: float = 0.0,
) -> None:
    """Open a first subscription to *pattern* and send ``"ready"``; then,
    with the event loop blocked (so the instance's reader falls behind
    whatever is published meanwhile), wait for ``"subscribe"``, open a second
    subscription and send ``"ready"``. Collect *count* events on the second
    one (plus *linger*), then report it, with the first one's events under
    ``"first"``."""

    async def main() -> None:
        bus = ShmBus(name, **(bus_kwargs or {}))
        await bus.connect()
        try:
            first = bus.subscribe(pattern)
            link.send("ready")
            message = link.recv()  # blocks the loop on purpose
            if message != "subscribe":
                raise RuntimeError(f"expected 'subscribe', got {message!r}")
            late = bus.subscribe(pattern)
            link.send("ready")
            received: Received = []
            await _collect(late, received, count=count, stop=asyncio.Event(), timeout=timeout)
            if linger:
                await _linger(late, received, linger)
            report = _report(bus, late, received)
            first_received: Received = []
            await _collect(first, first_received, count=None, stop=asyncio.Event(), timeout=0)
            while first.statistics().queued:
                event = await first.__anext__()
                first_received.append((event.topic, event.payload))
            report["first"] = first_received
        finally:
            await bus.close()
        link.send(report)

    asyncio.run(main())


def self_publisher(
    link: BlockingLink,
    name: str,
    pattern: str,
    topic: str,
    count: int,
    *,
    bus_kwargs: dict[str, Any] | None = None,
    timeout: float = 30.0,
) -> None:
    """Subscribe to *pattern* and publish *count* events on *topic* from the
    same instance; report what that subscription received."""

    async def main() -> None:
        bus = ShmBus(name, **(bus_kwargs or {}))
        await bus.connect()
        try:
            sub = bus.subscribe(pattern)
            for i in range(count):
                await bus.publish(topic, {"seq": i})
            received: Received = []
            await _collect(sub, received, count=count, stop=asyncio.Event(), timeout=timeout)
            report = _report(bus, sub, received)
        finally:
            await bus.close()
        link.send(report)

    asyncio.run(main())


def subscribe_rounds(
    link: BlockingLink,
    name: str,
    pattern: str,
    rounds: int,
    *,
    fresh_instance: bool,
    bus_kwargs: dict[str, Any] | None = None,
    timeout: float = 10.0,
) -> None:
    """For each round ``i``: subscribe (on a new instance, or as a further
    subscription on one instance whose reader already runs), send
    ``("ready", i)`` and answer ``("got", i, topic, payload)`` with the
    first event that arrives, or ``("missed", i)`` after *timeout* s."""

    async def one_round(bus: ShmBus, i: int) -> None:
        sub = bus.subscribe(pattern)
        link.send(("ready", i))
        try:
            event = await asyncio.wait_for(sub.__anext__(), timeout)
        except TimeoutError:
            link.send(("missed", i))
        else:
            link.send(("got", i, event.topic, event.payload))
        finally:
            await sub.aclose()

    async def main() -> None:
        kwargs = bus_kwargs or {}
        if fresh_instance:
            for i in range(rounds):
                bus = ShmBus(name, **kwargs)
                await bus.connect()
                try:
                    await one_round(bus, i)
                finally:
                    await bus.close()
            return
        bus = ShmBus(name, **kwargs)
        await bus.connect()
        try:
            keeper = bus.subscribe(pattern)  # keeps the instance's reader running
            for i in range(rounds):
                await one_round(bus, i)
            await keeper.aclose()
        finally:
            await bus.close()

    asyncio.run(main())


def holder(
    link: BlockingLink,
    name: str,
    *,
    bus_kwargs: dict[str, Any] | None = None,
    pattern: str | None = None,
    publish: str | None = None,
    rounds: int = 1,
) -> None:
    """*rounds* times: connect (and subscribe to *pattern*, and publish one
    event on topic *publish*, if given), send ``"attached"``, wait for
    ``"close"`` (or ``("close_at", t)``: close when ``time.monotonic()``
    reaches *t*), close, send ``"closed"``; before each round after the
    first, wait for ``"again"``. If connecting raises a shmbus error, send
    ``("refused", type name, message)`` instead and stop."""

    async def main() -> None:
        for round_ in range(rounds):
            if round_:
                message = link.recv()
                if message != "again":
                    raise RuntimeError(f"holder expected 'again', got {message!r}")
            bus = ShmBus(name, **(bus_kwargs or {}))
            try:
                await bus.connect()
            except ShmBusError as exc:
                link.send(("refused", type(exc).__name__, str(exc)))
                return
            try:
                if pattern is not None:
                    bus.subscribe(pattern)
                if publish is not None:
                    bus.publish_nowait(publish, {"holder": round_})
                link.send("attached")
                message = link.recv()
                if isinstance(message, tuple) and message[0] == "close_at":
                    _spin_until(message[1])
                elif message != "close":
                    raise RuntimeError(f"holder expected 'close', got {message!r}")
            finally:
                await bus.close()
            link.send("closed")

    asyncio.run(main())


def peer(
    link: BlockingLink,
    name: str,
    pattern: str,
    publish: Sequence[tuple[str, int]],
    count: int,
    *,
    bus_kwargs: dict[str, Any] | None = None,
    timeout: float = 30.0,
    linger: float = 0.2,
) -> None:
    """Connect with *bus_kwargs*, subscribe to *pattern* and send ``("ready",
    geometry)``: the instance's ``capacity``, ``max_event_size`` and
    ``queue_size`` after connect. On ``"go"``, publish one event per
    ``(topic, blob_size)`` of *publish* (payload ``{"seq": i, "blob": "x" *
    blob_size}``) and send ``"published"``; then collect *count* events (plus
    *linger*) and send the report, whose ``"received"`` lists ``(topic,
    seq, blob size)`` instead of whole payloads."""

    async def main() -> None:
        bus = ShmBus(name, **(bus_kwargs or {}))
        await bus.connect()
        try:
            sub = bus.subscribe(pattern)
            link.send(
                (
                    "ready",
                    {
                        "capacity": bus.capacity,
                        "max_event_size": bus.max_event_size,
                        "queue_size": bus.queue_size,
                    },
                )
            )
            message = link.recv()
            if message != "go":
                raise RuntimeError(f"peer expected 'go', got {message!r}")
            for seq, (topic, blob_size) in enumerate(publish):
                await bus.publish(topic, {"seq": seq, "blob": "x" * blob_size})
            link.send("published")
            received: Received = []
            await _collect(sub, received, count=count, stop=asyncio.Event(), timeout=timeout)
            if linger:
                await _linger(sub, received, linger)
            report = _report(bus, sub, [])
            report["received"] = [
                (topic, payload["seq"], len(payload["blob"])) for topic, payload in received
            ]
        finally:
            await bus.close()
        link.send(report)

    asyncio.run(main())


#: Instances :func:`publish_and_return` keeps alive until the process exits.
_KEPT: list[ShmBus] = []


def publish_and_return(link: BlockingLink, name: str, topic: str, *, keep: bool) -> None:
    """Publish one event on a new instance without an event loop and without
    ever closing it, send ``"published"`` and return (the process then exits
    normally). *keep*: hold a reference to the instance until exit; else
    drop it at once, as ``ShmBus(name).publish_nowait(...)`` does."""
    if keep:
        bus = ShmBus(name)
        bus.publish_nowait(topic, {"kept": True})
        _KEPT.append(bus)
    else:
        ShmBus(name).publish_nowait(topic, {"kept": False})
    link.send("published")
