"""ShmBus across real processes: no mocks, every agent is a spawned interpreter.

Synchronisation is by handshake only: an agent says ``"ready"`` after its
``subscribe()`` returned (or, for a publisher, after it connected) and the
parent says ``"go"``. Where a test must make sure nothing *extra* arrives, the
expected stream ends with a marker event or the subscriber waits for a short
quiet spell after it got everything. No test asserts on timing; the bounds
passed to ``recv()`` only turn a hang into a failure.

Tests in which several children close at about the same time also hold the
bus in the test process (``usefixtures("host")``), which closes last, so that
the check of what is left in ``/dev/shm`` does not race with their closing.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import agents
import pytest
from conftest import SMALL_RING
from shmbus_tools.children import Agent, running

from shmbus import ShmBus
from shmbus._core.inspection import read_bus
from shmbus._core.layout import MAX_SLOTS, SLOT_PID, min_capacity, slot_offset
from shmbus._core.leftovers import cleanup
from shmbus._core.shmfiles import SHM_DIR, bus_file_paths

Received = list[tuple[str, dict[str, Any]]]

#: Generous bound for an agent to finish its part (the box is shared).
FINISH = 60.0


# ─── Helpers ────────────────────────────────────────────────────────────────


pytestmark = pytest.mark.usefixtures("no_resource_tracker_left")


@pytest.fixture
async def host(bus_name: str) -> AsyncIterator[ShmBus]:
    """The test process's own instance of the test's bus (small ring)."""
    bus = ShmBus(bus_name, **SMALL_RING)
    await bus.connect()
    try:
        yield bus
    finally:
        await bus.close()


def slot_table(name: str) -> dict[int, int]:
    """``{pid: slot}`` as the segment's slot table records it now."""
    with open(f"{SHM_DIR}/shmbus.{name}", "rb") as f:
        slots = f.read(slot_offset(MAX_SLOTS))
    table = {}
    for slot in range(MAX_SLOTS):
        pid = struct.unpack_from("<Q", slots, slot_offset(slot) + SLOT_PID)[0]
        if pid:
            table[pid] = slot
    return table


def seqs_by_publisher(received: Received) -> dict[int, list[int]]:
    seqs: dict[int, list[int]] = {}
    for _topic, payload in received:
        seqs.setdefault(payload["pub"], []).append(payload["seq"])
    return seqs


def assert_increasing(seqs: list[int], what: str) -> None:
    """Strictly increasing: publish order kept and nothing delivered twice."""
    bad = [(a, b) for a, b in zip(seqs, seqs[1:], strict=False) if b <= a]
    assert not bad, f"{what}: sequence goes back or repeats at {bad[:5]} (of {len(bad)})"


def start_all(*group: Agent, message: str = "ready") -> None:
    for agent in group:
        agent.expect(message)


# ─── Delivery ───────────────────────────────────────────────────────────────


@pytest.mark.usefixtures("host")
async def test_one_publisher_fans_out_every_event_in_order_to_three_subscriber_processes(
    bus_name: str,
) -> None:
    """Three subscriber processes each get all N events of one publisher
    process, in publish order, none duplicated, none dropped. (N events fit
    in the ring and in each queue, so nothing may be lost.)"""
    n = 5_000
    topics = ["f.a", "f.b.c"]
    subs = [
        Agent(
            agents.subscriber,
            bus_name,
            "f.>",
            count=n,
            bus_kwargs={**SMALL_RING, "queue_size": n},
            linger=0.2,
        )
        for _ in range(3)
    ]
    pub = Agent(agents.publisher, bus_name, 7, topics, n, bus_kwargs=SMALL_RING)
    expected = [(topics[i % 2], {"pub": 7, "seq": i}) for i in range(n)]

    with running(*subs, pub):
        start_all(*subs, pub)
        pub.send("go")
        assert pub.recv(FINISH)["published"] == n
        reports = [sub.recv(FINISH) for sub in subs]

    for i, report in enumerate(reports):
        assert report["sub"]["dropped"] == 0, f"subscriber {i}: {report['sub']}"
        assert report["received"] == expected, f"subscriber {i} got a different stream"


