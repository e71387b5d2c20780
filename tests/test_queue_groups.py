"""Queue groups in the bus contract: ``subscribe(pattern, queue=name)``.

Each matching event goes to exactly one member of a group (the subscriptions
with the same pattern and queue name); plain subscriptions still get every
event. Run on every transport (the fallback bus passes the group on to
whichever side it uses). The MemoryBus's choice of member is specified at
the end.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from awaiting import take
from every_transport import kind_of, ready, within

from shmbus import BaseBus, MemoryBus, NullBus, QueueSubscription
from shmbus.contract import MAX_QUEUE_NAME_LENGTH


@pytest.fixture
def grouped(transport: BaseBus) -> BaseBus:
    """The transport under test (every one has queue groups)."""
    return transport


async def drain(subs: list[QueueSubscription], total: int) -> dict[int, list[int]]:
    """Consume *subs* concurrently until *total* events arrived in all;
    ``{index of sub: [payload n, ...]}``."""
    got: dict[int, list[int]] = {index: [] for index in range(len(subs))}
    done = asyncio.Event()

    async def consume(index: int, sub: QueueSubscription) -> None:
        async for event in sub:
            got[index].append(event.payload["n"])
            if sum(len(v) for v in got.values()) >= total:
                done.set()

    tasks = [asyncio.create_task(consume(i, sub)) for i, sub in enumerate(subs)]
    try:
        await within(done.wait())
    finally:
        for task in tasks:
            task.cancel()
    return got


async def publish_numbers(bus: BaseBus, topic: str, count: int) -> None:
    for n in range(count):
        await bus.publish(topic, {"n": n})


# ─── Exactly one member ──────────────────────────────────────────────────────


async def test_each_event_goes_to_exactly_one_member_and_every_plain_subscription_gets_all(
    grouped: BaseBus,
) -> None:
    members = [grouped.subscribe("jobs.*", queue="workers") for _ in range(3)]
    plain = [grouped.subscribe("jobs.*") for _ in range(2)]
    await ready(grouped)
    await publish_numbers(grouped, "jobs.resize", 60)
    shares = await drain(members, 60)
    seen = [[e.payload["n"] for e in await take(sub, 60)] for sub in plain]
    every = Counter(n for share in shares.values() for n in share)
    assert every == Counter(range(60))  # each once, none twice
    assert seen == [list(range(60)), list(range(60))]
    for sub in members + plain:
        await sub.aclose()


async def test_two_groups_on_the_same_pattern_each_get_every_event_once(
    grouped: BaseBus,
) -> None:
    a = [grouped.subscribe("mail.>", queue="senders") for _ in range(2)]
    b = [grouped.subscribe("mail.>", queue="archivers") for _ in range(2)]
    await ready(grouped)
    await publish_numbers(grouped, "mail.out", 20)
    got_a, got_b = await drain(a, 20), await drain(b, 20)
    assert sorted(n for share in got_a.values() for n in share) == list(range(20))
    assert sorted(n for share in got_b.values() for n in share) == list(range(20))
    for sub in a + b:
        await sub.aclose()


async def test_the_same_queue_name_on_another_pattern_is_another_group(grouped: BaseBus) -> None:
    if kind_of(grouped) in ("nats", "fallback"):
        # The fallback bus is on NATS here (every_transport.make).
        pytest.skip("NATS groups members by queue name across patterns (see test_nats.py)")
    narrow = grouped.subscribe("work.a", queue="w")
    broad = grouped.subscribe("work.*", queue="w")
    await ready(grouped)
    await grouped.publish("work.a", {"n": 1})
    [from_narrow], [from_broad] = await take(narrow, 1), await take(broad, 1)
    assert from_narrow.payload == from_broad.payload == {"n": 1}
    await narrow.aclose()
    await broad.aclose()


async def test_a_lone_member_gets_every_event(grouped: BaseBus) -> None:
    async with grouped.subscribe("solo.*", queue="one") as sub:
        await ready(grouped)
        await publish_numbers(grouped, "solo.x", 10)
        events = await take(sub, 10)
    assert [e.payload["n"] for e in events] == list(range(10))


async def test_when_a_member_leaves_the_others_get_everything(grouped: BaseBus) -> None:
    # No flush after aclose(): on NATS the member's UNSUB goes out before the
    # PUBs this bus makes afterwards (NatsBus guarantees it).
    staying = grouped.subscribe("leave.*", queue="g")
    leaving = grouped.subscribe("leave.*", queue="g")
    await ready(grouped)
    await leaving.aclose()
    await publish_numbers(grouped, "leave.now", 10)
    events = await take(staying, 10)
    assert [e.payload["n"] for e in events] == list(range(10))
    await staying.aclose()


async def test_a_request_to_a_group_is_answered_by_exactly_one_member(grouped: BaseBus) -> None:
    members = [grouped.subscribe("svc.pool", queue="pool") for _ in range(3)]
    answered: list[int] = []

    async def serve(index: int, sub: QueueSubscription) -> None:
        async for request in sub:
            answered.append(index)
            await grouped.reply(request, {"by": index})

    tasks = [asyncio.create_task(serve(i, sub)) for i, sub in enumerate(members)]
    await ready(grouped)
    replies = [await within(grouped.request("svc.pool", {"n": n}, timeout=60)) for n in range(9)]
    for task in tasks:
        task.cancel()
    assert len(answered) == 9  # never two members for one request
    assert [r.payload["by"] for r in replies] == answered
    for sub in members:
        await sub.aclose()


# ─── Statistics ──────────────────────────────────────────────────────────────


async def test_a_members_statistics_name_its_group_and_count_its_share(grouped: BaseBus) -> None:
    members = [grouped.subscribe("stat.*", queue="counted") for _ in range(2)]
    plain = grouped.subscribe("stat.*")
    await ready(grouped)
    await publish_numbers(grouped, "stat.x", 10)
    shares = await drain(members, 10)
    await take(plain, 10)
    stats = [sub.statistics() for sub in members]
    assert [s.queue for s in stats] == ["counted", "counted"]
    assert [s.delivered for s in stats] == [len(shares[0]), len(shares[1])]
    assert sum(s.delivered + s.dropped for s in stats) == 10
    assert plain.statistics().queue is None
    assert "queue='counted'" in repr(members[0])
    for sub in [*members, plain]:
        await sub.aclose()


# ─── Bad queue names ─────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("queue", "error", "words"),
    [
        ("", ValueError, ["queue name must not be empty"]),
        ("two words", ValueError, ["queue name 'two words'", "whitespace"]),
        ("tab\there", ValueError, ["whitespace"]),
        ("a*", ValueError, ["queue name 'a*'", "wildcard"]),
        ("a.>", ValueError, ["wildcard"]),
        ("a..b", ValueError, ["empty token"]),
        ("q" * (MAX_QUEUE_NAME_LENGTH + 1), ValueError, [f"limit is {MAX_QUEUE_NAME_LENGTH}"]),
        (b"workers", TypeError, ["queue must be a str or None", "bytes"]),
        (1, TypeError, ["queue must be a str or None", "int"]),
    ],
)
async def test_a_bad_queue_name_is_refused_on_every_transport_naming_the_rule(
    with_null: BaseBus, queue: object, error: type[Exception], words: list[str]
) -> None:
    with pytest.raises(error) as info:
        with_null.subscribe("jobs.*", queue=queue)  # type: ignore[arg-type]
    assert all(word in str(info.value) for word in words), str(info.value)
    assert with_null.stats().subscriptions == 0


async def test_a_queue_name_of_the_maximum_length_is_accepted(with_null: BaseBus) -> None:
    sub = with_null.subscribe("jobs.*", queue="q" * MAX_QUEUE_NAME_LENGTH)
    assert sub.queue == "q" * MAX_QUEUE_NAME_LENGTH
    await sub.aclose()


async def test_a_null_bus_accepts_a_queue_group_and_ends_the_subscription() -> None:
    bus = NullBus()
    sub = bus.subscribe("jobs.*", queue="workers")
    assert sub.closed and sub.statistics().queue == "workers"
    assert [event async for event in sub] == []


# ─── MemoryBus: which member ─────────────────────────────────────────────────


async def test_memory_members_with_room_take_turns() -> None:
    bus = MemoryBus()
    members = [bus.subscribe("rr", queue="g") for _ in range(3)]
    for n in range(30):
        await bus.publish("rr", {"n": n})
    shares = [[e.payload["n"] for e in await take(sub, 10)] for sub in members]
    assert shares == [list(range(i, 30, 3)) for i in range(3)]
    await bus.close()


async def test_memory_a_member_with_a_full_queue_takes_no_work_while_another_has_room() -> None:
    bus = MemoryBus(queue_size=4)
    stalled = bus.subscribe("fill", queue="g")  # never consumed
    ready_member = bus.subscribe("fill", queue="g")
    received: list[int] = []

    async def consume() -> None:
        async for event in ready_member:
            received.append(event.payload["n"])

    task = asyncio.create_task(consume())
    for n in range(40):
        await bus.publish("fill", {"n": n})
        await asyncio.sleep(0)  # the ready member consumes as it goes
    task.cancel()
    assert stalled.statistics().queued == 4 and stalled.dropped == 0
    assert len(received) == 36 and ready_member.dropped == 0
    await bus.close()


async def test_memory_when_every_member_is_full_the_next_in_turn_drops_its_oldest() -> None:
    bus = MemoryBus(queue_size=2)
    members = [bus.subscribe("full", queue="g") for _ in range(2)]
    for n in range(6):
        await bus.publish("full", {"n": n})
    stats = [sub.statistics() for sub in members]
    assert [(s.queued, s.dropped) for s in stats] == [(2, 1), (2, 1)]
    assert sum(s.queued + s.dropped for s in stats) == 6  # nothing lost silently
    await bus.close()


async def test_memory_a_request_with_only_a_group_listening_has_a_responder() -> None:
    bus = MemoryBus()
    sub = bus.subscribe("svc", queue="g")
    pending = asyncio.create_task(bus.request("svc", {}, timeout=60))
    [request] = await take(sub, 1)
    await bus.reply(request, {"ok": True})
    assert (await within(pending)).payload == {"ok": True}
    await bus.close()
