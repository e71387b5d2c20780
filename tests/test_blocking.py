"""Blocking subscriptions (``bus.subscribe_sync``) inside one process: the
contract on every transport, threads, timeouts, closing from another thread,
the queue bound, and the files a ShmBus blocking subscription owns.

Across real processes: tests/test_blocking_processes.py.

No test here runs an event loop unless it says so: a blocking subscription
is for code without one. Bounds passed to ``get()`` and ``join()`` only turn
a hang into a failure.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import SMALL_RING
from threads import InThread, wait_until

from shmbus import (
    BaseBus,
    BlockingSubscription,
    Event,
    MemoryBus,
    NullBus,
    ShmBus,
    SubscriptionClosedError,
    SubscriptionStatistics,
)
from shmbus._core.inspection import read_bus
from shmbus._core.layout import OFF_SLEEP_FLAGS, W_NEXT_SEQ, W_WRITE_CURSOR, min_capacity
from shmbus._core.shmfiles import bus_file_paths

#: Bound on any wait that should end at once: turns a hang into a failure.
FINISH = 30.0


# ─── Helpers ────────────────────────────────────────────────────────────────


class Pair:
    """A bus to subscribe on and one to publish on (the same instance for
    in-process transports, a second instance for ShmBus). "shm" is a private
    bus (blocking readers sleep on a semaphore), "shm-group" one shared with
    this process's group (they sleep on a FIFO)."""

    def __init__(self, kind: str, name: str, queue_size: int) -> None:
        self.kind = kind
        self.subscriber: BaseBus
        self.publisher: BaseBus
        if kind in ("shm", "shm-group"):
            shared: dict[str, Any] = (
                {"mode": 0o660, "group": os.getegid()} if kind == "shm-group" else {}
            )
            self.subscriber = ShmBus(name, queue_size=queue_size, **shared, **SMALL_RING)
            self.publisher = ShmBus(name, **shared, **SMALL_RING)
            self.subscriber.connect_sync()
            self.publisher.connect_sync()
        elif kind == "memory":
            self.subscriber = self.publisher = MemoryBus(queue_size=queue_size)
        else:
            self.subscriber = self.publisher = NullBus(queue_size=queue_size)

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        self.publisher.publish_nowait(topic, payload)

    def close_subscriber(self) -> None:
        bus = self.subscriber
        if isinstance(bus, ShmBus):
            bus.close_sync()
        else:
            asyncio.run(bus.close())

    def close(self) -> None:
        for bus in {
            id(self.subscriber): self.subscriber,
            id(self.publisher): self.publisher,
        }.values():
            if isinstance(bus, ShmBus):
                bus.close_sync()
            else:
                asyncio.run(bus.close())


def pair(request: pytest.FixtureRequest, bus_name: str, queue_size: int = 1024) -> Iterator[Pair]:
    made = Pair(request.param, bus_name, queue_size)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(params=["shm", "shm-group", "memory"])
def delivering(request: pytest.FixtureRequest, bus_name: str) -> Iterator[Pair]:
    """A pair of each transport that delivers events."""
    yield from pair(request, bus_name)


@pytest.fixture(params=["shm", "shm-group", "memory", "null"])
def any_pair(request: pytest.FixtureRequest, bus_name: str) -> Iterator[Pair]:
    """A pair of every transport with blocking subscriptions."""
    yield from pair(request, bus_name)


@pytest.fixture(params=["shm", "memory"])
def tiny_queue(request: pytest.FixtureRequest, bus_name: str) -> Iterator[Pair]:
    """A delivering pair whose subscriptions hold 4 events."""
    yield from pair(request, bus_name, queue_size=4)


@pytest.fixture
def no_timers(monkeypatch: pytest.MonkeyPatch) -> None:
    """No wait ends by itself: a blocking reader re-checks and a waiting
    thread looks again only after an hour. What must happen at once then
    happens only through a doorbell, a notification or a close."""
    import shmbus._core.sync_reader
    import shmbus.delivery

    monkeypatch.setattr(shmbus._core.sync_reader, "IDLE_RECHECK", 3600.0)
    monkeypatch.setattr(shmbus._core.sync_reader, "HEARTBEAT", 3600.0)
    monkeypatch.setattr(shmbus.delivery, "_WAIT_SLICE", 3600.0)