@pytest.mark.usefixtures("host")
async def test_four_publisher_processes_fan_in_with_per_publisher_order_and_exact_loss_count(
    bus_name: str,
) -> None:
    """One subscriber process on four concurrent publisher processes (four
    rings): each publisher's events arrive in its publish order, none twice,
    each on its own topic, and delivered + dropped + queued == published
    while the subscription is open (a ring may lap a slow reader, its queue
    may overflow; what it loses must be counted, not vanish)."""
    per_publisher = 2_500
    pubs = [
        Agent(agents.publisher, bus_name, k, [f"in.p{k}"], per_publisher, bus_kwargs=SMALL_RING)
        for k in range(4)
    ]
    sub = Agent(
        agents.subscriber,
        bus_name,
        "in.>",
        count=4 * per_publisher,
        bus_kwargs=SMALL_RING,
        linger=0.2,
    )

    with running(sub, *pubs):
        start_all(sub, *pubs)
        for pub in pubs:
            pub.send("go")
        published = sum(pub.recv(FINISH)["bus"]["published"] for pub in pubs)
        report = sub.recv(FINISH)

    received = report["received"]
    assert published == 4 * per_publisher
    assert received, "the subscriber received nothing at all"
    for topic, payload in received:
        assert topic == f"in.p{payload['pub']}", (topic, payload)
    for pub_id, seqs in seqs_by_publisher(received).items():
        assert_increasing(seqs, f"publisher {pub_id}")
    sub = report["sub"]
    assert sub["delivered"] == len(received)
    assert sub["delivered"] + sub["dropped"] + sub["queued"] == published, sub
    assert report["bus"]["corrupt"] == 0, report["bus"]


async def test_wildcard_subscribers_in_other_processes_get_exactly_the_matching_topics(
    bus_name: str, host: ShmBus
) -> None:
    """Subscribers on ``a.*.x``, ``a.>`` and ``b.*`` each receive exactly the
    events whose topic matches, in order. The test process publishes one
    marker per subscriber last (from its own ring, so it may arrive before
    the end of the publisher's stream), and each subscriber lingers after
    its count: a stray event shows up as a mismatch."""
    topics = [
        "a.b.x",
        "a.c.x",
        "a.b.y",
        "a.b",
        "a.b.x.y",
        "b.c",
        "b.c.d",
        "c.a.x",
        "a",
        "b",
        "ab.c.x",
        "a.x",
    ]
    # Written out by hand, not computed with shmbus.matches.
    matching = {
        "a.*.x": {"a.b.x", "a.c.x"},
        "a.>": {"a.b.x", "a.c.x", "a.b.y", "a.b", "a.b.x.y", "a.x"},
        "b.*": {"b.c"},
    }
    markers = [("a.end.x", {"marker": 1}), ("b.end", {"marker": 2})]
    marker_for = {"a.*.x": markers[:1], "a.>": markers[:1], "b.*": markers[1:]}
    n = 50 * len(topics)
    stream = [(topics[i % len(topics)], {"pub": 1, "seq": i}) for i in range(n)]
    expected = {
        pattern: [e for e in stream if e[0] in wanted] + marker_for[pattern]
        for pattern, wanted in matching.items()
    }
    subs = {
        pattern: Agent(
            agents.subscriber,
            bus_name,
            pattern,
            count=len(expected[pattern]),
            bus_kwargs=SMALL_RING,
            linger=0.2,
        )
        for pattern in matching
    }
    pub = Agent(agents.publisher, bus_name, 1, topics, n, bus_kwargs=SMALL_RING)

    with running(*subs.values(), pub):
        start_all(*subs.values(), pub)
        pub.send("go")
        pub.recv(FINISH)
        for topic, payload in markers:
            await host.publish(topic, payload)
        reports = {pattern: agent.recv(FINISH) for pattern, agent in subs.items()}

    for pattern, report in reports.items():
        # One publisher's events in its order; the markers come from another
        # ring, in no promised order relative to them.
        from_publisher = [e for e in report["received"] if "marker" not in e[1]]
        got_markers = [e for e in report["received"] if "marker" in e[1]]
        assert from_publisher == expected[pattern][: -len(marker_for[pattern])], pattern
        assert got_markers == marker_for[pattern], f"subscriber on {pattern!r}"
        assert report["sub"]["dropped"] == 0, f"subscriber on {pattern!r}: {report['sub']}"


