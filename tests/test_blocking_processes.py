"""Blocking subscriptions across real processes: every agent is a spawned
interpreter (:mod:`blocking_agents`), with no event loop unless it says so.

Synchronisation is by handshake: an agent says ``"ready"`` once its
subscriptions exist (or, for a publisher, once it is connected). No test
asserts on timing; the bounds passed to ``recv()`` only turn a hang into a
failure.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import agents
import blocking_agents
import pytest
from conftest import SMALL_RING
from shmbus_tools.children import Agent, running

from shmbus import ShmBus
from shmbus._core.inspection import read_bus
from shmbus._core.leftovers import cleanup
from shmbus._core.shmfiles import bus_file_paths

#: Generous bound for an agent to finish its part (the box is shared).
FINISH = 60.0


pytestmark = pytest.mark.usefixtures("no_resource_tracker_left")


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def wait_stopped(pid: int) -> None:
    deadline = time.monotonic() + FINISH
    while process_state(pid) != "T":
        assert time.monotonic() < deadline, f"process {pid} never stopped"
        time.sleep(0.005)


def doorbells(name: str) -> list[str]:
    return [path for path in bus_file_paths(name) if "/sem.shmbus." in path]


def seqs(received: list[Any]) -> list[int]:
    return [payload["seq"] for _topic, payload in received]


# ─── Delivery ───────────────────────────────────────────────────────────────


@pytest.mark.usefixtures("host")
def test_a_blocking_subscriber_process_gets_every_event_of_an_asyncio_publisher_in_order(
    bus_name: str,
) -> None:
    n = 2_000
    sub = Agent(
        blocking_agents.blocking_subscriber,
        bus_name,
        "x.>",
        n,
        bus_kwargs={**SMALL_RING, "queue_size": n},
    )
    pub = Agent(agents.publisher, bus_name, 3, ["x.a", "x.b.c"], n, bus_kwargs=SMALL_RING)
    with running(sub, pub):
        sub.expect("ready", FINISH)
        pub.expect("ready", FINISH)
        pub.send("go")
        assert pub.recv(FINISH)["published"] == n
        report = sub.recv(FINISH)
        sub.send("close")
        sub.expect("closed", FINISH)
    [take] = report["takes"]
    assert take["error"] is None
    assert take["received"] == [(["x.a", "x.b.c"][i % 2], {"pub": 3, "seq": i}) for i in range(n)]
    assert (take["stats"]["delivered"], take["stats"]["dropped"]) == (n, 0)
    assert (report["bus"]["delivered"], report["bus"]["subscriptions"]) == (n, 1)


@pytest.mark.usefixtures("host")
def test_an_asyncio_subscriber_process_gets_every_event_of_a_publisher_without_event_loop(
    bus_name: str,
) -> None:
    n = 500
    sub = Agent(blocking_agents.async_subscriber, bus_name, "y.*", n, bus_kwargs=SMALL_RING)
    pub = Agent(blocking_agents.plain_publisher, bus_name, "y.z", n, bus_kwargs=SMALL_RING)
    with running(sub, pub):
        sub.expect("ready", FINISH)
        pub.expect("ready", FINISH)
        pub.send("go")
        assert pub.recv(FINISH) == {"published": n}
        report = sub.recv(FINISH)
        pub.send("close")
        pub.expect("closed", FINISH)
    assert seqs(report["received"]) == list(range(n))


@pytest.mark.usefixtures("host")
def test_processes_with_no_event_loop_at_all_exchange_events_through_blocking_subscriptions(
    bus_name: str,
) -> None:
    """Publishers and subscribers in four processes, none running an event
    loop (publish_nowait, subscribe_sync): each subscriber gets every event
    on its topic, in order."""
    n = 300
    left = Agent(blocking_agents.blocking_subscriber, bus_name, "to.left", n, bus_kwargs=SMALL_RING)
    right = Agent(
        blocking_agents.blocking_subscriber, bus_name, "to.right", n, bus_kwargs=SMALL_RING
    )
    to_left = Agent(blocking_agents.plain_publisher, bus_name, "to.left", n, bus_kwargs=SMALL_RING)
    to_right = Agent(
        blocking_agents.plain_publisher, bus_name, "to.right", n, bus_kwargs=SMALL_RING
    )
    with running(left, right, to_left, to_right):
        for agent in (left, right, to_left, to_right):
            agent.expect("ready", FINISH)
        for publisher in (to_left, to_right):
            publisher.send("go")
        for publisher in (to_left, to_right):
            publisher.expect({"published": n}, FINISH)
        reports = [left.recv(FINISH), right.recv(FINISH)]
        for agent in (left, right, to_left, to_right):
            agent.send("close")
            agent.expect("closed", FINISH)
    for report, topic in zip(reports, ("to.left", "to.right"), strict=True):
        [take] = report["takes"]
        assert take["received"] == [(topic, {"pub": 0, "seq": i}) for i in range(n)]


@pytest.mark.usefixtures("host")
def test_threads_of_a_process_each_with_a_blocking_subscription_all_get_every_event(
    bus_name: str,
) -> None:
    n = 400
    sub = Agent(
        blocking_agents.blocking_subscriber,
        bus_name,
        "t.*",
        n,
        threads=4,
        bus_kwargs={**SMALL_RING, "queue_size": n},
    )
    pub = Agent(blocking_agents.plain_publisher, bus_name, "t.x", n, bus_kwargs=SMALL_RING)
    with running(sub, pub):
        sub.expect("ready", FINISH)
        pub.expect("ready", FINISH)
        pub.send("go")
        pub.expect({"published": n}, FINISH)
        report = sub.recv(FINISH)
        for agent in (sub, pub):
            agent.send("close")
            agent.expect("closed", FINISH)
    assert len(report["takes"]) == 4
    for take in report["takes"]:
        assert take["error"] is None
        assert seqs(take["received"]) == list(range(n))
    assert report["bus"]["delivered"] == 4 * n


def test_a_blocking_subscription_gets_nothing_published_before_it_was_made(
    bus_name: str, host: ShmBus
) -> None:
    host.publish_nowait("early.x", {"seq": -1})
    sub = Agent(blocking_agents.blocking_subscriber, bus_name, "early.*", 3, bus_kwargs=SMALL_RING)
    with running(sub):
        sub.expect("ready", FINISH)
        for seq in range(3):
            host.publish_nowait("early.x", {"seq": seq})
        report = sub.recv(FINISH)
        sub.send("close")
        sub.expect("closed", FINISH)
    assert seqs(report["takes"][0]["received"]) == [0, 1, 2]


@pytest.mark.usefixtures("host")
def test_a_tiny_queue_drops_the_oldest_and_counts_every_event_exactly(bus_name: str) -> None:
    """A blocking subscription holding 4 events starts taking only after
    another process published 200: it gets the 4 newest it read, and
    delivered + dropped is exactly 200."""
    n = 200
    sub = Agent(
        blocking_agents.blocking_subscriber,
        bus_name,
        "q.*",
        n,
        wait_for_go=True,
        bus_kwargs={**SMALL_RING, "queue_size": 4},
    )
    pub = Agent(blocking_agents.plain_publisher, bus_name, "q.x", n, bus_kwargs=SMALL_RING)
    with running(sub, pub):
        sub.expect("ready", FINISH)
        pub.expect("ready", FINISH)
        pub.send("go")
        pub.expect({"published": n}, FINISH)
        sub.send("go")
        report = sub.recv(FINISH)
        for agent in (sub, pub):
            agent.send("close")
            agent.expect("closed", FINISH)
    [take] = report["takes"]
    stats = take["stats"]
    assert stats["delivered"] + stats["dropped"] == n
    assert stats["dropped"] > 0 and stats["queued"] == 0
    received = seqs(take["received"])
    assert received == sorted(received) and received[-1] == n - 1
    assert len(received) == stats["delivered"]


# ─── Publishers that stop or die ────────────────────────────────────────────


@pytest.mark.usefixtures("host")
@pytest.mark.parametrize("point", ["mid-record", "committed"])
def test_a_publisher_killed_while_a_blocking_reader_waits_wedges_nothing(
    bus_name: str, point: str
) -> None:
    """A publisher is SIGKILLed mid-record (written, not committed) or right
    after its commit (before it rang anyone) while a blocking subscriber
    waits. The subscriber gets what the dead one committed (the event it
    died after committing too: the reader's timed re-check finds it) and
    then every event of another publisher."""
    before = 5
    committed = before + (point == "committed")
    sub = Agent(
        blocking_agents.blocking_subscriber, bus_name, "k.*", committed + 50, bus_kwargs=SMALL_RING
    )
    doomed = Agent(
        blocking_agents.stuck_publisher,
        bus_name,
        "k.doomed",
        point,
        before=before,
        bus_kwargs=SMALL_RING,
    )
    other = Agent(blocking_agents.plain_publisher, bus_name, "k.other", 50, bus_kwargs=SMALL_RING)
    with running(sub, doomed, other):
        for agent in (sub, doomed, other):
            agent.expect("ready", FINISH)
        doomed.send("go")
        doomed.expect(("halted", point), FINISH)
        doomed.kill()
        other.send("go")
        other.expect({"published": 50}, FINISH)
        report = sub.recv(FINISH)
        for agent in (sub, other):
            agent.send("close")
            agent.expect("closed", FINISH)
    [take] = report["takes"]
    assert take["error"] is None
    by_topic: dict[str, list[int]] = {}
    for topic, payload in take["received"]:
        by_topic.setdefault(topic, []).append(payload["seq"])
    assert by_topic == {"k.doomed": list(range(committed)), "k.other": list(range(50))}


@pytest.mark.usefixtures("host")
def test_a_publisher_stopped_mid_record_while_a_blocking_reader_waits_wedges_nothing(
    bus_name: str,
) -> None:
    """A publisher SIGSTOPs itself mid-record while a blocking subscriber
    waits: the subscriber gets another publisher's events meanwhile, and the
    stopped one's event once it is continued."""
    sub = Agent(
        blocking_agents.blocking_subscriber, bus_name, "s.*", 3 + 50 + 1, bus_kwargs=SMALL_RING
    )
    stopped = Agent(
        blocking_agents.stuck_publisher,
        bus_name,
        "s.stopped",
        "mid-record",
        before=3,
        stop=True,
        bus_kwargs=SMALL_RING,
    )
    other = Agent(blocking_agents.plain_publisher, bus_name, "s.other", 50, bus_kwargs=SMALL_RING)
    with running(sub, stopped, other):
        for agent in (sub, stopped, other):
            agent.expect("ready", FINISH)
        stopped.send("go")
        stopped.expect(("halted", "mid-record"), FINISH)
        wait_stopped(stopped.pid)
        other.send("go")
        other.expect({"published": 50}, FINISH)
        # The subscriber has the other's 50 now, without the stopped one.
        assert read_bus(bus_name).readers == 1
        os.kill(stopped.pid, signal.SIGCONT)
        stopped.expect({"published": 4}, FINISH)
        report = sub.recv(FINISH)
        for agent in (sub, stopped, other):
            agent.send("close")
            agent.expect("closed", FINISH)
    [take] = report["takes"]
    by_topic: dict[str, list[int]] = {}
    for topic, payload in take["received"]:
        by_topic.setdefault(topic, []).append(payload["seq"])
    assert by_topic == {"s.stopped": [0, 1, 2, 3], "s.other": list(range(50))}


# ─── Files ──────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("thread", ["none", "daemon", "worker"])
def test_a_process_that_exits_without_closing_its_blocking_subscription_leaves_nothing(
    bus_name: str, thread: str
) -> None:
    """A process subscribes with subscribe_sync and returns from its main
    function without closing anything, while no thread, a daemon thread or
    a non-daemon thread iterates the subscription: it exits (the non-daemon
    thread's iteration ends at shutdown) and leaves no file."""
    child = Agent(
        blocking_agents.leaves_without_closing,
        bus_name,
        "e.*",
        thread=thread,
        bus_kwargs=SMALL_RING,
    )
    publisher = ShmBus(bus_name, **SMALL_RING)
    publisher.connect_sync()
    try:
        with running(child):
            child.expect("ready", FINISH)
            publisher.publish_nowait("e.x", {"n": 1})
            took = child.recv(FINISH)
            if thread != "none":
                child.send("return")
            exitcode = child.join(FINISH)
            bells = doorbells(bus_name)
    finally:
        publisher.close_sync()
    assert took == ("took", {"n": 1})
    assert exitcode == 0
    assert bells == []
    assert bus_file_paths(bus_name) == []


def test_the_doorbell_of_a_killed_blocking_subscriber_is_removed_with_the_bus(
    bus_name: str,
) -> None:
    """A blocking subscriber process is SIGKILLed: its doorbell stays while
    the bus lives (nobody posts it: its slot is dead), and goes when the
    last live process closes; a bus whose every process died loses it to
    cleanup()."""
    host = ShmBus(bus_name, **SMALL_RING)
    host.connect_sync()
    try:
        sub = Agent(blocking_agents.blocking_subscriber, bus_name, "d.*", 1, bus_kwargs=SMALL_RING)
        with running(sub):
            sub.expect("ready", FINISH)
            bells = doorbells(bus_name)
            sub.kill()
        host.publish_nowait("d.x", {})  # rings nobody: the slot is dead
        after_kill = doorbells(bus_name)
    finally:
        host.close_sync()
    assert len(bells) == 1 and after_kill == bells
    assert bus_file_paths(bus_name) == []
    # The whole bus dies: cleanup() removes the doorbell with the rest.
    lone = Agent(blocking_agents.blocking_subscriber, bus_name, "d.*", 1, bus_kwargs=SMALL_RING)
    with running(lone):
        lone.expect("ready", FINISH)
        lone.kill()
    left = doorbells(bus_name)
    removed = cleanup(bus_name)
    assert len(left) == 1 and left[0] in removed
    assert bus_file_paths(bus_name) == []


def test_the_next_instance_in_a_killed_blocking_readers_slot_removes_its_doorbell(
    bus_name: str, host: ShmBus
) -> None:
    sub = Agent(blocking_agents.blocking_subscriber, bus_name, "r.*", 1, bus_kwargs=SMALL_RING)
    with running(sub):
        sub.expect("ready", FINISH)
        [bell] = doorbells(bus_name)
        sub.kill()
    # The dead process held two slots: its instance's and its reader's. Two
    # newcomers take them (slots are claimed first free first).
    newcomers = [ShmBus(bus_name, **SMALL_RING) for _ in range(2)]
    try:
        for newcomer in newcomers:
            newcomer.connect_sync()
        left = doorbells(bus_name)
    finally:
        for newcomer in newcomers:
            newcomer.close_sync()
    assert bell not in left


@pytest.mark.parametrize("waiting", [True, False], ids=["thread-waiting", "nobody-waiting"])
def test_a_blocking_subscription_inherited_across_fork_ends_in_the_child_only(
    bus_name: str, waiting: bool
) -> None:
    """A process forks (while one of its threads waits in get(), or not): in the
    child, the inherited subscription is closed (get raises
    SubscriptionClosedError) and a new bus of its own works; the parent's
    reader keeps its doorbell and its live slot, and its waiting thread gets
    the next event; nothing is left."""
    agent = Agent(
        blocking_agents.forking_consumer, bus_name, waiting=waiting, bus_kwargs=SMALL_RING
    )
    with running(agent):
        report = agent.recv(FINISH)
        assert agent.join(FINISH) == 0
    assert report["child"] == {"inherited": "SubscriptionClosedError", "own": {"n": 1}}
    assert report["child_exit"] == 0
    assert report["parent_reader_after_fork"] == (1, 1)
    assert report["parent_got"] == [{"n": 2}]
    assert bus_file_paths(bus_name) == []


def test_a_blocking_reader_lets_a_dead_publishers_ring_go_once_it_has_read_it(
    bus_name: str, host: ShmBus
) -> None:
    """A publisher process publishes and is SIGKILLed before the blocking
    subscriber has read anything: its ring is owed to the subscriber and
    stays. Once the subscriber has read it, the reader's periodic chores (done
    in the consuming thread) let go of it and it is removed."""
    sub = host.subscribe_sync("dead.*")
    pub = Agent(blocking_agents.plain_publisher, bus_name, "dead.x", 3, bus_kwargs=SMALL_RING)
    with running(pub):
        pub.expect("ready", FINISH)
        pub.send("go")
        pub.expect({"published": 3}, FINISH)
        pub.kill()
    rings_while_owed = [path for path in bus_file_paths(bus_name) if ":ring." in path]
    got = [sub.get(FINISH).payload["seq"] for _ in range(3)]
    deadline = time.monotonic() + FINISH
    while any(":ring." in path for path in bus_file_paths(bus_name)):
        assert time.monotonic() < deadline, "the dead publisher's ring was never removed"
        with pytest.raises(TimeoutError):
            sub.get(0.05)
    sub.close()
    assert len(rings_while_owed) == 1
    assert got == [0, 1, 2]