def blocked(bus: BaseBus, sub: BlockingSubscription) -> bool:
    """True once a thread waits in ``sub.get()``: its reader sleeps on its
    doorbell (ShmBus), or it waits for a hand-over (in-process buses)."""
    if isinstance(bus, ShmBus):
        return sleeping(bus, sub)
    return sub._waiting > 0


def sleeping(bus: ShmBus, sub: BlockingSubscription) -> bool:
    """True once the reader of *sub* has set its sleep flag (it waits on its
    doorbell now)."""
    reader = bus._sync_readers[sub]
    segment = bus._segment
    assert segment is not None
    return bool(segment.mm[OFF_SLEEP_FLAGS + reader.slot])


def next_event(sub: BlockingSubscription) -> Event:
    """The next event, polled with get_nowait() (bounded by FINISH)."""
    for _ in range(int(FINISH / 0.002)):
        try:
            return sub.get_nowait()
        except TimeoutError:
            threading.Event().wait(0.002)
    raise AssertionError("no event came")


def payloads(events: list[Event]) -> list[dict[str, Any]]:
    return [event.payload for event in events]


# ─── The contract on every transport ────────────────────────────────────────


def test_a_blocking_subscription_gets_what_is_published_after_it_in_order(
    delivering: Pair,
) -> None:
    with delivering.subscriber.subscribe_sync("b.*") as sub:
        for n in range(5):
            delivering.publish("b.x", {"n": n})
        got = [sub.get(FINISH) for _ in range(5)]
    assert payloads(got) == [{"n": n} for n in range(5)]
    assert {event.topic for event in got} == {"b.x"}


def test_a_blocking_subscription_gets_only_matching_topics(delivering: Pair) -> None:
    with delivering.subscriber.subscribe_sync("m.*.x") as sub:
        delivering.publish("m.1.y", {"n": 1})
        delivering.publish("m.2.x", {"n": 2})
        delivering.publish("m.3.x.z", {"n": 3})
        delivering.publish("m.4.x", {"n": 4})
        got = [sub.get(FINISH), sub.get(FINISH)]
        with pytest.raises(TimeoutError):
            sub.get(0)
    assert payloads(got) == [{"n": 2}, {"n": 4}]


def test_events_published_before_subscribe_sync_returned_are_not_delivered(
    delivering: Pair,
) -> None:
    delivering.publish("s.early", {"n": 0})
    with delivering.subscriber.subscribe_sync("s.*") as sub:
        delivering.publish("s.late", {"n": 1})
        first = sub.get(FINISH)
    assert (first.topic, first.payload) == ("s.late", {"n": 1})


def test_get_with_a_timeout_raises_timeout_error_when_nothing_comes(any_pair: Pair) -> None:
    with any_pair.subscriber.subscribe_sync("t.*") as sub:
        with pytest.raises(TimeoutError) as info:
            sub.get(0.05)
    assert "0.05" in str(info.value) and "t.*" in str(info.value)


def test_get_nowait_raises_timeout_error_when_nothing_is_queued(any_pair: Pair) -> None:
    with any_pair.subscriber.subscribe_sync("t.*") as sub:
        with pytest.raises(TimeoutError):
            sub.get_nowait()


def test_get_nowait_returns_an_event_that_was_published(delivering: Pair) -> None:
    with delivering.subscriber.subscribe_sync("n.*") as sub:
        delivering.publish("n.x", {"n": 1})
        event = next_event(sub)
    assert event.payload == {"n": 1}


@pytest.mark.parametrize("timeout", [-1, -0.5, float("nan")])
def test_a_negative_or_nan_timeout_is_a_value_error_naming_it(
    any_pair: Pair, timeout: float
) -> None:
    with any_pair.subscriber.subscribe_sync("v.*") as sub:
        with pytest.raises(ValueError) as info:
            sub.get(timeout)
    assert repr(timeout) in str(info.value)