@pytest.mark.parametrize(
    "fresh_instance", [True, False], ids=["first-subscription", "added-subscription"]
)
async def test_event_published_right_after_subscribe_returns_in_another_process_is_received(
    bus_name: str, host: ShmBus, fresh_instance: bool
) -> None:
    """As soon as a child says its ``subscribe()`` returned, the test process
    publishes one event, with no sleep in between; the new subscription must
    get exactly that event. Repeated for 20 subscriptions, each the first on
    a new instance or each added to an instance whose reader already runs."""
    rounds = 20
    child = Agent(
        agents.subscribe_rounds,
        bus_name,
        "r.*",
        rounds,
        fresh_instance=fresh_instance,
        bus_kwargs=SMALL_RING,
    )
    with running(child):
        for i in range(rounds):
            child.expect(("ready", i))
            host.publish_nowait("r.x", {"round": i})
            child.expect(("got", i, "r.x", {"round": i}), FINISH)
        assert child.join() == 0


async def test_events_published_by_an_instance_reach_its_own_subscription(bus_name: str) -> None:
    """A process that publishes and subscribes on one instance receives its
    own events, all of them, in order."""
    n = 500
    child = Agent(agents.self_publisher, bus_name, "own.>", "own.t", n, bus_kwargs=SMALL_RING)
    with running(child):
        report = child.recv(FINISH)

    assert report["received"] == [("own.t", {"seq": i}) for i in range(n)]
    assert report["bus"]["published"] == n
    assert report["sub"]["dropped"] == 0


async def test_late_joiner_receives_only_events_published_after_it_subscribed(
    bus_name: str, host: ShmBus
) -> None:
    """Events published before a process subscribed are still in the ring but
    are not replayed to it: it receives exactly the later ones."""
    for i in range(100):
        await host.publish("h.x", {"seq": i, "era": "before"})
    joiner = Agent(agents.subscriber, bus_name, "h.>", count=50, bus_kwargs=SMALL_RING, linger=0.2)

    with running(joiner):
        joiner.expect("ready")
        for i in range(50):
            await host.publish("h.x", {"seq": i, "era": "after"})
        report = joiner.recv(FINISH)

    assert report["received"] == [("h.x", {"seq": i, "era": "after"}) for i in range(50)]
    assert report["sub"]["dropped"] == 0


async def test_subscription_added_while_its_instance_reads_behind_gets_no_earlier_events(
    bus_name: str, host: ShmBus
) -> None:
    """A process's instance has a subscription but its reader has not yet
    read 100 events published meanwhile (its loop is busy) when it opens a
    second subscription: the reader then reads all of them, yet the second
    subscription receives only the events published after it was opened,
    while the first receives everything."""
    child = Agent(
        agents.subscriber_behind, bus_name, "h.>", count=50, bus_kwargs=SMALL_RING, linger=0.2
    )
    before = [("h.x", {"seq": i, "era": "before"}) for i in range(100)]
    after = [("h.x", {"seq": i, "era": "after"}) for i in range(50)]

    with running(child):
        child.expect("ready")
        for topic, payload in before:
            await host.publish(topic, payload)
        child.send("subscribe")
        child.expect("ready")
        for topic, payload in after:
            await host.publish(topic, payload)
        report = child.recv(FINISH)

    assert report["received"] == after
    assert report["sub"]["dropped"] == 0
    assert report["first"] == before + after


# ─── Loss accounting ────────────────────────────────────────────────────────


