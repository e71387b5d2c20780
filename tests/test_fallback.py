"""FallbackBus against a real nats-server that goes away and comes back."""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from awaiting import take, wait_until
from conftest import SMALL_RING
from group_agents import overlap_publisher
from shmbus_tools.children import Agent, running
from shmbus_tools.servers import NatsServer, free_port

from shmbus import Event, ShmBus, Subscription
from shmbus.fallback import FallbackBus
from shmbus.nats import NatsBus

#: Fast reconnects keep the outage test short; the overlap still covers a
#: subscriber that reconnects a few reconnect_time_waits after the publisher.
RECONNECT = {"reconnect_time_wait": 0.1, "connect_timeout": 1.0}
OVERLAP = 1.0
#: Bound on a child process's run (the box is shared).
FINISH = 60.0

pytestmark = pytest.mark.usefixtures("no_resource_tracker_left")


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    with NatsServer() as server:
        yield server


@pytest.fixture
async def make_bus(bus_name: str) -> AsyncIterator[Callable[[str], FallbackBus]]:
    """Builds FallbackBus instances sharing one shm bus (one host), and
    closes them all at the end."""
    made: list[FallbackBus] = []

    def make(url: str) -> FallbackBus:
        bus = FallbackBus(
            NatsBus(url, **RECONNECT),  # type: ignore[arg-type]
            ShmBus(bus_name, **SMALL_RING),
            overlap=OVERLAP,
        )
        made.append(bus)
        return bus

    try:
        yield make
    finally:
        for bus in made:
            await bus.close()


async def _connected_pair(
    make_bus: Callable[[str], FallbackBus], url: str, *, nats_up: bool = True
) -> tuple[FallbackBus, FallbackBus]:
    """Two connected buses; with *nats_up*, once both publish on NATS
    (connect() returns before NATS answers)."""
    publisher, subscriber = make_bus(url), make_bus(url)
    await publisher.connect()
    await subscriber.connect()
    if nats_up:
        await wait_until(
            lambda: publisher.using_nats and subscriber.using_nats, what="both to reach NATS"
        )
    return publisher, subscriber


def _numbers(events: list[Event]) -> list[int]:
    return sorted(event.payload["i"] for event in events)


async def test_subscriber_gets_every_event_exactly_once_across_a_nats_outage(
    nats_server: NatsServer, make_bus: Callable[[str], FallbackBus]
) -> None:
    publisher, subscriber = await _connected_pair(make_bus, nats_server.url)
    sub = subscriber.subscribe("stream.>")
    await subscriber.primary.flush()
    counter = itertools.count()

    async def publish(count: int) -> None:
        for _ in range(count):
            await publisher.publish("stream.tick", {"i": next(counter)})

    await wait_until(lambda: not publisher.double_sending, what="the start-up overlap to end")
    await publish(50)  # NATS only
    nats_server.stop()
    await publish(50)  # the publisher may not have noticed yet
    await wait_until(lambda: not publisher.using_nats, what="the publisher to fall back")
    await publish(50)  # shm
    nats_server.restart()
    await publish(50)  # shm, or NATS and shm if the publisher is back already
    await wait_until(lambda: publisher.using_nats, what="the publisher to reconnect")
    await publish(50)  # NATS and shm, the subscriber may still be reconnecting
    await wait_until(lambda: subscriber.using_nats, what="the subscriber to reconnect")
    await wait_until(lambda: not publisher.double_sending, what="the overlap to end")
    await publish(50)  # NATS only
    total = next(counter)

    events = await take(sub, total, timeout=30)
    await publisher.publish("stream.last", {"i": -1})
    [last] = await take(sub, 1)  # nothing else (no duplicate) was queued before it

    assert _numbers(events) == list(range(total))
    assert last.topic == "stream.last"
    assert publisher.routes()["nats"] > 0 and publisher.routes()["shm"] > 0


async def test_event_carried_by_both_transports_is_delivered_once(
    nats_server: NatsServer, make_bus: Callable[[str], FallbackBus]
) -> None:
    publisher, subscriber = await _connected_pair(make_bus, nats_server.url)
    sub = subscriber.subscribe("twice.*")
    await subscriber.primary.flush()
    assert publisher.double_sending  # right after connecting: NATS and shm
    await publisher.publish("twice.sent", {"n": 1})
    await wait_until(lambda: subscriber.duplicates == 1, what="the second copy to be dropped")
    await publisher.publish("twice.last", {"n": 2})
    events = await take(sub, 2)
    assert [e.topic for e in events] == ["twice.sent", "twice.last"]


