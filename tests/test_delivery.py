"""QueueSubscription: the bounded drop-oldest queue behind every subscription
(shmbus.delivery)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest

from shmbus.contract import Event
from shmbus.delivery import QueueSubscription, SubscriptionStatistics

#: Bound for "ends promptly": generous for a loaded machine, never reached
#: unless the behaviour is broken.
PROMPTLY = 1.0


def events(count: int, start: int = 0) -> list[Event]:
    return [Event(f"t.{i}", {"i": i}) for i in range(start, start + count)]


def accounted(sub: QueueSubscription) -> int:
    stats = sub.statistics()
    return stats.delivered + stats.dropped + stats.queued


async def until(predicate, timeout: float = 5.0) -> None:
    """Yield to the loop until *predicate()* is true; fail after *timeout*."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


# ─── Construction ────────────────────────────────────────────────────────────


@pytest.mark.parametrize("maxsize", [0, -1])
def test_maxsize_below_one_is_rejected(maxsize):
    with pytest.raises(ValueError, match=str(maxsize)):
        QueueSubscription("a.>", maxsize=maxsize)


def test_an_invalid_pattern_is_rejected():
    with pytest.raises(ValueError):
        QueueSubscription("a.>.b", maxsize=1)


async def test_a_subscription_made_on_a_loop_is_bound_to_it():
    sub = QueueSubscription("a.>", maxsize=4)
    assert sub.loop is asyncio.get_running_loop()


def test_a_subscription_made_without_a_loop_is_unbound():
    assert QueueSubscription("a.>", maxsize=4).loop is None


# ─── Queueing ────────────────────────────────────────────────────────────────


async def test_events_are_delivered_in_order():
    sub = QueueSubscription("t.*", maxsize=10)
    sent = events(5)
    sub.deliver(sent)
    received = [await sub.__anext__() for _ in range(5)]
    assert received == sent


async def test_a_full_queue_drops_the_oldest_events():
    sub = QueueSubscription("t.*", maxsize=3)
    sent = events(5)
    sub.deliver(sent)
    assert [await sub.__anext__() for _ in range(3)] == sent[2:]
    assert sub.dropped == 2


async def test_delivered_plus_dropped_plus_queued_equals_enqueued_at_every_step():
    sub = QueueSubscription("t.*", maxsize=4)
    enqueued = 0
    for round_ in range(20):
        batch = events(round_ % 7, start=enqueued)
        sub.deliver(batch)
        enqueued += len(batch)
        assert accounted(sub) == enqueued
        for _ in range(min(round_ % 3, sub.statistics().queued)):
            await sub.__anext__()
            assert accounted(sub) == enqueued


async def test_a_pending_iteration_wakes_up_when_an_event_arrives():
    sub = QueueSubscription("t.*", maxsize=4)
    task = asyncio.create_task(sub.__anext__())
    await asyncio.sleep(0)  # let it block on the empty queue
    assert not task.done()
    sent = events(1)
    sub.deliver(sent)
    assert await asyncio.wait_for(task, 5) is sent[0]


# ─── Other threads ───────────────────────────────────────────────────────────


async def test_deliver_from_another_thread_lands_on_the_home_loop():
    """The delivering thread only schedules the events; the queue fills when
    the home loop runs."""
    sub = QueueSubscription("t.*", maxsize=10)
    sent = events(3)
    thread = threading.Thread(target=sub.deliver, args=(sent,))
    thread.start()
    thread.join()  # the loop is blocked here: nothing can have been queued yet
    assert sub.statistics().queued == 0
    received = [await asyncio.wait_for(sub.__anext__(), 5) for _ in range(3)]
    assert received == sent


async def test_counts_stay_exact_when_another_thread_floods_a_small_queue():
    sub = QueueSubscription("t.*", maxsize=8)
    total = 5000
    thread = threading.Thread(
        target=lambda: [sub.deliver(events(10, start=i)) for i in range(0, total, 10)]
    )
    thread.start()
    received = []
    while thread.is_alive() or sub.statistics().queued:
        try:
            received.append(await asyncio.wait_for(sub.__anext__(), 0.05))
        except TimeoutError:
            pass
    thread.join()
    await until(lambda: accounted(sub) == total)
    while sub.statistics().queued:
        received.append(await sub.__anext__())
    stats = sub.statistics()
    assert stats.delivered == len(received)
    assert stats.delivered + stats.dropped == total
    order = [event.payload["i"] for event in received]
    assert order == sorted(order)


def test_events_delivered_before_any_loop_wait_for_the_first_loop_that_iterates():
    sub = QueueSubscription("t.*", maxsize=3)
    sent = events(5)
    sub.deliver(sent)  # no loop anywhere: kept, bounded, counted

    async def consume() -> list[Event]:
        out = [await sub.__anext__() for _ in range(3)]
        assert sub.loop is asyncio.get_running_loop()
        return out

    assert asyncio.run(consume()) == sent[2:]
    assert sub.dropped == 2
    assert sub.statistics().delivered == 3