@pytest.mark.parametrize("timeout", ["1", True, [1]])
def test_a_timeout_that_is_not_a_number_is_a_type_error(any_pair: Pair, timeout: Any) -> None:
    with any_pair.subscriber.subscribe_sync("v.*") as sub:
        with pytest.raises(TypeError) as info:
            sub.get(timeout)
    assert type(timeout).__name__ in str(info.value)


def test_a_bad_pattern_is_refused_and_the_bus_keeps_working(delivering: Pair) -> None:
    with pytest.raises(ValueError):
        delivering.subscriber.subscribe_sync("a.>.b")
    with pytest.raises(TypeError):
        delivering.subscriber.subscribe_sync(5)  # type: ignore[arg-type]
    with delivering.subscriber.subscribe_sync("ok.*") as sub:
        delivering.publish("ok.go", {})
        assert sub.get(FINISH).topic == "ok.go"


def test_statistics_are_a_subscription_statistics_counting_delivered_and_queued(
    delivering: Pair,
) -> None:
    with delivering.subscriber.subscribe_sync("c.*") as sub:
        for n in range(3):
            delivering.publish("c.x", {"n": n})
        sub.get(FINISH)
        next_event(sub)
        stats = sub.statistics()
    assert isinstance(stats, SubscriptionStatistics)
    assert (stats.pattern, stats.delivered, stats.dropped, stats.maxsize) == ("c.*", 2, 0, 1024)
    assert stats.queued == 1


def test_a_full_queue_drops_the_oldest_events_and_counts_them(tiny_queue: Pair) -> None:
    """Ten events reach a subscription that holds four: the four newest are
    delivered, six are counted dropped, and delivered + dropped + queued is
    exactly what was published."""
    with tiny_queue.subscriber.subscribe_sync("q.*") as sub:
        for n in range(10):
            tiny_queue.publish("q.x", {"n": n})
        got = [sub.get(FINISH) for _ in range(4)]
        stats = sub.statistics()
    assert payloads(got) == [{"n": n} for n in range(6, 10)]
    assert (stats.delivered, stats.dropped, stats.queued) == (4, 6, 0)


@pytest.mark.usefixtures("no_timers")
def test_iteration_ends_when_the_subscription_is_closed_from_another_thread(
    any_pair: Pair,
) -> None:
    sub = any_pair.subscriber.subscribe_sync("i.*")
    consumer = InThread(lambda: list(sub))
    wait_until(lambda: blocked(any_pair.subscriber, sub), "the consumer waits")
    sub.close()
    assert consumer.result() == []


@pytest.mark.usefixtures("no_timers")
def test_a_get_blocked_in_another_thread_raises_subscription_closed_when_the_bus_closes(
    any_pair: Pair,
) -> None:
    sub = any_pair.subscriber.subscribe_sync("i.*")
    consumer = InThread(lambda: sub.get())
    wait_until(lambda: blocked(any_pair.subscriber, sub), "the consumer waits")
    any_pair.close_subscriber()
    with pytest.raises(SubscriptionClosedError) as info:
        consumer.result()
    assert isinstance(info.value, RuntimeError) and "i.*" in str(info.value)
    assert sub.closed


def test_get_on_a_closed_subscription_raises_subscription_closed_error(any_pair: Pair) -> None:
    sub = any_pair.subscriber.subscribe_sync("g.*")
    sub.close()
    sub.close()  # idempotent
    with pytest.raises(SubscriptionClosedError):
        sub.get(0)
    assert list(sub) == []


@pytest.mark.usefixtures("no_timers")
def test_events_are_handed_over_to_a_thread_that_waits_for_them(delivering: Pair) -> None:
    """A thread blocked in get() with no timeout gets an event published
    while it waits, with no timer to help: rung by the publisher's doorbell
    (ShmBus), handed over by the publishing thread (MemoryBus)."""
    with delivering.subscriber.subscribe_sync("w.*") as sub:
        consumer = InThread(lambda: sub.get())
        wait_until(lambda: blocked(delivering.subscriber, sub), "the consumer waits")
        delivering.publish("w.x", {"n": 1})
        assert consumer.result().payload == {"n": 1}


