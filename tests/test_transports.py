"""The bus contract, run over every transport in this package.

``bus`` is each transport that really delivers (shared memory, in-process);
``any_bus`` adds the null transport. Transport-specific behaviour (ShmBus
names, sizes and files in /dev/shm; NullBus) comes after the shared tests.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import pytest
from conftest import SMALL_RING, new_bus_name

from shmbus import (
    BaseBus,
    Event,
    IncompatibleSegmentError,
    MemoryBus,
    NullBus,
    QueueSubscription,
    SegmentSpaceError,
    ShmBus,
    Subscription,
    SubscriptionStatistics,
)
from shmbus._core import ofd
from shmbus._core.inspection import read_bus
from shmbus._core.layout import (
    LAYOUT_VERSION,
    LOCK_ATTACH,
    RECORD_HEADER_SIZE,
    RING_OFFSET,
    W_WRITE_CURSOR,
)
from shmbus._core.leftovers import cleanup
from shmbus._core.shmfiles import MAX_BUS_NAME_LENGTH, bus_file_paths, segment_path
from shmbus.codec import encode_envelope
from shmbus.contract import MAX_TOPIC_LENGTH

#: Bound for "ends promptly": generous for a loaded machine, never reached
#: unless the behaviour is broken.
PROMPTLY = 1.0
#: Bound for an event to arrive.
ARRIVAL = 5.0
MAX_EVENT = SMALL_RING["max_event_size"]


# ─── Helpers ─────────────────────────────────────────────────────────────────


async def next_event(sub: Subscription, timeout: float = ARRIVAL) -> Event:
    return await asyncio.wait_for(sub.__anext__(), timeout)


async def eventually(predicate: Callable[[], bool], timeout: float = ARRIVAL) -> None:
    """Let the loop run until *predicate()* holds; fail after *timeout* s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not reached within {timeout} s")
        await asyncio.sleep(0.001)


async def blocked_consumer(sub: Subscription) -> tuple[asyncio.Task[list[Event]], asyncio.Event]:
    """Start a task iterating *sub* and collecting what it receives.

    Returns the task and an event set when it has received something: from
    then on the task is blocked in ``async for`` (it cannot yield elsewhere).
    """
    first = asyncio.Event()

    async def consume() -> list[Event]:
        out = []
        async for event in sub:
            out.append(event)
            first.set()
        return out

    return asyncio.create_task(consume()), first


async def assert_bus_works(bus: BaseBus) -> None:
    """The bus still publishes (and, unless null, delivers)."""
    if isinstance(bus, NullBus):
        before = bus.stats()["published"]
        await bus.publish("still.works", {"ok": True})
        assert bus.stats()["published"] == before + 1
        return
    async with bus.subscribe("still.>") as sub:
        await bus.publish("still.works", {"ok": True})
        event = await next_event(sub)
    assert (event.topic, event.payload) == ("still.works", {"ok": True})


def make_bus(kind: str, **options: Any) -> BaseBus:
    """A new, unconnected bus of *kind* with a unique name."""
    if kind == "shm":
        return ShmBus(new_bus_name(kind), **{**SMALL_RING, **options})
    cls = MemoryBus if kind == "memory" else NullBus
    return cls(max_event_size=MAX_EVENT, **options)


@pytest.fixture
async def buses() -> AsyncIterator[list[BaseBus]]:
    """A list to put extra buses in; every one is closed at the end."""
    made: list[BaseBus] = []
    try:
        yield made
    finally:
        for each in made:
            await each.close()


# ─── Delivery ────────────────────────────────────────────────────────────────


async def test_subscriber_receives_an_event_published_after_subscribe(bus):
    sub = bus.subscribe("orders.created")
    await bus.publish("orders.created", {"id": 7}, event_type="order.created")
    event = await next_event(sub)
    assert event.topic == "orders.created"
    assert event.payload == {"id": 7}
    assert event.type == "order.created"
    assert event.v == 1
    assert len(event.id) == 32
    await sub.aclose()


async def test_each_received_event_has_its_own_id(bus):
    sub = bus.subscribe("a")
    for _ in range(20):
        await bus.publish("a", {})
    ids = {(await next_event(sub)).id for _ in range(20)}
    assert len(ids) == 20
    await sub.aclose()


async def test_star_matches_exactly_one_token(bus):
    sub = bus.subscribe("a.*.c")
    for topic in ("a.x.y.c", "a.c", "a.x.c.d", "b.x.c", "a.x.c"):
        await bus.publish(topic, {})
    assert (await next_event(sub)).topic == "a.x.c"
    await sub.aclose()


async def test_gt_matches_one_or_more_trailing_tokens(bus):
    sub = bus.subscribe("a.>")
    for topic in ("a", "b.a", "ab.c", "a.b", "a.b.c.d"):
        await bus.publish(topic, {})
    assert [(await next_event(sub)).topic for _ in range(2)] == ["a.b", "a.b.c.d"]
    await sub.aclose()


async def test_non_matching_topics_are_not_delivered(bus):
    sub = bus.subscribe("wanted")
    await bus.publish("unwanted", {"n": 1})
    await bus.publish("wanted.not", {"n": 2})
    await bus.publish("wanted", {"n": 3})
    assert (await next_event(sub)).payload == {"n": 3}
    assert bus.stats()["dropped"] == 0
    await sub.aclose()


async def test_each_subscription_receives_every_matching_event(bus):
    subs = [bus.subscribe(pattern) for pattern in ("a.b", "a.*", "a.>", ">")]
    await bus.publish("a.b", {"n": 1})
    for sub in subs:
        event = await next_event(sub)
        assert (event.topic, event.payload) == ("a.b", {"n": 1})
    for sub in subs:
        await sub.aclose()