def test_deliver_after_the_home_loop_closed_counts_the_events_as_dropped():
    async def make() -> QueueSubscription:
        return QueueSubscription("t.*", maxsize=8)

    sub = asyncio.run(make())
    thread = threading.Thread(target=sub.deliver, args=(events(4),))
    thread.start()
    thread.join()
    assert sub.dropped == 4
    assert sub.statistics().queued == 0


# ─── Closing ─────────────────────────────────────────────────────────────────


async def test_aclose_ends_a_pending_async_for_promptly():
    sub = QueueSubscription("t.*", maxsize=4)
    started = asyncio.Event()

    async def consume() -> list[Event]:
        out = []
        started.set()
        async for event in sub:
            out.append(event)
        return out

    task = asyncio.create_task(consume())
    await started.wait()
    await asyncio.sleep(0)  # into __anext__, waiting on the empty queue
    await sub.aclose()
    assert await asyncio.wait_for(task, PROMPTLY) == []


async def test_aclose_ends_every_pending_async_for_even_two_on_one_subscription():
    sub = QueueSubscription("t.*", maxsize=4)

    async def consume() -> list[Event]:
        return [event async for event in sub]

    tasks = [asyncio.create_task(consume()) for _ in range(2)]
    await asyncio.sleep(0)  # both block on the empty queue
    await sub.aclose()
    done, pending = await asyncio.wait(tasks, timeout=PROMPTLY)
    for task in pending:
        task.cancel()
    assert not pending


async def test_close_from_transport_in_another_thread_ends_a_pending_async_for():
    sub = QueueSubscription("t.*", maxsize=4)
    task = asyncio.create_task(sub.__anext__())
    await asyncio.sleep(0)
    thread = threading.Thread(target=sub.close_from_transport)
    thread.start()
    thread.join()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(task, PROMPTLY)
    assert sub.closed


async def test_aclose_discards_buffered_events():
    sub = QueueSubscription("t.*", maxsize=4)
    sub.deliver(events(3))
    await sub.aclose()
    assert [event async for event in sub] == []
    assert sub.statistics().queued == 0


async def test_deliver_after_close_is_ignored():
    sub = QueueSubscription("t.*", maxsize=4)
    await sub.aclose()
    sub.deliver(events(3))
    assert sub.statistics().queued == 0
    with pytest.raises(StopAsyncIteration):
        await sub.__anext__()


async def test_aclose_is_idempotent_and_calls_on_close_once():
    calls: list[QueueSubscription] = []
    sub = QueueSubscription("t.*", maxsize=4, on_close=calls.append)
    await sub.aclose()
    await sub.aclose()
    sub.close_from_transport()
    assert calls == [sub]
    assert sub.closed


async def test_close_from_transport_calls_on_close_once():
    calls: list[QueueSubscription] = []
    sub = QueueSubscription("t.*", maxsize=4, on_close=calls.append)
    sub.close_from_transport()
    sub.close_from_transport()
    await sub.aclose()
    assert calls == [sub]


async def test_async_with_closes_the_subscription():
    sub = QueueSubscription("t.*", maxsize=4)
    async with sub as entered:
        assert entered is sub
        assert not sub.closed
    assert sub.closed


# ─── Statistics and count_lost ───────────────────────────────────────────────


async def test_statistics_is_a_frozen_snapshot():
    sub = QueueSubscription("t.*", maxsize=2)
    sub.deliver(events(3))
    await sub.__anext__()
    snapshot = sub.statistics()
    assert snapshot == SubscriptionStatistics(
        pattern="t.*", delivered=1, dropped=1, queued=1, maxsize=2
    )
    sub.deliver(events(5))
    await sub.__anext__()
    assert snapshot.delivered == 1 and snapshot.dropped == 1 and snapshot.queued == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshot.delivered = 5  # type: ignore[misc]


async def test_count_lost_adds_to_dropped():
    sub = QueueSubscription("t.*", maxsize=4)
    sub.count_lost(3)
    sub.count_lost(2)
    assert sub.dropped == 5
    assert sub.statistics().dropped == 5


async def test_count_lost_ignores_non_positive_counts():
    sub = QueueSubscription("t.*", maxsize=4)
    sub.count_lost(0)
    sub.count_lost(-4)
    assert sub.dropped == 0


async def test_count_lost_after_close_is_ignored():
    sub = QueueSubscription("t.*", maxsize=4)
    await sub.aclose()
    sub.count_lost(3)
    assert sub.dropped == 0


async def test_dropped_counts_both_evicted_and_lost_events():
    sub = QueueSubscription("t.*", maxsize=2)
    sub.deliver(events(5))
    sub.count_lost(4)
    assert sub.dropped == 3 + 4