def test_several_threads_each_with_a_subscription_all_get_every_event(
    delivering: Pair,
) -> None:
    subs = [delivering.subscriber.subscribe_sync("f.>") for _ in range(4)]
    consumers = [InThread(lambda sub=sub: [sub.get(FINISH) for _ in range(50)]) for sub in subs]
    for n in range(50):
        delivering.publish("f.x.y", {"n": n})
    results = [consumer.result() for consumer in consumers]
    for sub in subs:
        sub.close()
    for got in results:
        assert payloads(got) == [{"n": n} for n in range(50)]


def test_threads_sharing_one_subscription_get_each_event_once(delivering: Pair) -> None:
    with delivering.subscriber.subscribe_sync("o.*") as sub:

        def take() -> list[int]:
            got = []
            while True:
                try:
                    got.append(sub.get(0.5).payload["n"])
                except TimeoutError:
                    return got

        consumers = [InThread(take) for _ in range(3)]
        for n in range(300):
            delivering.publish("o.x", {"n": n})
        results = [consumer.result() for consumer in consumers]
    assert sorted(n for got in results for n in got) == list(range(300))


@pytest.mark.usefixtures("no_timers")
def test_a_thread_waiting_on_a_shared_subscription_takes_over_from_one_that_gives_up(
    delivering: Pair,
) -> None:
    """Two threads wait in get() on one subscription, with no timer to help:
    the first (which reads for both, on ShmBus) gives up at its timeout; the
    other, waiting without one, takes over and gets the next event."""
    with delivering.subscriber.subscribe_sync("h.*") as sub:
        first = InThread(lambda: sub.get(0.2))
        if sub._pump is not None:
            wait_until(lambda: sub._pumper is not None, "the first thread reads")
        second = InThread(sub.get)
        wait_until(lambda: sub._waiting == 1, "the second waits")
        with pytest.raises(TimeoutError):
            first.result()
        delivering.publish("h.x", {"n": 1})
        assert second.result().payload == {"n": 1}


def test_a_nullbus_blocking_subscription_never_yields_until_closed() -> None:
    bus = NullBus()
    sub = bus.subscribe_sync(">")
    bus.publish_nowait("n.x", {})
    with pytest.raises(TimeoutError):
        sub.get(0.05)
    assert not sub.closed
    asyncio.run(bus.close())
    assert sub.closed and list(sub) == []


def test_subscribe_sync_on_a_closed_bus_raises_runtime_error(any_pair: Pair) -> None:
    any_pair.close_subscriber()
    with pytest.raises(RuntimeError):
        any_pair.subscriber.subscribe_sync("x.*")


def test_nats_transports_have_no_blocking_subscriptions_and_say_what_to_use() -> None:
    from shmbus.fallback import FallbackBus
    from shmbus.nats import NatsBus

    nats = NatsBus("nats://127.0.0.1:1")
    fallback = FallbackBus(nats, ShmBus("unused"))
    for bus in (nats, fallback):
        with pytest.raises(NotImplementedError) as info:
            bus.subscribe_sync("x.*")
        assert type(bus).__name__ in str(info.value)
        assert "async for" in str(info.value) and "ShmBus" in str(info.value)


# ─── ShmBus ─────────────────────────────────────────────────────────────────


@pytest.fixture
def shm(bus_name: str) -> Iterator[tuple[ShmBus, ShmBus]]:
    """(subscriber, publisher): two instances of the test's bus."""
    subscriber = ShmBus(bus_name, **SMALL_RING)
    publisher = ShmBus(bus_name, **SMALL_RING)
    subscriber.connect_sync()
    publisher.connect_sync()
    try:
        yield subscriber, publisher
    finally:
        publisher.close_sync()
        subscriber.close_sync()