async def test_two_subscriptions_with_the_same_pattern_each_get_a_copy(bus):
    first, second = bus.subscribe("x"), bus.subscribe("x")
    await bus.publish("x", {"n": 1})
    assert (await next_event(first)).payload == {"n": 1}
    assert (await next_event(second)).payload == {"n": 1}
    await first.aclose()
    await second.aclose()


async def test_mutating_a_received_payload_does_not_change_another_subscriptions_copy(bus):
    first, second = bus.subscribe("x"), bus.subscribe("x")
    await bus.publish("x", {"items": [1]})
    mine = await next_event(first)
    mine.payload["items"].append(2)
    mine.payload["extra"] = True
    theirs = await next_event(second)
    assert theirs.payload == {"items": [1]}
    await first.aclose()
    await second.aclose()


async def test_events_from_one_publisher_arrive_in_publish_order(bus):
    sub = bus.subscribe("seq.>")
    for i in range(200):
        await bus.publish(f"seq.{i % 3}", {"i": i})
    assert [(await next_event(sub)).payload["i"] for _ in range(200)] == list(range(200))
    await sub.aclose()


async def test_async_with_and_async_for_receive_events(bus):
    received = []
    async with bus.subscribe("loop.*") as sub:
        for i in range(3):
            await bus.publish(f"loop.{i}", {"i": i})
        async for event in sub:
            received.append(event.payload["i"])
            if len(received) == 3:
                break
    assert received == [0, 1, 2]
    assert sub.closed


async def test_a_subscription_gets_no_events_published_before_it_existed(bus):
    await bus.publish("history.old", {"n": 1})
    sub = bus.subscribe("history.>")
    await bus.publish("history.new", {"n": 2})
    assert (await next_event(sub)).topic == "history.new"
    await sub.aclose()


async def test_a_new_subscription_gets_no_history_even_while_others_have_events_pending(bus):
    """Events already published but not yet routed to an older subscription
    must not reach a newer one."""
    older = bus.subscribe("h.>")
    for i in range(5):
        await bus.publish("h.old", {"i": i})
    newer = bus.subscribe("h.>")
    await bus.publish("h.new", {"i": 5})
    assert (await next_event(newer)).topic == "h.new"
    assert [(await next_event(older)).payload["i"] for _ in range(6)] == list(range(6))
    await older.aclose()
    await newer.aclose()


async def test_subscribing_again_after_the_last_subscription_closed_works(bus):
    first = bus.subscribe("again")
    await first.aclose()
    await bus.publish("again", {"n": 1})
    second = bus.subscribe("again")
    await bus.publish("again", {"n": 2})
    assert (await next_event(second)).payload == {"n": 2}
    await second.aclose()


