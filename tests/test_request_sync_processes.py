"""Blocking request/reply (``request_sync``, ``reply_nowait``) on ShmBus
between real processes: every agent is a spawned interpreter with its own bus
instance (tests/request_agents.py); the ``blocking_*`` agents and this test
process run no event loop.

Synchronisation is by handshake ("ready", "go", "holding", "stop"); the
bounds passed to ``recv()`` and the timeouts of the requests that must
succeed only turn a hang into a failure. The test process holds the bus too
(``host``), so that it closes last.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
import request_agents
from conftest import SMALL_RING
from shmbus_tools.children import Agent, running
from threads import InThread, wait_until

from shmbus import Event, NoRespondersError, RequestTimeoutError, ShmBus
from shmbus._core.inspection import read_bus
from shmbus._core.layout import min_capacity

#: Generous bound for an agent to finish its part (the box is shared).
FINISH = 60.0
#: Timeout of requests that must be answered: never reached unless broken.
ANSWERED = 60.0
#: The smallest ring 256-byte events fit in: a few dozen small events wrap it.
TINY_RING: dict[str, Any] = {"capacity": min_capacity(256), "max_event_size": 256}
#: Events a flooder publishes: its tiny ring wraps many times over.
FLOOD = 2000


pytestmark = pytest.mark.usefixtures("no_resource_tracker_left")


def asyncio_responder(bus_name: str, *, hold: bool = False) -> Agent:
    return Agent(request_agents.responder, bus_name, "svc.>", hold=hold, bus_kwargs=SMALL_RING)


def blocking_responder(bus_name: str, *, hold: bool = False) -> Agent:
    return Agent(
        request_agents.blocking_responder, bus_name, "svc.>", hold=hold, bus_kwargs=SMALL_RING
    )


def blocking_requester(bus_name: str, count: int, threads: int) -> Agent:
    return Agent(
        request_agents.blocking_requester,
        bus_name,
        "svc.echo",
        count,
        threads=threads,
        timeout=ANSWERED,
        bus_kwargs=SMALL_RING,
    )


@pytest.mark.parametrize("kind", ["asyncio", "blocking"])
def test_many_threads_of_a_process_without_event_loop_each_get_their_own_reply(
    host: ShmBus, bus_name: str, kind: str
) -> None:
    """A requester process with no event loop sends 300 requests from 20
    threads at once to a responder process (on asyncio, or itself blocking
    with reply_nowait); every thread gets the reply to its own request."""
    make = asyncio_responder if kind == "asyncio" else blocking_responder
    responder = make(bus_name)
    requester = blocking_requester(bus_name, 300, threads=20)
    with running(responder, requester):
        responder.expect("ready")
        requester.expect("ready")
        requester.send("go")
        report = requester.recv(FINISH)
        responder.send("stop")
        answered = responder.recv(FINISH)["answered"]
    assert report["ok"] == 300, report
    assert report["mismatched"] == [] and report["errors"] == {}
    assert report["by"] == {responder.pid: 300}
    assert report["waiting"] == 0 and report["late"] == 0
    assert report["subscriptions"] == 1  # its one blocking reply inbox
    assert answered == 300


def test_two_blocking_requester_processes_each_get_only_their_own_replies(
    host: ShmBus, bus_name: str
) -> None:
    responder = asyncio_responder(bus_name)
    requesters = [blocking_requester(bus_name, 150, threads=8) for _ in range(2)]
    with running(responder, *requesters):
        responder.expect("ready")
        for requester in requesters:
            requester.expect("ready")
        for requester in requesters:
            requester.send("go")
        reports = [requester.recv(FINISH) for requester in requesters]
        responder.send("stop")
        answered = responder.recv(FINISH)["answered"]
    for report in reports:
        assert (report["ok"], report["mismatched"], report["errors"]) == (150, [], {}), report
        assert report["late"] == 0  # no reply of the other requester was taken
    assert answered == 300


def test_a_blocking_request_nobody_answers_raises_request_timeout_error(
    host: ShmBus, bus_name: str
) -> None:
    """Another process listens, but not on this topic: ShmBus cannot know,
    so the request waits for its timeout."""
    other = Agent(request_agents.blocking_responder, bus_name, "other.>", bus_kwargs=SMALL_RING)
    with running(other):
        other.expect("ready")
        with pytest.raises(RequestTimeoutError) as info:
            host.request_sync("svc.unanswered", {"n": 1}, timeout=0.3)
        other.send("stop")
        assert other.recv(FINISH) == {"answered": 0}
    assert isinstance(info.value, TimeoutError)
    assert not isinstance(info.value, NoRespondersError)
    assert "'svc.unanswered'" in str(info.value) and "within 0.3 s" in str(info.value)
    assert host._sync_inbox.waiting == 0


def test_a_responder_killed_mid_request_makes_the_blocking_request_time_out_and_leaks_nothing(
    host: ShmBus, bus_name: str
) -> None:
    doomed = blocking_responder(bus_name, hold=True)
    with running(doomed):
        doomed.expect("ready")
        pending = InThread(lambda: host.request_sync("svc.work", {"n": 1}, timeout=1.0))
        assert doomed.recv(FINISH) == ("holding", {"n": 1})
        os.kill(doomed.pid, signal.SIGKILL)
        with pytest.raises(RequestTimeoutError) as info:
            pending.result(FINISH)
    assert "'svc.work'" in str(info.value)
    assert host._sync_inbox.waiting == 0 and host._sync_inbox._pumper is None
    # The bus still answers: a new responder process gets the next request.
    successor = blocking_responder(bus_name)
    with running(successor):
        successor.expect("ready")
        reply: Event = host.request_sync("svc.work", {"n": 2}, timeout=ANSWERED)
        successor.send("stop")
        successor.recv(FINISH)
    assert reply.payload == {"n": 2, "pid": successor.pid}
    assert host.stats().subscriptions == 1  # the blocking inbox only, as before


def test_a_stopped_responders_late_reply_is_dropped_and_counted_by_the_request_then_waiting(
    host: ShmBus, bus_name: str
) -> None:
    """SIGSTOP the responder before it answers: the request times out. The
    next request starts (and skips the inbox's backlog) while the responder
    is still stopped; after SIGCONT the late answer comes first: that
    request drops and counts it, and returns its own reply."""
    responder = blocking_responder(bus_name)
    with running(responder):
        responder.expect("ready")
        warm = host.request_sync("svc.echo", {"n": 0}, timeout=ANSWERED)
        os.kill(responder.pid, signal.SIGSTOP)
        try:
            with pytest.raises(RequestTimeoutError):
                host.request_sync("svc.echo", {"n": 1}, timeout=0.5)
            pending = InThread(lambda: host.request_sync("svc.echo", {"n": 2}, timeout=ANSWERED))
            wait_until(lambda: host._sync_inbox.waiting == 1, "the next request waits", FINISH)
        finally:
            os.kill(responder.pid, signal.SIGCONT)
        reply = pending.result(FINISH)
        responder.send("stop")
        assert responder.recv(FINISH) == {"answered": 3}
    assert (warm.payload["n"], reply.payload["n"]) == (0, 2)
    assert host._sync_inbox.late == 1 and host._sync_inbox.waiting == 0


@pytest.mark.parametrize("ring", ["followed", "installed-meanwhile"])
def test_a_flood_on_other_topics_between_blocking_requests_counts_nothing_lost_on_the_inbox(
    host: ShmBus, bus_name: str, ring: str
) -> None:
    """A flooding process wraps its tiny ring many times on topics nobody
    listens to, between two blocking requests of this process (which runs
    no event loop) to a responder process. Its ring existed before the
    first request, or was installed after it. Both requests get their
    replies, and nothing is counted dropped or lapped for the inbox: not on
    its subscription, not in the bus's statistics, not in its slot's
    counters (``shmbus stat``)."""
    responder = blocking_responder(bus_name)
    flooder = Agent(
        request_agents.blocking_flooder,
        bus_name,
        FLOOD,
        early=ring == "followed",
        bus_kwargs=TINY_RING,
    )
    with running(responder, flooder):
        responder.expect("ready")
        flooder.expect("ready")
        first = host.request_sync("svc.echo", {"n": 1}, timeout=ANSWERED)
        flooder.send("go")
        flooded = flooder.recv(FINISH)
        second = host.request_sync("svc.echo", {"n": 2}, timeout=ANSWERED)
        inbox = host._sync_inbox.subscription
        assert inbox is not None
        stats = host.stats()
        reader_slot = host._sync_readers[inbox].slot
        (slot,) = [each for each in read_bus(bus_name).live_instances if each.slot == reader_slot]
        flooder.send("stop")
        responder.send("stop")
        assert responder.recv(FINISH) == {"answered": 2}
    assert flooded["published"] == FLOOD and flooded["wraps"] >= 4
    assert first.payload == {"n": 1, "pid": responder.pid}
    assert second.payload == {"n": 2, "pid": responder.pid}
    assert (inbox.dropped, inbox.statistics().dropped) == (0, 0)
    assert (stats.dropped, stats.lapped) == (0, 0)
    assert (slot.dropped, slot.lapped) == (0, 0)
    assert host._sync_inbox.late == 0