def doorbells(name: str) -> list[str]:
    return [path for path in bus_file_paths(name) if "/sem.shmbus." in path]


def test_a_blocking_subscription_has_a_doorbell_of_its_own_removed_when_it_closes(
    shm: tuple[ShmBus, ShmBus], bus_name: str
) -> None:
    subscriber, _ = shm
    first = subscriber.subscribe_sync("a.*")
    second = subscriber.subscribe_sync("a.*")
    both = doorbells(bus_name)
    first.close()
    one = doorbells(bus_name)
    second.close()
    assert len(both) == 2 and len(one) == 1 and set(one) < set(both)
    assert doorbells(bus_name) == []


def test_a_blocking_subscription_reads_on_a_slot_of_its_own_shown_as_a_live_reader(
    shm: tuple[ShmBus, ShmBus], bus_name: str
) -> None:
    subscriber, _ = shm
    with subscriber.subscribe_sync("a.*"):
        info = read_bus(bus_name)
    after = read_bus(bus_name)
    assert info.readers == 1 and after.readers == 0
    # The two instances and the subscription's reader, which has a doorbell.
    assert sorted(slot.blocking for slot in info.live_instances) == [False, False, True]
    assert not any(slot.blocking for slot in after.live_instances)


def test_the_memory_of_a_bus_counts_the_doorbells_of_its_blocking_readers(
    shm: tuple[ShmBus, ShmBus], bus_name: str
) -> None:
    subscriber, _ = shm
    before = read_bus(bus_name).segment_size
    with subscriber.subscribe_sync("a.*"), subscriber.subscribe_sync("b.*"):
        bells = doorbells(bus_name)
        during = read_bus(bus_name).segment_size
    # A semaphore's file is 32 bytes; its memory is a page.
    assert len(bells) == 2
    assert during - before == 2 * os.sysconf("SC_PAGE_SIZE")
    assert read_bus(bus_name).segment_size == before


def test_closing_the_bus_removes_every_file_even_with_blocking_subscriptions_open(
    bus_name: str,
) -> None:
    bus = ShmBus(bus_name, **SMALL_RING)
    subs = [bus.subscribe_sync(">") for _ in range(3)]
    bus.publish_nowait("a.b", {})
    bus.close_sync()
    assert all(sub.closed for sub in subs)
    assert bus_file_paths(bus_name) == []


def test_blocking_and_asyncio_subscriptions_of_one_instance_both_get_every_event(
    shm: tuple[ShmBus, ShmBus],
) -> None:
    subscriber, publisher = shm

    async def main() -> list[Event]:
        async with subscriber.subscribe("both.*") as sub:
            blocking = subscriber.subscribe_sync("both.*")
            consumer = InThread(lambda: [blocking.get(FINISH) for _ in range(20)])
            for n in range(20):
                publisher.publish_nowait("both.x", {"n": n})
            got = [await asyncio.wait_for(anext(aiter(sub)), FINISH) for _ in range(20)]
            sync_got = await asyncio.to_thread(consumer.result)
            blocking.close()
            return got + sync_got

    events = asyncio.run(main())
    assert payloads(events) == [{"n": n} for n in range(20)] * 2


def test_events_an_instance_publishes_reach_its_own_blocking_subscription(
    shm: tuple[ShmBus, ShmBus],
) -> None:
    subscriber, _ = shm
    with subscriber.subscribe_sync("own.*") as sub:
        subscriber.publish_nowait("own.x", {"n": 1})
        assert sub.get(FINISH).payload == {"n": 1}


def test_bus_stats_count_blocking_subscriptions_and_their_deliveries(
    shm: tuple[ShmBus, ShmBus],
) -> None:
    subscriber, publisher = shm
    sub = subscriber.subscribe_sync("st.*")
    for n in range(3):
        publisher.publish_nowait("st.x", {"n": n})
    for _ in range(3):
        sub.get(FINISH)
    live = subscriber.stats()
    sub.close()
    after = subscriber.stats()
    assert (live.subscriptions, live.delivered, live.dropped) == (1, 3, 0)
    assert (after.subscriptions, after.delivered, after.dropped) == (0, 3, 0)