@pytest.mark.usefixtures("host")
async def test_stalled_subscriber_loss_is_counted_exactly(bus_name: str) -> None:
    """A subscriber process whose event loop is stalled while a publisher
    writes several times the ring's capacity is lapped in the ring, then
    overflows its small queue when it resumes. Every event of the stream
    matches its pattern, so received + dropped == published exactly, and
    what it does receive is in order and never duplicated."""
    n = 20_000
    stalled = Agent(
        agents.stalled_subscriber,
        bus_name,
        "s.>",
        bus_kwargs={**SMALL_RING, "queue_size": 16},
    )
    pub = Agent(agents.publisher, bus_name, 3, ["s.a", "s.b"], n, bus_kwargs=SMALL_RING, pad=200)

    with running(stalled, pub):
        start_all(stalled, pub)
        pub.send("go")
        published = pub.recv(FINISH)["bus"]["published"]
        stalled.send(("drain", published))
        report = stalled.recv(FINISH)

    sub = report["sub"]
    received = report["received"]
    assert published == n
    assert sub["lost"] > 0, f"the ring never lapped the stalled reader: {sub}"
    assert sub["evicted"] > 0, f"the queue never overflowed: {sub}"
    assert_increasing([payload["seq"] for _topic, payload in received], "stalled subscriber")
    assert len(received) + sub["dropped"] == published, sub
    assert report["bus"]["corrupt"] == 0, report["bus"]


@pytest.mark.usefixtures("host")
async def test_stalled_subscriber_loss_over_several_publisher_rings_is_counted_exactly(
    bus_name: str,
) -> None:
    """Three publisher processes, each with a small ring of its own, write
    several times its capacity while a subscriber process is stalled: it is
    lapped in every ring. Received + dropped == published exactly over all
    of them, and each publisher's events it does receive are in order and
    never duplicated."""
    per_publisher = 5_000
    small = {"capacity": 256 * 1024, "max_event_size": SMALL_RING["max_event_size"]}
    stalled = Agent(
        agents.stalled_subscriber, bus_name, "m.>", bus_kwargs={**SMALL_RING, "queue_size": 64}
    )
    pubs = [
        Agent(agents.publisher, bus_name, k, [f"m.p{k}"], per_publisher, bus_kwargs=small, pad=200)
        for k in range(3)
    ]

    with running(stalled, *pubs):
        start_all(stalled, *pubs)
        for pub in pubs:
            pub.send("go")
        published = sum(pub.recv(FINISH)["bus"]["published"] for pub in pubs)
        stalled.send(("drain", published))
        report = stalled.recv(FINISH)

    sub = report["sub"]
    received = report["received"]
    assert published == 3 * per_publisher
    assert sub["lost"] > 0, f"no ring lapped the stalled reader: {sub}"
    for pub_id, seqs in seqs_by_publisher(received).items():
        assert_increasing(seqs, f"publisher {pub_id}")
    assert len(received) + sub["dropped"] == published, sub
    assert report["bus"]["corrupt"] == 0, report["bus"]


# ─── Life cycle across processes ────────────────────────────────────────────


async def test_last_process_to_close_removes_the_bus_files(bus_name: str) -> None:
    """Two processes attach, subscribe and publish (so wake-up FIFOs and
    ring files exist too). After the first closes, the bus's files remain;
    after the last closes, none of them is left in /dev/shm."""
    first = Agent(agents.holder, bus_name, bus_kwargs=SMALL_RING, pattern="z.>", publish="z.a")
    last = Agent(agents.holder, bus_name, bus_kwargs=SMALL_RING, pattern="z.>", publish="z.a")

    with running(first, last):
        start_all(first, last, message="attached")
        while_both = bus_file_paths(bus_name)
        first.send("close")
        first.expect("closed")
        assert first.join() == 0
        after_first = bus_file_paths(bus_name)
        last.send("close")
        last.expect("closed")
        assert last.join() == 0
        after_last = bus_file_paths(bus_name)

    segment = f"{SHM_DIR}/shmbus.{bus_name}"
    fifos = [path for path in while_both if ":wake." in path]
    rings = [path for path in while_both if ":ring." in path]
    assert segment in while_both and len(fifos) == 2 and len(rings) == 2, while_both
    assert segment in after_first, after_first
    assert after_last == []


