"""Request/reply on ShmBus between real processes: every agent is a spawned
interpreter with its own bus instance (tests/request_agents.py).

Synchronisation is by handshake ("ready", "go", "holding", "stop"); the
bounds passed to ``recv()`` and the request timeouts of the requests that
must succeed only turn a hang into a failure. The test process holds the bus
too (``host``), so that it closes last.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable

import pytest
import request_agents
from conftest import SMALL_RING
from shmbus_tools.children import Agent, running

from shmbus import NoRespondersError, RequestTimeoutError, ShmBus

#: Generous bound for an agent to finish its part (the box is shared).
FINISH = 60.0
#: Timeout of requests that must be answered: never reached unless broken.
ANSWERED = 60.0


pytestmark = pytest.mark.usefixtures("no_resource_tracker_left")


@pytest.fixture
async def host(bus_name: str) -> AsyncIterator[ShmBus]:
    bus = ShmBus(bus_name, **SMALL_RING)
    await bus.connect()
    try:
        yield bus
    finally:
        await bus.close()


async def eventually(predicate: Callable[[], bool], what: str) -> None:
    """Let the loop run until *predicate()* holds; fail after FINISH s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FINISH
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def echo_responder(bus_name: str, *, hold: bool = False) -> Agent:
    return Agent(
        request_agents.responder, bus_name, "svc.>", hold=hold, bus_kwargs=SMALL_RING
    )


async def test_concurrent_requests_of_many_tasks_get_their_own_replies_from_another_process(
    host: ShmBus, bus_name: str
) -> None:
    responder = echo_responder(bus_name)
    requester = Agent(
        request_agents.requester,
        bus_name,
        "svc.echo",
        400,
        tasks=50,
        timeout=ANSWERED,
        bus_kwargs=SMALL_RING,
    )
    with running(responder, requester):
        responder.expect("ready")
        requester.expect("ready")
        requester.send("go")
        report = requester.recv(FINISH)
        responder.send("stop")
        answered = responder.recv(FINISH)["answered"]
    assert report["ok"] == 400, report
    assert report["mismatched"] == [] and report["errors"] == {}
    assert report["by"] == {responder.pid: 400}
    assert report["waiting"] == 0
    assert report["subscriptions"] == 1  # its one reply inbox
    assert answered == 400


async def test_requests_from_two_processes_each_get_their_own_replies(
    host: ShmBus, bus_name: str
) -> None:
    """Both requesters' inboxes see every reply on the bus; each takes only
    the ones addressed to it."""
    responder = echo_responder(bus_name)
    requesters = [
        Agent(
            request_agents.requester,
            bus_name,
            "svc.echo",
            200,
            tasks=20,
            timeout=ANSWERED,
            bus_kwargs=SMALL_RING,
        )
        for _ in range(2)
    ]
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
        assert (report["ok"], report["mismatched"], report["errors"]) == (200, [], {}), report
    assert answered == 400


async def test_a_responder_killed_mid_request_makes_the_request_time_out_and_leaks_nothing(
    host: ShmBus, bus_name: str
) -> None:
    doomed = echo_responder(bus_name, hold=True)
    with running(doomed):
        doomed.expect("ready")
        pending = asyncio.create_task(host.request("svc.work", {"n": 1}, timeout=1.0))
        holding = await asyncio.to_thread(doomed.recv, FINISH)
        assert holding == ("holding", {"n": 1})
        os.kill(doomed.pid, signal.SIGKILL)
        with pytest.raises(RequestTimeoutError) as info:
            await pending
    assert not isinstance(info.value, NoRespondersError)
    assert "'svc.work'" in str(info.value)
    assert host._inbox.waiting == 0
    # The bus still answers: a new responder process gets the next request.
    successor = echo_responder(bus_name)
    with running(successor):
        successor.expect("ready")
        reply = await host.request("svc.work", {"n": 2}, timeout=ANSWERED)
        successor.send("stop")
        successor.recv(FINISH)
    assert reply.payload == {"n": 2, "pid": successor.pid}
    assert host.stats().subscriptions == 1  # the inbox only, as before