async def test_a_topic_of_the_maximum_length_is_delivered(bus):
    topic = "é" * (MAX_TOPIC_LENGTH // 2)  # 1024 UTF-8 bytes
    sub = bus.subscribe(">")
    await bus.publish(topic, {"n": 1})
    assert (await next_event(sub)).topic == topic
    await sub.aclose()


async def test_payload_values_survive_the_transport(bus):
    payload = {
        "s": "é",
        "i": -(2**63),
        "u": 2**64 - 1,
        "f": 1.5,
        "b": b"\x00",
        "n": None,
        "l": [1, [2, {"x": True}]],
    }
    sub = bus.subscribe("p")
    await bus.publish("p", payload)
    assert (await next_event(sub)).payload == payload
    await sub.aclose()


# ─── Ending iteration ────────────────────────────────────────────────────────


async def test_aclose_ends_a_pending_async_for_promptly(bus):
    sub = bus.subscribe("end.>")
    task, first = await blocked_consumer(sub)
    await bus.publish("end.one", {})
    await asyncio.wait_for(first.wait(), ARRIVAL)
    await sub.aclose()
    events = await asyncio.wait_for(task, PROMPTLY)
    assert [event.topic for event in events] == ["end.one"]


async def test_leaving_async_with_ends_a_pending_async_for_promptly(bus):
    leave = asyncio.Event()
    consumers: list[asyncio.Task[list[Event]]] = []

    async def owner() -> None:
        async with bus.subscribe("end.>") as sub:
            task, first = await blocked_consumer(sub)
            consumers.append(task)
            await bus.publish("end.one", {})
            await first.wait()
            await leave.wait()

    owner_task = asyncio.create_task(owner())
    await eventually(lambda: bool(consumers) and not consumers[0].done())
    leave.set()
    await asyncio.wait_for(owner_task, ARRIVAL)
    events = await asyncio.wait_for(consumers[0], PROMPTLY)
    assert [event.topic for event in events] == ["end.one"]


async def test_aclose_discards_events_still_buffered(bus):
    """Events already in the subscription's queue when it is closed are not
    handed out afterwards."""
    sub = bus.subscribe("buf")
    for _ in range(3):
        await bus.publish("buf", {})
    await eventually(lambda: sub.statistics().queued == 3)
    await sub.aclose()
    assert [event async for event in sub] == []


async def test_aclose_is_idempotent(bus):
    sub = bus.subscribe("x")
    await sub.aclose()
    await sub.aclose()
    assert sub.closed
    await assert_bus_works(bus)


async def test_bus_close_ends_every_pending_async_for(bus):
    subs = [bus.subscribe("close.>"), bus.subscribe(">")]
    consumers = [await blocked_consumer(sub) for sub in subs]
    await bus.publish("close.now", {})
    for _, first in consumers:
        await asyncio.wait_for(first.wait(), ARRIVAL)
    await bus.close()
    for task, _ in consumers:
        assert [event.topic for event in await asyncio.wait_for(task, PROMPTLY)] == ["close.now"]
    assert all(sub.closed for sub in subs)


# ─── Life cycle ──────────────────────────────────────────────────────────────


async def test_connect_is_idempotent(any_bus):
    await any_bus.connect()
    await any_bus.connect()
    await assert_bus_works(any_bus)


async def test_close_is_idempotent(any_bus):
    """A second close() raises nothing and changes nothing: the bus stays
    closed (publishing raises RuntimeError), its counters stay readable, and
    a ShmBus leaves no file behind."""
    await any_bus.publish("before.close", {})
    await any_bus.close()
    await any_bus.close()
    with pytest.raises(RuntimeError):
        await any_bus.publish("after.close", {})
    assert any_bus.stats()["published"] == 1
    if isinstance(any_bus, ShmBus):
        assert bus_file_paths(any_bus.name) == []


async def test_publish_after_close_raises_runtime_error(any_bus):
    await any_bus.close()
    with pytest.raises(RuntimeError):
        await any_bus.publish("a", {})


async def test_publish_nowait_after_close_raises_runtime_error(any_bus):
    await any_bus.close()
    with pytest.raises(RuntimeError):
        any_bus.publish_nowait("a", {})


async def test_subscribe_after_close_raises_runtime_error(any_bus):
    await any_bus.close()
    with pytest.raises(RuntimeError):
        any_bus.subscribe("a")


async def test_connect_after_close_raises_runtime_error(any_bus):
    await any_bus.close()
    with pytest.raises(RuntimeError):
        await any_bus.connect()


@pytest.mark.parametrize("kind", ["shm", "memory", "null"])
async def test_async_with_bus_connects_and_closes(kind):
    instance = make_bus(kind)
    async with instance as entered:
        assert entered is instance
        await assert_bus_works(instance)
    with pytest.raises(RuntimeError):
        await instance.publish("a", {})
    if isinstance(instance, ShmBus):
        assert bus_file_paths(instance.name) == []


# ─── Threads ─────────────────────────────────────────────────────────────────


async def test_publish_nowait_from_a_plain_thread_delivers_in_order(bus):
    sub = bus.subscribe("thread.*")
    errors: list[BaseException] = []

    def publish_all() -> None:
        try:
            for i in range(50):
                bus.publish_nowait(f"thread.{i % 2}", {"i": i})
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    thread = threading.Thread(target=publish_all)
    thread.start()
    received = [(await next_event(sub)).payload["i"] for _ in range(50)]
    thread.join(ARRIVAL)
    assert not errors
    assert received == list(range(50))
    assert bus.stats()["published"] == 50
    await sub.aclose()


async def test_publish_nowait_from_a_plain_thread_is_counted(any_bus):
    thread = threading.Thread(target=lambda: [any_bus.publish_nowait("t", {}) for _ in range(10)])
    thread.start()
    thread.join(ARRIVAL)
    assert any_bus.stats()["published"] == 10


async def test_publishers_in_several_threads_each_keep_their_order(bus):
    sub = bus.subscribe("multi.>")
    threads = [
        threading.Thread(
            target=lambda n=n: [bus.publish_nowait(f"multi.{n}", {"i": i}) for i in range(100)]
        )
        for n in range(3)
    ]
    for thread in threads:
        thread.start()
    received = [await next_event(sub) for _ in range(300)]
    for thread in threads:
        thread.join(ARRIVAL)
    for n in range(3):
        assert [e.payload["i"] for e in received if e.topic == f"multi.{n}"] == list(range(100))
    await sub.aclose()


# ─── Bad input: raised, and harmless ─────────────────────────────────────────

BAD_TOPIC_VALUES = [
    "",
    "a..b",
    "a b",
    "a.*",
    "a.>",
    " a",
    ".a",
    "a.",
    "*",
    ">",
    "a\tb",
    "x" * (MAX_TOPIC_LENGTH + 1),
]
BAD_TOPIC_TYPES = [None, b"a.b", 1, ["a"]]
BAD_PATTERN_VALUES = [
    "",
    "a..b",
    "a b",
    "a.>.b",
    "a*",
    ">.a",
    ".a",
    "a.",
    "x" * (MAX_TOPIC_LENGTH + 1),
]
BAD_PATTERN_TYPES = [None, b"a.>", 1]
NOT_DICTS = [[1], "text", None, 1, (("a", 1),)]
UNSERIALISABLE = [{"o": object()}, {"s": {1}}, {"big": 2**64}, {"deep": [{"o": object()}]}]


def short_id(value: object) -> str:
    text = repr(value)
    return text if len(text) < 20 else text[:16] + "..."


@pytest.mark.parametrize("topic", BAD_TOPIC_VALUES, ids=short_id)
async def test_a_bad_topic_value_raises_value_error_and_is_harmless(any_bus, topic):
    with pytest.raises(ValueError):
        await any_bus.publish(topic, {})
    assert any_bus.stats()["published"] == 0
    await assert_bus_works(any_bus)


@pytest.mark.parametrize("topic", BAD_TOPIC_TYPES, ids=short_id)
async def test_a_topic_that_is_not_a_str_raises_type_error_and_is_harmless(any_bus, topic):
    with pytest.raises(TypeError):
        await any_bus.publish(topic, {})
    await assert_bus_works(any_bus)


async def test_a_topic_that_is_not_valid_unicode_raises_value_error(any_bus):
    with pytest.raises(ValueError):
        await any_bus.publish("a.\ud800", {})


@pytest.mark.parametrize("pattern", BAD_PATTERN_VALUES, ids=short_id)
async def test_a_bad_pattern_raises_value_error_and_is_harmless(any_bus, pattern):
    with pytest.raises(ValueError):
        any_bus.subscribe(pattern)
    assert any_bus.stats()["subscriptions"] == 0
    await assert_bus_works(any_bus)


@pytest.mark.parametrize("pattern", BAD_PATTERN_TYPES, ids=short_id)
async def test_a_pattern_that_is_not_a_str_raises_type_error_and_is_harmless(any_bus, pattern):
    with pytest.raises(TypeError):
        any_bus.subscribe(pattern)
    await assert_bus_works(any_bus)


@pytest.mark.parametrize("payload", NOT_DICTS, ids=short_id)
async def test_a_payload_that_is_not_a_dict_raises_type_error_and_is_harmless(any_bus, payload):
    with pytest.raises(TypeError):
        await any_bus.publish("a", payload)
    assert any_bus.stats()["published"] == 0
    await assert_bus_works(any_bus)


@pytest.mark.parametrize("payload", UNSERIALISABLE, ids=["object", "set", "int-2**64", "nested"])
async def test_an_unserialisable_payload_raises_type_error_naming_the_topic(any_bus, payload):
    with pytest.raises(TypeError) as info:
        await any_bus.publish("orders.bad", payload)
    assert "'orders.bad'" in str(info.value)
    assert any_bus.stats()["published"] == 0
    await assert_bus_works(any_bus)


@pytest.mark.parametrize("event_type", [None, 1, b"t"], ids=short_id)
async def test_an_event_type_that_is_not_a_str_raises_type_error(any_bus, event_type):
    with pytest.raises(TypeError):
        await any_bus.publish("a", {}, event_type=event_type)
    await assert_bus_works(any_bus)


async def test_an_envelope_over_max_event_size_raises_value_error_naming_both_sizes(any_bus):
    payload = {"blob": "x" * MAX_EVENT}
    size = len(encode_envelope("big", payload, "", 10 * MAX_EVENT, event_id="0" * 32, ts=0.0))
    with pytest.raises(ValueError) as info:
        await any_bus.publish("big", payload)
    assert str(size) in str(info.value)
    assert str(MAX_EVENT) in str(info.value)
    assert any_bus.stats()["published"] == 0
    await assert_bus_works(any_bus)


async def test_a_rejected_publish_delivers_nothing(bus):
    sub = bus.subscribe(">")
    for bad in ({"o": object()}, {"blob": "x" * MAX_EVENT}):
        with pytest.raises((TypeError, ValueError)):
            await bus.publish("rejected", bad)
    await bus.publish("accepted", {})
    assert (await next_event(sub)).topic == "accepted"
    await sub.aclose()


async def test_an_envelope_just_under_max_event_size_is_delivered(bus):
    overhead = len(encode_envelope("fits", {"blob": ""}, "", MAX_EVENT, event_id="0" * 32, ts=0.0))
    payload = {"blob": "x" * (MAX_EVENT - overhead - 8)}  # str headers grow by a few bytes
    sub = bus.subscribe("fits")
    await bus.publish("fits", payload)
    assert (await next_event(sub)).payload == payload
    await sub.aclose()


# ─── Statistics ──────────────────────────────────────────────────────────────


async def test_stats_is_a_mapping_with_the_standard_counters(any_bus):
    stats = any_bus.stats()
    assert isinstance(stats, Mapping)
    for key in ("published", "delivered", "dropped", "corrupt"):
        assert stats[key] == 0
    assert dict(stats)["published"] == 0


async def test_stats_count_published_and_delivered_events(bus):
    sub = bus.subscribe("s.>")
    for i in range(5):
        await bus.publish(f"s.{i}", {})
    await bus.publish("other", {})
    for _ in range(5):
        await next_event(sub)
    stats = bus.stats()
    assert (stats["published"], stats["delivered"], stats["dropped"], stats["corrupt"]) == (
        6,
        5,
        0,
        0,
    )
    assert stats["subscriptions"] == 1
    await sub.aclose()


async def test_stats_keep_counts_of_closed_subscriptions(bus):
    sub = bus.subscribe("k")
    await bus.publish("k", {})
    await next_event(sub)
    await sub.aclose()
    stats = bus.stats()
    assert stats["delivered"] == 1
    assert stats["subscriptions"] == 0


async def test_subscribe_hands_out_the_exported_subscription_with_its_statistics(bus):
    """Every transport returns a QueueSubscription (exported from shmbus), so
    ``statistics()`` is part of what any subscription offers."""
    async with bus.subscribe("q.>") as sub:
        assert isinstance(sub, QueueSubscription)
        await bus.publish("q.1", {})
        await bus.publish("q.2", {})
        await next_event(sub)
        await eventually(lambda: sub.statistics().queued == 1)
        statistics = sub.statistics()
    assert isinstance(statistics, SubscriptionStatistics)
    assert (statistics.pattern, statistics.delivered, statistics.dropped) == ("q.>", 1, 0)


async def test_a_stats_snapshot_does_not_change_afterwards(bus):
    snapshot = bus.stats()
    await bus.publish("a", {})
    assert snapshot["published"] == 0
    assert bus.stats()["published"] == 1


@pytest.mark.parametrize("kind", ["shm", "memory"])
async def test_a_slow_consumer_overflows_and_every_event_is_received_or_dropped(kind, buses):
    """received + dropped == published, exactly, once the counters settle."""
    instance = make_bus(kind, queue_size=8)
    buses.append(instance)
    await instance.connect()
    sub = instance.subscribe("load.>")
    published = 500
    for i in range(published):
        await instance.publish(f"load.{i % 4}", {"i": i})
    received: list[int] = []

    def settled() -> bool:
        stats = instance.stats()
        return stats["delivered"] + stats["dropped"] + sub.statistics().queued >= published

    await eventually(settled)
    while sub.statistics().queued:
        received.append((await next_event(sub)).payload["i"])
    stats = instance.stats()
    assert stats["published"] == published
    assert stats["delivered"] == len(received)
    assert stats["dropped"] > 0
    assert len(received) + stats["dropped"] == published
    assert received == sorted(received)
    assert received[-1] == published - 1  # drop-oldest keeps the newest
    await sub.aclose()


# ─── ShmBus ──────────────────────────────────────────────────────────────────


async def test_a_lapped_shm_reader_counts_every_overwritten_event_as_dropped(bus_name, buses):
    """Publishing far more than the ring holds before the reader runs: what
    the reader never saw is counted, so received + dropped == published."""
    instance = ShmBus(bus_name, queue_size=8, **SMALL_RING)
    buses.append(instance)
    sub = instance.subscribe("lap")
    published = 3 * SMALL_RING["capacity"] // 1024
    for i in range(published):
        instance.publish_nowait("lap", {"i": i, "pad": "x" * 1000})
    await eventually(lambda: instance.stats()["dropped"] + sub.statistics().queued >= published)
    received = []
    while sub.statistics().queued:
        received.append((await next_event(sub)).payload["i"])
    stats = instance.stats()
    assert stats["lapped"] > 0
    assert len(received) + stats["dropped"] == published
    assert received == list(range(published - len(received), published))
    await sub.aclose()


def scribble_on_next_record(instance: ShmBus) -> Callable[[int, int], None]:
    """Return a function that XORs a byte at an offset into the record the
    next publish on *instance* writes, in its own ring (which that publish
    creates if it is the instance's first)."""
    ring = instance._ring
    position = 0 if ring is None else int(ring.words[W_WRITE_CURSOR])

    def scribble(offset: int, mask: int) -> None:
        written = instance._ring
        assert written is not None, "scribble after the publish that writes the record"
        written.mm[RING_OFFSET + position % written.capacity + offset] ^= mask

    return scribble


async def test_a_shm_record_failing_its_checksum_is_counted_corrupt_and_dropped(bus_name, buses):
    instance = ShmBus(bus_name, **SMALL_RING)
    buses.append(instance)
    sub = instance.subscribe("c.>")
    scribble = scribble_on_next_record(instance)
    await instance.publish("c.bad", {"blob": "x" * 100})
    scribble(RECORD_HEADER_SIZE + len("c.bad") + 60, 0x01)  # a body byte, before the reader runs
    await instance.publish("c.good", {})
    assert (await next_event(sub)).topic == "c.good"
    stats = instance.stats()
    assert (stats["published"], stats["delivered"], stats["dropped"], stats["corrupt"]) == (
        2,
        1,
        1,
        1,
    )
    await sub.aclose()


async def test_a_shm_record_with_a_corrupt_header_is_counted_and_later_events_still_arrive(
    bus_name, buses
):
    instance = ShmBus(bus_name, **SMALL_RING)
    buses.append(instance)
    sub = instance.subscribe("c.>")
    scribble = scribble_on_next_record(instance)
    await instance.publish("c.bad", {})
    scribble(4, 0x7F)  # the record kind
    await eventually(lambda: instance.stats()["corrupt"] >= 1)
    await instance.publish("c.good", {})
    assert (await next_event(sub)).topic == "c.good"
    stats = instance.stats()
    assert (stats["published"], stats["delivered"], stats["dropped"], stats["corrupt"]) == (
        2,
        1,
        1,
        1,
    )
    await sub.aclose()


async def test_shm_counts_stay_exact_while_a_thread_floods_a_slow_consumer(bus_name, buses):
    instance = ShmBus(bus_name, queue_size=8, **SMALL_RING)
    buses.append(instance)
    sub = instance.subscribe("flood")
    published = 3000
    thread = threading.Thread(
        target=lambda: [
            instance.publish_nowait("flood", {"i": i, "pad": "x" * 1000}) for i in range(published)
        ]
    )
    thread.start()
    received: list[int] = []
    while thread.is_alive():
        try:
            received.append((await asyncio.wait_for(sub.__anext__(), 0.05)).payload["i"])
        except TimeoutError:
            pass
    thread.join()
    await eventually(
        lambda: len(received) + instance.stats()["dropped"] + sub.statistics().queued >= published
    )
    while sub.statistics().queued:
        received.append((await next_event(sub)).payload["i"])
    assert len(received) + instance.stats()["dropped"] == published
    assert received == sorted(set(received))
    await sub.aclose()


async def test_two_shm_instances_with_the_same_name_see_each_others_events(bus_name, buses):
    first = ShmBus(bus_name, **SMALL_RING)
    second = ShmBus(bus_name, **SMALL_RING)
    buses.extend([first, second])
    await first.connect()
    await second.connect()
    sub_first, sub_second = first.subscribe("x.>"), second.subscribe("x.>")
    await first.publish("x.from-first", {})
    await second.publish("x.from-second", {})
    # Each instance writes its own ring: no order between them is promised.
    both = ["x.from-first", "x.from-second"]
    assert sorted([(await next_event(sub_first)).topic for _ in range(2)]) == both
    assert sorted([(await next_event(sub_second)).topic for _ in range(2)]) == both
    assert first.stats()["published"] == 1 and first.stats()["delivered"] == 2


async def test_shm_buses_with_different_names_do_not_see_each_others_events(buses):
    first = ShmBus(new_bus_name("iso"), **SMALL_RING)
    second = ShmBus(new_bus_name("iso"), **SMALL_RING)
    buses.extend([first, second])
    sub = second.subscribe(">")
    await first.publish("elsewhere", {})
    await second.publish("here", {})
    assert (await next_event(sub)).topic == "here"
    await sub.aclose()


async def test_a_shm_instance_that_asks_no_sizes_adopts_the_bus_s(bus_name, buses):
    """An instance that asks for no ring geometry takes the bus's (the one
    its creator chose), not the library's defaults."""
    owner = ShmBus(bus_name, **SMALL_RING)
    joiner = ShmBus(bus_name)
    buses.extend([owner, joiner])
    await owner.connect()
    await joiner.connect()
    assert (joiner.capacity, joiner.max_event_size) == (
        SMALL_RING["capacity"],
        SMALL_RING["max_event_size"],
    )


@pytest.mark.parametrize(
    "ours",
    [
        {"capacity": 2 * SMALL_RING["capacity"]},
        {"max_event_size": SMALL_RING["max_event_size"] // 2},
        {"capacity": SMALL_RING["capacity"] // 2, "max_event_size": 2 * MAX_EVENT},
    ],
    ids=["bigger-ring", "smaller-events", "smaller-ring-bigger-events"],
)
async def test_joining_a_shm_bus_with_other_sizes_gets_a_ring_of_those_sizes(bus_name, buses, ours):
    """Ring sizes are local to an instance: one that asks for others than
    the bus's joins it, writes a ring of the sizes it asked for, and events
    flow both ways; its max_event_size bounds what it publishes."""
    existing = ShmBus(bus_name, **SMALL_RING)
    newcomer = ShmBus(bus_name, **ours)
    buses.extend([existing, newcomer])
    await existing.connect()
    await newcomer.connect()
    capacity = ours.get("capacity", SMALL_RING["capacity"])
    max_event_size = ours.get("max_event_size", SMALL_RING["max_event_size"])
    assert (newcomer.capacity, newcomer.max_event_size) == (capacity, max_event_size)
    theirs, mine = existing.subscribe("x.>"), newcomer.subscribe("x.>")
    await newcomer.publish("x.from-newcomer", {})
    await existing.publish("x.from-existing", {})
    both = ["x.from-existing", "x.from-newcomer"]
    assert sorted([(await next_event(theirs)).topic for _ in range(2)]) == both
    assert sorted([(await next_event(mine)).topic for _ in range(2)]) == both
    rings = {ring.writer_slot: ring.capacity for ring in read_bus(bus_name).rings}
    assert rings == {
        existing._segment.slot: SMALL_RING["capacity"],  # type: ignore[union-attr]
        newcomer._segment.slot: capacity,  # type: ignore[union-attr]
    }
    too_big = {"blob": "x" * max_event_size}
    with pytest.raises(ValueError, match=str(max_event_size)):
        await newcomer.publish("x.too-big", too_big)
    if max_event_size > MAX_EVENT:  # bigger than the bus's: still delivered
        fits = {"blob": "x" * (MAX_EVENT + 1024)}
        await newcomer.publish("x.big", fits)
        assert (await next_event(theirs)).payload == fits
    await assert_bus_works(existing)


async def test_the_last_shm_instance_to_close_removes_the_files(bus_name):
    first = ShmBus(bus_name, **SMALL_RING)
    second = ShmBus(bus_name, **SMALL_RING)
    try:
        await first.connect()
        await second.connect()
        sub = second.subscribe("x")  # gives the second instance a wake-up FIFO too
        await first.publish("x", {})
        await next_event(sub)
        assert bus_file_paths(bus_name)
        await first.close()
        assert bus_file_paths(bus_name)
        await second.publish("x", {})
        await next_event(sub)
    finally:
        await first.close()
        await second.close()
    assert bus_file_paths(bus_name) == []


async def test_a_single_shm_instance_removes_its_files_on_close(bus_name):
    instance = ShmBus(bus_name, **SMALL_RING)
    try:
        sub = instance.subscribe("x")
        assert bus_file_paths(bus_name)
        await sub.aclose()
    finally:
        await instance.close()
    assert bus_file_paths(bus_name) == []


async def test_shm_subscribing_again_after_a_subscription_that_received_closed_still_receives(
    bus_name, buses
):
    """An instance's reader stops with its last subscription; the next
    subscription starts a new reader, which must follow the rings the
    previous one read: the instance's own and another instance's."""
    instance = ShmBus(bus_name, **SMALL_RING)
    other = ShmBus(bus_name, **SMALL_RING)
    buses.extend([instance, other])
    await other.connect()
    for round_ in range(2):
        sub = instance.subscribe("x.>")
        await instance.publish("x.own", {"round": round_})
        await other.publish("x.other", {"round": round_})
        events = [await next_event(sub) for _ in range(2)]
        assert sorted((e.topic, e.payload["round"]) for e in events) == [
            ("x.other", round_),
            ("x.own", round_),
        ]
        await sub.aclose()


async def test_shm_connect_to_a_live_bus_of_the_old_layout_raises_naming_both_versions(bus_name):
    """A bus segment made by layout version 1 (one shared ring), held by a
    live process, is refused at connect() with IncompatibleSegmentError
    naming both layout versions; its file is left untouched."""
    path = segment_path(bus_name)
    old = b"SHMBUS\x00\x01" + (1).to_bytes(4, "little")
    contents = old + bytes(4096 - len(old))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    instance = ShmBus(bus_name, **SMALL_RING)
    try:
        os.write(fd, contents)
        assert ofd.try_lock(fd, LOCK_ATTACH, exclusive=False)  # looks attached, as a live one
        with pytest.raises(IncompatibleSegmentError) as info:
            await instance.connect()
        message = str(info.value)
        assert "version 1" in message and f"version {LAYOUT_VERSION}" in message, message
        assert LAYOUT_VERSION == 3
        with open(path, "rb") as f:
            assert f.read() == contents
        assert bus_file_paths(bus_name) == [path]
    finally:
        await instance.close()
        os.close(fd)
        cleanup(bus_name)


async def test_shm_connect_resets_a_bus_of_the_old_layout_that_nobody_holds(bus_name):
    """An old-layout segment left by processes that are all gone is not in
    anyone's way: the first instance to connect makes a new bus there."""
    path = segment_path(bus_name)
    with open(path, "xb") as f:
        f.write(b"SHMBUS\x00\x01" + (1).to_bytes(4, "little") + bytes(4084))
    os.chmod(path, 0o600)
    try:
        async with ShmBus(bus_name, **SMALL_RING) as instance:
            await assert_bus_works(instance)
            assert read_bus(bus_name).layout_version == LAYOUT_VERSION
        assert bus_file_paths(bus_name) == []
    finally:
        cleanup(bus_name)


async def test_shm_connect_lets_the_event_loop_run_while_it_waits_for_the_attach_lock(bus_name):
    """connect() may wait for the bus's attach lock (held exclusively by
    whoever creates or removes the bus); it waits in a worker thread, so the
    event loop keeps running. Here a task on the loop is what lets go of the
    lock after ~0.3 s of ticks: a connect() that blocked the loop could never
    get it (it would fail, after its own timeout, with "stayed busy")."""
    path = segment_path(bus_name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    instance = ShmBus(bus_name, **SMALL_RING)
    released = asyncio.Event()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1
            if ticks == 30:
                ofd.unlock(fd, LOCK_ATTACH)  # the "initialiser" is done
                released.set()

    try:
        assert ofd.try_lock(fd, LOCK_ATTACH, exclusive=True)  # someone is initialising
        ticking = asyncio.create_task(ticker())
        try:
            await instance.connect()
        finally:
            ticking.cancel()
        assert released.is_set(), "connect() returned while the attach lock was held"
        await assert_bus_works(instance)
        await instance.close()
        assert bus_file_paths(bus_name) == []
    finally:
        await instance.close()
        os.close(fd)
        cleanup(bus_name)  # the file this test made, if connect() never took it over


def test_shm_subscribe_without_a_running_loop_raises_runtime_error(bus_name):
    instance = ShmBus(bus_name, **SMALL_RING)
    try:
        with pytest.raises(RuntimeError, match="loop"):
            instance.subscribe("a")
    finally:
        asyncio.run(instance.close())
    assert bus_file_paths(bus_name) == []


def test_shm_subscribe_without_a_running_loop_leaves_the_bus_unconnected(bus_name):
    instance = ShmBus(bus_name, **SMALL_RING)
    try:
        with pytest.raises(RuntimeError):
            instance.subscribe("a")
        assert bus_file_paths(bus_name) == []
    finally:
        asyncio.run(instance.close())


@pytest.mark.parametrize("name", ["", "a/b", "a b", "ä", "a:b", ".", "..", "a\0b"], ids=short_id)
def test_a_bad_shm_bus_name_raises_value_error(name):
    with pytest.raises(ValueError):
        ShmBus(name, **SMALL_RING)


def test_a_shm_bus_name_over_the_limit_raises_value_error_naming_the_limit():
    name = "x" * (MAX_BUS_NAME_LENGTH + 1)
    with pytest.raises(ValueError) as info:
        ShmBus(name, **SMALL_RING)
    assert str(MAX_BUS_NAME_LENGTH) in str(info.value)
    assert str(MAX_BUS_NAME_LENGTH + 1) in str(info.value)


async def test_a_shm_bus_name_of_exactly_the_limit_works(bus_name):
    name = (bus_name + "-" + "x" * MAX_BUS_NAME_LENGTH)[:MAX_BUS_NAME_LENGTH]
    instance = ShmBus(name, **SMALL_RING)
    try:
        await assert_bus_works(instance)
    finally:
        await instance.close()
    assert bus_file_paths(name) == []


@pytest.mark.parametrize("name", [None, b"abc", 5], ids=short_id)
def test_a_shm_bus_name_that_is_not_a_str_raises_type_error(name):
    with pytest.raises(TypeError):
        ShmBus(name, **SMALL_RING)


def test_a_shm_capacity_too_small_for_max_event_size_raises_naming_both():
    with pytest.raises(ValueError) as info:
        ShmBus(new_bus_name(), capacity=4096, max_event_size=65536)
    assert "4096" in str(info.value)
    assert "65536" in str(info.value)


def test_a_shm_capacity_that_is_not_a_multiple_of_8_raises_naming_it():
    capacity = SMALL_RING["capacity"] + 4
    with pytest.raises(ValueError, match=str(capacity)):
        ShmBus(new_bus_name(), capacity=capacity, max_event_size=SMALL_RING["max_event_size"])


@pytest.mark.parametrize(
    "options",
    [{"max_event_size": 100}, {"queue_size": 0}, {"capacity": 0}, {"mode": 0o400}],
    ids=short_id,
)
def test_bad_shm_options_raise_value_error(options):
    with pytest.raises(ValueError):
        ShmBus(new_bus_name(), **{**SMALL_RING, **options})


@pytest.mark.parametrize("capacity", [1.5, "1048576", True])
def test_a_shm_capacity_that_is_not_an_int_raises_type_error(capacity):
    with pytest.raises(TypeError):
        ShmBus(new_bus_name(), capacity=capacity, max_event_size=SMALL_RING["max_event_size"])


async def test_shm_publish_and_subscribe_after_close_raise_runtime_error_even_unconnected(bus_name):
    instance = ShmBus(bus_name, **SMALL_RING)
    await instance.close()
    with pytest.raises(RuntimeError):
        await instance.publish("a", {})
    with pytest.raises(RuntimeError):
        instance.subscribe("a")
    assert bus_file_paths(bus_name) == []


# ─── NullBus and MemoryBus specifics ─────────────────────────────────────────


async def test_null_bus_counts_published_events():
    async with NullBus() as null:
        for _ in range(3):
            await null.publish("a", {"n": 1})
        assert null.stats()["published"] == 3
        assert null.stats()["delivered"] == 0


async def test_null_bus_subscription_ends_immediately():
    async with NullBus() as null:
        sub = null.subscribe("a.>")
        await null.publish("a.b", {})
        assert [event async for event in sub] == []
        async with null.subscribe(">") as other:
            assert [event async for event in other] == []


@pytest.mark.parametrize("kind", ["shm", "memory", "null"])
@pytest.mark.parametrize("queue_size", [True, 2.5], ids=short_id)
def test_a_queue_size_that_is_not_an_int_is_rejected_by_every_transport(kind, queue_size):
    with pytest.raises((TypeError, ValueError)):
        make_bus(kind, queue_size=queue_size)


@pytest.mark.parametrize("kind", ["memory", "null"])
@pytest.mark.parametrize("options", [{"max_event_size": 10}, {"queue_size": 0}], ids=short_id)
def test_bad_in_process_bus_options_raise_value_error(kind, options):
    with pytest.raises(ValueError):
        (MemoryBus if kind == "memory" else NullBus)(**options)


async def test_memory_buses_do_not_see_each_others_events():
    async with MemoryBus() as first, MemoryBus() as second:
        sub = second.subscribe(">")
        await first.publish("elsewhere", {})
        await second.publish("here", {})
        assert (await next_event(sub)).topic == "here"


def test_memory_bus_subscription_made_outside_a_loop_receives_on_the_loop_that_iterates_it():
    instance = MemoryBus()
    sub = instance.subscribe("a")
    instance.publish_nowait("a", {"n": 1})

    async def consume() -> Event:
        return await next_event(sub)

    assert asyncio.run(consume()).payload == {"n": 1}
    asyncio.run(instance.close())


async def test_shm_subscribing_from_a_second_event_loop_is_refused_and_harmless(bus_name):
    """An instance's reader runs on one loop; a subscription from another
    thread's loop could stop receiving, unnoticed, when the first loop ends,
    so it is refused with a message that says what to do, and the instance
    keeps working."""
    async with ShmBus(bus_name, **SMALL_RING) as shared:
        here = shared.subscribe("x.*")
        errors: list[BaseException] = []

        def other_thread() -> None:
            async def attempt() -> None:
                try:
                    shared.subscribe("x.*")
                except RuntimeError as exc:
                    errors.append(exc)

            asyncio.run(attempt())

        await asyncio.to_thread(other_thread)
        assert len(errors) == 1
        assert "one ShmBus instance per event loop" in str(errors[0])
        await shared.publish("x.y", {"n": 1})
        assert (await asyncio.wait_for(here.__anext__(), 5)).payload == {"n": 1}


async def test_shm_a_new_loop_may_subscribe_once_the_readers_loop_has_closed(bus_name):
    """asyncio.run() in a row on one instance: the second run's loop takes the
    reader over, and subscriptions left on the closed loop end."""
    instance = ShmBus(bus_name, **SMALL_RING)

    def run_once(n: int) -> int:
        async def once() -> int:
            sub = instance.subscribe("x.*")
            await instance.publish("x.y", {"n": n})
            return int((await asyncio.wait_for(sub.__anext__(), 5)).payload["n"])

        return asyncio.run(once())

    try:
        assert await asyncio.to_thread(run_once, 1) == 1
        assert await asyncio.to_thread(run_once, 2) == 2
    finally:
        await instance.close()


async def test_shm_for_existing_joins_a_bus_with_its_own_ring_geometry(bus_name):
    """Tools (CLI, bridge) join whatever bus exists: for_existing() takes the
    live bus's capacity and max_event_size instead of the defaults."""
    async with ShmBus(bus_name, **SMALL_RING) as owner:
        joiner = ShmBus.for_existing(bus_name, queue_size=7)
        async with joiner:
            assert joiner.queue_size == 7
            assert joiner.capacity == SMALL_RING["capacity"]
            assert joiner.max_event_size == SMALL_RING["max_event_size"]
            sub = owner.subscribe("x.*")
            await joiner.publish("x.y", {"n": 1})
            assert (await asyncio.wait_for(sub.__anext__(), 5)).payload == {"n": 1}


def test_shm_for_existing_uses_the_defaults_when_no_bus_exists(bus_name):
    fresh = ShmBus.for_existing(bus_name)
    assert fresh.max_event_size == ShmBus(bus_name).max_event_size
    assert bus_file_paths(bus_name) == []


async def test_shm_a_ring_larger_than_dev_shm_is_a_clear_error_at_the_first_publish(bus_name):
    """An instance's ring is reserved when its first publish creates it, so a
    /dev/shm too small for it is a SegmentSpaceError there that names both
    sizes (never a SIGBUS later); no ring file is left behind, the instance
    and the bus keep working, and the name is not spoiled."""
    stat = os.statvfs("/dev/shm")
    too_big = (stat.f_blocks * stat.f_frsize + (1 << 30)) // 8 * 8
    segment = f"/dev/shm/shmbus.{bus_name}"
    async with ShmBus(bus_name, capacity=too_big) as greedy:
        with pytest.raises(SegmentSpaceError, match=r"needs \d+ bytes in /dev/shm but only \d+"):
            await greedy.publish("too.big", {})
        assert bus_file_paths(bus_name) == [segment]
        assert greedy.stats()["published"] == 0
        async with ShmBus(bus_name, **SMALL_RING) as modest:
            sub = greedy.subscribe("still.>")
            await modest.publish("still.works", {})
            assert (await next_event(sub)).topic == "still.works"
            await sub.aclose()
    assert bus_file_paths(bus_name) == []
    async with ShmBus(bus_name, **SMALL_RING) as usable:  # the name is not spoiled
        await usable.publish("still.works", {})
        assert usable.capacity == SMALL_RING["capacity"]