@pytest.mark.usefixtures("host")
async def test_killed_subscriber_process_neither_stops_a_publisher_nor_keeps_its_slot(
    bus_name: str,
) -> None:
    """A subscriber process is SIGKILLed while a publisher process is
    mid-stream: the publisher still completes all its publishes without an
    error. The dead process's instance slot is free again: the next instance
    to attach gets it (slots go lowest free first, and the victim attached
    before the publisher) and receives what the same publisher publishes
    next."""
    n = 20_000
    victim = Agent(agents.subscriber, bus_name, "k.>", bus_kwargs=SMALL_RING)
    pub = Agent(
        agents.publisher,
        bus_name,
        5,
        ["k.a"],
        n,
        bus_kwargs=SMALL_RING,
        progress_at=n // 4,
        rounds=2,
    )
    newcomer = Agent(agents.subscriber, bus_name, "k.>", count=n, bus_kwargs=SMALL_RING)
    with running(victim):
        victim.expect("ready")
        victim_slot = slot_table(bus_name)[victim.pid]
        with running(pub):
            pub.expect("ready")
            pub.send("go")
            pub.expect("progress", FINISH)
            victim.kill()
            first_round = pub.recv(FINISH)
            assert victim.process.exitcode == -9
            with running(newcomer):
                newcomer.expect("ready")
                newcomer_slot = slot_table(bus_name).get(newcomer.pid)
                pub.send("go")
                pub.expect("progress", FINISH)
                second_round = pub.recv(FINISH)
                after = newcomer.recv(FINISH)

    assert first_round["published"] == n
    assert second_round["bus"]["published"] == 2 * n
    assert second_round["bus"]["publish_errors"] == 0, second_round["bus"]
    assert newcomer_slot == victim_slot
    received = after["received"]
    assert len(received) + after["sub"]["dropped"] == n, after["sub"]
    assert received and {topic for topic, _ in received} == {"k.a"}
    assert_increasing([payload["seq"] for _, payload in received], "newcomer")
    assert received[0][1]["seq"] >= n, "the newcomer got an event from before it subscribed"


async def test_a_process_that_asks_no_ring_sizes_adopts_the_bus_s_and_big_events_flow(
    bus_name: str,
) -> None:
    """This process makes a bus whose events may be 2 MiB (the library's
    default limit is 1 MiB); a process that asks for no sizes adopts the
    bus's capacity and max_event_size, and 1.5 MiB events flow both ways."""
    big = 3 * 512 * 1024
    async with ShmBus(bus_name, max_event_size=2 * 1024 * 1024) as owner:
        assert owner.capacity >= min_capacity(owner.max_event_size)
        sub = owner.subscribe("big.>")
        child = Agent(agents.peer, bus_name, "big.>", [("big.child", big)], 2, bus_kwargs={})
        with running(child):
            ready, geometry = child.recv(FINISH)
            child.send("go")
            child.expect("published", FINISH)
            await owner.publish("big.owner", {"seq": 0, "blob": "x" * big})
            report = child.recv(FINISH)
            got = [await asyncio.wait_for(sub.__anext__(), FINISH) for _ in range(2)]
        assert sorted((e.topic, len(e.payload["blob"])) for e in got) == [
            ("big.child", big),
            ("big.owner", big),
        ]
        await sub.aclose()
        expected_geometry = {"capacity": owner.capacity, "max_event_size": owner.max_event_size}
    assert ready == "ready"
    assert {k: geometry[k] for k in expected_geometry} == expected_geometry
    assert sorted(report["received"]) == [("big.child", 0, big), ("big.owner", 0, big)]
    assert report["bus"]["publish_errors"] == 0