def test_a_reader_woken_by_nobody_still_gets_the_event_by_its_timed_recheck(
    shm: tuple[ShmBus, ShmBus], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The publisher's wake-up is lost (as when a publisher dies between its
    commit and its ring): the sleeping reader gets the event anyway."""
    subscriber, publisher = shm
    assert publisher._waker is not None
    monkeypatch.setattr(publisher._waker, "wake", lambda slot: False)
    with subscriber.subscribe_sync("lost.*") as sub:
        consumer = InThread(lambda: sub.get())
        wait_until(lambda: sleeping(subscriber, sub), "the reader sleeps")
        publisher.publish_nowait("lost.x", {"n": 1})
        assert consumer.result().payload == {"n": 1}


def test_an_interrupting_signal_handler_that_closes_the_subscription_ends_the_wait(
    shm: tuple[ShmBus, ShmBus],
) -> None:
    """The main thread waits in get(); a SIGALRM handler, which runs in that
    very thread, closes the subscription: get() raises SubscriptionClosedError
    (nothing waits for the thread it interrupted) and the reader's files go."""
    import signal

    subscriber, _ = shm
    sub = subscriber.subscribe_sync("sig.*")
    previous = signal.signal(signal.SIGALRM, lambda *_: sub.close())
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(SubscriptionClosedError):
            sub.get(FINISH)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert doorbells(subscriber.name) == []


def test_every_blocking_subscription_takes_a_slot_and_a_full_bus_says_so(
    bus_name: str,
) -> None:
    from shmbus import NoFreeSlotError
    from shmbus._core.layout import MAX_SLOTS

    bus = ShmBus(bus_name, **SMALL_RING)
    bus.connect_sync()
    subs = []
    try:
        with pytest.raises(NoFreeSlotError):
            for _ in range(MAX_SLOTS):
                subs.append(bus.subscribe_sync(">"))
        assert len(subs) == MAX_SLOTS - 1
        subs.pop().close()
        subs.append(bus.subscribe_sync(">"))  # a freed slot is taken again
        bus.publish_nowait("full.x", {})
        assert subs[-1].get(FINISH).topic == "full.x"
    finally:
        bus.close_sync()
    assert bus_file_paths(bus_name) == []


def test_the_process_id_of_a_blocking_reader_is_this_process(
    shm: tuple[ShmBus, ShmBus], bus_name: str
) -> None:
    subscriber, _ = shm
    with subscriber.subscribe_sync("p.*"):
        pids = {slot.pid for slot in read_bus(bus_name).live_instances}
    assert pids == {os.getpid()}


# ─── Skipping the backlog ───────────────────────────────────────────────────

#: The smallest ring 256-byte events fit in: a few dozen small events wrap it.
TINY_RING: dict[str, Any] = {"capacity": min_capacity(256), "max_event_size": 256}
#: Events the flooder publishes: its ring wraps many times over.
FLOOD = 2000


@pytest.fixture
def flooder(bus_name: str) -> Iterator[ShmBus]:
    """A third instance of the test's bus, publishing into a tiny ring."""
    bus = ShmBus(bus_name, **TINY_RING)
    bus.connect_sync()
    try:
        yield bus
    finally:
        bus.close_sync()


def flood(bus: ShmBus) -> None:
    """Publish FLOOD events nobody wants; the ring wraps at least 4 times."""
    for n in range(FLOOD):
        bus.publish_nowait(f"noise.{n % 8}", {"n": n})
    ring = bus._ring
    assert ring is not None
    assert int(ring.words[W_WRITE_CURSOR]) // ring.capacity >= 4