async def test_an_event_sent_on_both_transports_reaches_one_member_of_a_group_on_one_bus(
    nats_server: NatsServer, make_bus: Callable[[str], FallbackBus], bus_name: str
) -> None:
    """A publisher in another process is in its overlap: each event goes to
    NATS and to shm, and each transport gives its copy to one member of the
    group, not always the same one. The members on one FallbackBus share one
    memory of ids, so only the first copy is delivered."""
    count = 200
    workers = make_bus(nats_server.url)
    await workers.connect()
    await wait_until(lambda: workers.using_nats, what="the workers' bus to reach NATS")
    members = [workers.subscribe("job.*", queue="pool") for _ in range(2)]
    await workers.primary.flush()  # both SUBs are on the server
    got: list[int] = []

    async def consume(sub: Subscription) -> None:
        async for event in sub:
            got.append(event.payload["n"])

    consumers = [asyncio.create_task(consume(sub)) for sub in members]
    publisher = Agent(
        overlap_publisher, nats_server.url, bus_name, "job.n", count, bus_kwargs=SMALL_RING
    )
    with running(publisher):
        report = await asyncio.to_thread(publisher.recv, FINISH)
    await wait_until(
        lambda: len(got) + workers.duplicates == 2 * count, what="both copies of every event"
    )
    for task in consumers:
        task.cancel()
    assert report["routes"] == {"nats": count, "shm": count}  # every event went both ways
    assert sorted(got) == list(range(count))  # each to one member, once
    assert sum(sub.delivered for sub in members) == count


async def test_publishes_on_shm_while_nats_is_unreachable_and_switches_when_it_appears(
    make_bus: Callable[[str], FallbackBus],
) -> None:
    server = NatsServer(port=free_port())
    try:
        publisher, subscriber = await _connected_pair(make_bus, server.url, nats_up=False)
        sub = subscriber.subscribe("boot.*")
        await publisher.publish("boot.early", {})
        [early] = await take(sub, 1)
        server.start()
        await wait_until(
            lambda: publisher.using_nats and subscriber.using_nats, what="both to connect"
        )
        await wait_until(lambda: not publisher.double_sending, what="the overlap to end")
        await publisher.publish("boot.late", {})
        [late] = await take(sub, 1)
    finally:
        server.close()
    assert (early.topic, late.topic) == ("boot.early", "boot.late")
    assert publisher.routes() == {"nats": 1, "shm": 1}


async def test_publish_while_nats_is_down_goes_to_shm_without_errors(
    nats_server: NatsServer, make_bus: Callable[[str], FallbackBus]
) -> None:
    publisher, subscriber = await _connected_pair(make_bus, nats_server.url)
    sub = subscriber.subscribe("down.*")
    nats_server.stop()
    await wait_until(lambda: not publisher.primary.connected, what="the outage to be noticed")
    await publisher.publish("down.event", {"ok": 1})
    [event] = await take(sub, 1)
    assert event.payload == {"ok": 1}
    assert publisher.primary.stats().publish_errors == 0


async def test_envelope_over_the_smaller_limit_raises_value_error_naming_both(
    nats_server: NatsServer, make_bus: Callable[[str], FallbackBus]
) -> None:
    publisher = make_bus(nats_server.url)
    await publisher.connect()
    limit = SMALL_RING["max_event_size"]
    with pytest.raises(ValueError, match=rf"limit is {limit} bytes.*{limit}.*max_payload 1048576"):
        await publisher.publish("big.event", {"blob": "x" * (limit + 1)})


async def test_close_ends_subscriptions_and_is_idempotent(
    nats_server: NatsServer, make_bus: Callable[[str], FallbackBus]
) -> None:
    bus = make_bus(nats_server.url)
    await bus.connect()
    sub = bus.subscribe("bye.*")
    await bus.close()
    await bus.close()
    assert sub.closed
    assert [event async for event in sub] == []
    with pytest.raises(RuntimeError, match="closed"):
        await bus.publish("bye.now", {})


async def test_aclose_ends_the_subscription_on_both_transports(
    nats_server: NatsServer, make_bus: Callable[[str], FallbackBus]
) -> None:
    bus = make_bus(nats_server.url)
    await bus.connect()
    sub = bus.subscribe("gone.*")
    await sub.aclose()
    assert [event async for event in sub] == []
    stats = (bus.stats(), bus.primary.stats(), bus.fallback.stats())
    assert [s.subscriptions for s in stats] == [0, 0, 0]