async def test_a_stopped_responders_late_reply_is_dropped_and_the_next_request_gets_its_own(
    host: ShmBus, bus_name: str
) -> None:
    """SIGSTOP the responder before it answers: the request times out; after
    SIGCONT its late answer arrives, matches no waiting request and is
    dropped; the next request gets its own reply."""
    responder = echo_responder(bus_name)
    with running(responder):
        responder.expect("ready")
        warm = await host.request("svc.echo", {"n": 0}, timeout=ANSWERED)
        os.kill(responder.pid, signal.SIGSTOP)
        try:
            with pytest.raises(RequestTimeoutError):
                await host.request("svc.echo", {"n": 1}, timeout=0.5)
        finally:
            os.kill(responder.pid, signal.SIGCONT)
        await eventually(lambda: host._inbox.late == 1, "the late answer to n=1")
        reply = await host.request("svc.echo", {"n": 2}, timeout=ANSWERED)
        responder.send("stop")
        responder.recv(FINISH)
    assert (warm.payload["n"], reply.payload["n"]) == (0, 2)
    assert host._inbox.late == 1 and host._inbox.waiting == 0


async def test_a_request_on_a_topic_no_process_answers_times_out(
    host: ShmBus, bus_name: str
) -> None:
    """Another process listens, but not on this topic: ShmBus cannot know,
    so the request waits for its timeout."""
    responder = Agent(request_agents.responder, bus_name, "other.>", bus_kwargs=SMALL_RING)
    with running(responder):
        responder.expect("ready")
        with pytest.raises(RequestTimeoutError) as info:
            await host.request("svc.unanswered", {"n": 1}, timeout=0.3)
        responder.send("stop")
        assert responder.recv(FINISH) == {"answered": 0}
    assert "within 0.3 s" in str(info.value)


# ─── Polling for replies ─────────────────────────────────────────────────────


async def test_a_reply_from_another_process_is_found_by_polling_while_its_request_waits(
    host: ShmBus, bus_name: str
) -> None:
    """spin_for_replies (the default): a request made while the requester's
    reader sleeps starts a polling window, so a prompt reply from another
    process is read by a poll, not by a wake-up; once no request waits, the
    reader holds nothing and sleeps again."""
    responder = echo_responder(bus_name)
    with running(responder):
        responder.expect("ready")
        async with ShmBus(bus_name, **SMALL_RING) as bus:
            await bus.request("svc.echo", {"n": -1}, timeout=ANSWERED)
            reader = bus._reader
            assert reader is not None
            # One prompt reply is enough; a loaded machine may make a few
            # slower than the polling window.
            for n in range(50):
                await eventually(lambda: reader.sleeping, "the requester's reader to sleep")
                polled = reader.found_polling
                reply = await bus.request("svc.echo", {"n": n}, timeout=ANSWERED)
                assert reply.payload["n"] == n
                if reader.found_polling > polled:
                    break
            else:
                raise AssertionError("no reply of 50 was found by polling")
            assert reader.spin_holds == 0
            await eventually(lambda: reader.sleeping, "the requester's reader to sleep")
        responder.send("stop")
        responder.recv(FINISH)


async def test_polling_for_a_reply_counts_no_other_record_as_found(
    host: ShmBus, bus_name: str
) -> None:
    """The requester's reader also follows its own ring, where each request
    lands while it polls; reading that record is not finding a reply."""
    async with ShmBus(bus_name, **SMALL_RING) as bus:
        for _ in range(5):
            with pytest.raises(RequestTimeoutError):
                await bus.request("nobody.home", {}, timeout=0.05)
        reader = bus._reader
        assert reader is not None
        assert (reader.found_polling, reader.spin_holds) == (0, 0)


async def test_without_spin_for_replies_a_request_waits_for_its_wake_up(
    host: ShmBus, bus_name: str
) -> None:
    responder = echo_responder(bus_name)
    with running(responder):
        responder.expect("ready")
        async with ShmBus(bus_name, spin_for_replies=False, **SMALL_RING) as bus:
            for n in range(20):
                reply = await bus.request("svc.echo", {"n": n}, timeout=ANSWERED)
                assert reply.payload["n"] == n
            reader = bus._reader
            assert reader is not None
            assert (reader.found_polling, reader.spin_holds) == (0, 0)
        responder.send("stop")
        assert responder.recv(FINISH) == {"answered": 20}