@pytest.mark.parametrize(
    ("asked", "ring_capacity"),
    [
        ({"capacity": 2 * SMALL_RING["capacity"]}, 2 * SMALL_RING["capacity"]),
        ({"max_event_size": 16 * 1024}, SMALL_RING["capacity"]),
        ({"queue_size": 7}, SMALL_RING["capacity"]),
        ({"low_latency": True}, SMALL_RING["capacity"]),
    ],
    ids=["own-capacity", "own-max-event-size", "own-queue-size", "low-latency"],
)
async def test_a_process_with_options_of_its_own_joins_and_exchanges_events_both_ways(
    bus_name: str, host: ShmBus, asked: dict[str, Any], ring_capacity: int
) -> None:
    """Ring sizes, queue_size and low_latency are local to an instance: a
    process that asks for its own joins the bus of this process, writes a
    ring of the capacity it asked for (the bus's otherwise), and events go
    both ways, each publisher's in order."""
    n = 3
    sub = host.subscribe("g.>")
    child = Agent(agents.peer, bus_name, "g.>", [("g.child", 10)] * n, 2 * n, bus_kwargs=asked)
    with running(child):
        ready, geometry = child.recv(FINISH)
        child.send("go")
        child.expect("published", FINISH)
        rings = {ring.writer_pid: ring for ring in read_bus(bus_name).rings}
        for i in range(n):
            await host.publish("g.host", {"seq": i, "blob": ""})
        report = child.recv(FINISH)
        got = [await asyncio.wait_for(sub.__anext__(), FINISH) for _ in range(2 * n)]
    await sub.aclose()

    assert ready == "ready"
    assert rings[child.pid].capacity == ring_capacity
    assert geometry["capacity"] == ring_capacity
    assert geometry["queue_size"] == asked.get("queue_size", 1024)
    assert report["sub"]["maxsize"] == geometry["queue_size"]
    expected = {"g.child": list(range(n)), "g.host": list(range(n))}
    child_got: dict[str, list[int]] = {}
    for topic, seq, _size in report["received"]:
        child_got.setdefault(topic, []).append(seq)
    host_got: dict[str, list[int]] = {}
    for event in got:
        host_got.setdefault(event.topic, []).append(event.payload["seq"])
    assert child_got == expected and host_got == expected
    assert report["sub"]["dropped"] == 0


@pytest.mark.parametrize("keep", [True, False], ids=["instance-kept", "instance-dropped"])
def test_a_process_that_publishes_and_exits_without_closing_leaves_no_file(
    bus_name: str, keep: bool
) -> None:
    """A process publishes on an instance it never closes, with no event
    loop, and exits normally: its instance is closed at exit and, being the
    last one, removes every file of the bus (segment and ring), whether the
    process still referenced the instance (kept) or not
    (``ShmBus(name).publish_nowait(...)``)."""
    child = Agent(agents.publish_and_return, bus_name, "exit.t", keep=keep)
    try:
        with running(child):
            child.expect("published", FINISH)
            assert child.join(FINISH) == 0
        assert bus_file_paths(bus_name) == []
    finally:
        cleanup(bus_name)  # what the failing variant left (its process is gone)


async def test_processes_closing_at_the_same_moment_still_remove_the_bus_files(
    bus_name: str,
) -> None:
    """Two processes, the only ones on the bus, close their instances at the
    same instant, 50 times over: every time, the bus's files are gone once
    both have closed."""
    rounds = 50
    pair = [Agent(agents.holder, bus_name, bus_kwargs=SMALL_RING, rounds=rounds) for _ in range(2)]
    leaked = []
    with running(*pair):
        for r in range(rounds):
            if r:
                for agent in pair:
                    agent.send("again")
            start_all(*pair, message="attached")
            # Not synchronisation: both close at one instant, to make the race likely.
            instant = time.monotonic() + 0.02
            for agent in pair:
                agent.send(("close_at", instant))
            for agent in pair:
                agent.expect("closed")
            left = bus_file_paths(bus_name)
            if left:
                leaked.append(r)
                for path in left:  # start the next round clean, leave nothing behind
                    os.unlink(path)

    assert not leaked, f"files left behind after {len(leaked)} of {rounds} simultaneous closes"