@pytest.mark.parametrize("ring", ["followed", "installed-meanwhile"])
def test_skipping_the_backlog_moves_the_reader_to_the_newest_record_counting_nothing(
    shm: tuple[ShmBus, ShmBus], flooder: ShmBus, bus_name: str, ring: str
) -> None:
    """A flood wraps a ring the blocking reader follows (or one installed
    after its subscription) while nobody reads: after skip_backlog() the
    reader is at the ring's newest record, nothing was counted lost or
    lapped, and what is published afterwards is delivered."""
    subscriber, _ = shm
    if ring == "followed":
        flooder.publish_nowait("noise.first", {})
    with subscriber.subscribe_sync("wanted.*") as sub:
        flood(flooder)
        assert sub.skip_backlog()
        follower = subscriber._sync_readers[sub].follower
        (followed,) = [each for each in follower._order if each.key == flooder._own_ring_key()]
        words = followed.mapping.words
        assert followed.ring.cursor == int(words[W_WRITE_CURSOR])
        assert followed.ring.expected_seq == int(words[W_NEXT_SEQ])
        assert (follower.lapped, sub.dropped, sub.statistics().queued) == (0, 0, 0)
        flooder.publish_nowait("wanted.x", {"n": "after"})
        assert sub.get(FINISH).payload == {"n": "after"}
        slots = [slot for slot in read_bus(bus_name).live_instances if slot.blocking]
        stats = subscriber.stats()
    assert (follower.lapped, sub.dropped, stats.lapped, stats.dropped) == (0, 0, 0, 0)
    assert [(slot.lapped, slot.dropped) for slot in slots] == [(0, 0)]


def test_a_reader_that_did_not_skip_its_backlog_counts_the_wrapped_ring_as_lapped(
    shm: tuple[ShmBus, ShmBus], flooder: ShmBus
) -> None:
    """What skip_backlog() spares: the same flood, read through, is lapped."""
    subscriber, _ = shm
    flooder.publish_nowait("noise.first", {})
    with subscriber.subscribe_sync("wanted.*") as sub:
        flood(flooder)
        flooder.publish_nowait("wanted.x", {"n": "after"})
        assert sub.get(FINISH).payload == {"n": "after"}
        lapped = subscriber._sync_readers[sub].follower.lapped
        assert lapped > 0 and sub.dropped == lapped


def test_skip_backlog_skips_nothing_while_another_thread_holds_the_pump(
    shm: tuple[ShmBus, ShmBus],
) -> None:
    subscriber, publisher = shm
    with subscriber.subscribe_sync("held.*") as sub:
        consumer = InThread(lambda: sub.get(FINISH))
        wait_until(lambda: sleeping(subscriber, sub), "the consumer holds the pump")
        assert not sub.skip_backlog()
        publisher.publish_nowait("held.x", {"n": 1})
        assert consumer.result().payload == {"n": 1}


def test_skip_backlog_on_a_closed_subscription_skips_nothing(
    shm: tuple[ShmBus, ShmBus],
) -> None:
    subscriber, _ = shm
    sub = subscriber.subscribe_sync("closed.*")
    sub.close()
    assert not sub.skip_backlog()


@pytest.mark.parametrize("kind", ["memory", "null"])
def test_an_in_process_blocking_subscription_has_no_backlog_to_skip(kind: str) -> None:
    """Events are delivered straight into its queue: skip_backlog() leaves
    them there."""
    bus = MemoryBus() if kind == "memory" else NullBus()
    try:
        sub = bus.subscribe_sync("mem.*")
        bus.publish_nowait("mem.x", {"n": 1})
        assert sub.skip_backlog()
        queued = sub.statistics().queued
    finally:
        asyncio.run(bus.close())
    assert queued == (1 if kind == "memory" else 0)


def test_a_follower_with_queue_group_members_refuses_to_skip_its_backlog(
    shm: tuple[ShmBus, ShmBus],
) -> None:
    subscriber, _ = shm

    async def main() -> None:
        async with subscriber.subscribe("jobs.*", queue="workers"):
            reader = subscriber._reader
            assert reader is not None
            with pytest.raises(RuntimeError, match="queue-group members"):
                reader.follower.skip_to_newest()

    asyncio.run(main())