def test_fallback_must_be_a_shm_bus() -> None:
    with pytest.raises(TypeError, match="ShmBus"):
        FallbackBus(NatsBus(), NatsBus())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        ({"queue_size": 0}, ValueError, ["queue_size", "at least 1", "got 0"]),
        ({"queue_size": 2.0}, TypeError, ["queue_size", "an int", "float", "2.0"]),
        ({"dedupe_size": True}, TypeError, ["dedupe_size", "an int", "bool", "True"]),
        ({"dedupe_size": 0}, ValueError, ["dedupe_size", "at least 1", "got 0"]),
        ({"overlap": -0.5}, ValueError, ["overlap", "at least 0", "-0.5"]),
        ({"overlap": "1"}, TypeError, ["overlap", "seconds", "'1'"]),
        ({"retry_interval": 0}, ValueError, ["retry_interval", "above 0", "got 0"]),
        ({"retry_interval": float("nan")}, ValueError, ["retry_interval", "finite", "nan"]),
    ],
)
def test_a_bad_option_value_is_refused_naming_the_option_the_value_and_the_limit(
    bus_name: str, options: dict[str, object], error: type[Exception], words: list[str]
) -> None:
    """A wrong type is a TypeError, a value out of range a ValueError."""
    with pytest.raises(error) as info:
        FallbackBus(NatsBus(), ShmBus(bus_name), **options)  # type: ignore[arg-type]
    assert all(word in str(info.value) for word in words), str(info.value)


async def test_publish_nowait_from_a_thread_reaches_a_subscriber_once(
    nats_server: NatsServer, make_bus: Callable[[str], FallbackBus]
) -> None:
    publisher, subscriber = await _connected_pair(make_bus, nats_server.url)
    sub = subscriber.subscribe("threads.*")
    await subscriber.primary.flush()
    thread = threading.Thread(
        target=lambda: [publisher.publish_nowait("threads.t", {"i": i}) for i in range(5)]
    )
    thread.start()
    events = await take(sub, 5)
    thread.join()
    await publisher.publish("threads.last", {"i": 5})
    [last] = await take(sub, 1)
    assert _numbers([*events, last]) == [0, 1, 2, 3, 4, 5]


# ─── Start-up does not wait for NATS ─────────────────────────────────────────


@pytest.fixture
def silent_server() -> Iterator[str]:
    """The URL of a server that accepts connections and never answers (a
    NATS client waits for its INFO until its timeout)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield f"nats://127.0.0.1:{listener.getsockname()[1]}"


async def test_connect_returns_without_waiting_for_a_nats_that_does_not_answer(
    bus_name: str, silent_server: str
) -> None:
    """With a NATS connect timeout of ten minutes, connect() still returns
    (the bound only turns a hang into a failure) and the bus works on shm."""
    bus = FallbackBus(
        NatsBus(silent_server, connect_timeout=600), ShmBus(bus_name, **SMALL_RING)
    )
    try:
        await asyncio.wait_for(bus.connect(), 30)
        sub = bus.subscribe("early.*")
        await bus.publish("early.event", {"n": 1})
        [event] = await take(sub, 1)
        assert not bus.using_nats
    finally:
        await asyncio.wait_for(bus.close(), 30)
    assert event.payload == {"n": 1}
    assert bus.routes() == {"nats": 0, "shm": 1}


async def test_events_published_before_and_after_nats_answers_arrive_once_each(
    make_bus: Callable[[str], FallbackBus],
) -> None:
    server = NatsServer(port=free_port())
    try:
        publisher, subscriber = await _connected_pair(make_bus, server.url, nats_up=False)
        sub = subscriber.subscribe("boot.>")
        counter = itertools.count()
        for _ in range(20):
            await publisher.publish("boot.n", {"i": next(counter)})
        server.start()
        while not (publisher.using_nats and subscriber.using_nats):
            await publisher.publish("boot.n", {"i": next(counter)})
            await asyncio.sleep(0.01)  # pace the publisher while the clients connect
        for _ in range(20):
            await publisher.publish("boot.n", {"i": next(counter)})
        total = next(counter)
        events = await take(sub, total, timeout=30)
        await publisher.publish("boot.last", {"i": -1})
        [last] = await take(sub, 1)
    finally:
        server.close()
    assert _numbers(events) == list(range(total))
    assert last.topic == "boot.last"  # no duplicate was queued before it
    assert publisher.routes()["nats"] > 0
