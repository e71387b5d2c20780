"""Blocking request/reply (``bus.request_sync``, ``bus.reply_nowait``) inside
one process, with no event loop unless a test says so: the round trip on
every transport with blocking subscriptions, many threads at once, timeouts,
closing from another thread, exceptions in a waiting thread, bad input.
(Between processes: tests/test_request_sync_processes.py.)

Bounds passed to ``join()`` and the timeouts of requests that must be
answered only turn a hang into a failure.
"""

from __future__ import annotations

import asyncio
import ctypes
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import SMALL_RING
from threads import InThread, wait_until

from shmbus import (
    BaseBus,
    BlockingSubscription,
    BusClosedError,
    Event,
    MemoryBus,
    NoRespondersError,
    NullBus,
    RequestTimeoutError,
    ShmBus,
)
from shmbus._core.layout import W_WRITE_CURSOR, min_capacity
from shmbus.inbox import MAX_REQUEST_TIMEOUT, BlockingReplyInbox

#: Bound on any wait that should end at once: turns a hang into a failure.
FINISH = 30.0
#: Timeout of requests that must be answered: never reached unless broken.
NEVER = 600.0
#: A short timeout for requests that must time out.
SHORT = 0.2


# ─── Helpers ────────────────────────────────────────────────────────────────


class Pair:
    """A bus to request on and one to answer on: two instances of one bus
    for ShmBus, the same instance for the in-process buses."""

    def __init__(self, kind: str, name: str) -> None:
        self.requester: BaseBus
        self.responder: BaseBus
        if kind == "shm":
            requester = ShmBus(name, **SMALL_RING)
            responder = ShmBus(name, **SMALL_RING)
            requester.connect_sync()
            responder.connect_sync()
            self.requester, self.responder = requester, responder
        elif kind == "memory":
            self.requester = self.responder = MemoryBus()
        else:
            self.requester = self.responder = NullBus()

    def close(self) -> None:
        buses = {id(self.requester): self.requester, id(self.responder): self.responder}
        for bus in buses.values():
            close(bus)


def close(bus: BaseBus) -> None:
    if isinstance(bus, ShmBus):
        bus.close_sync()
    else:
        asyncio.run(bus.close())


@pytest.fixture(params=["shm", "memory"])
def answering(request: pytest.FixtureRequest, bus_name: str) -> Iterator[Pair]:
    """A pair of each transport where someone can answer."""
    made = Pair(request.param, bus_name)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(params=["shm", "memory", "null"])
def any_pair(request: pytest.FixtureRequest, bus_name: str) -> Iterator[Pair]:
    """A pair of every transport with blocking requests."""
    made = Pair(request.param, bus_name)
    try:
        yield made
    finally:
        made.close()


class Responder:
    """A thread answering every request on *pattern* from a blocking
    subscription with ``reply_nowait``: ``{"echo": payload}``. Requests whose
    payload has ``"hold"`` are kept in :attr:`held` instead."""

    def __init__(self, bus: BaseBus, pattern: str = "svc.>") -> None:
        self.bus = bus
        self.sub: BlockingSubscription = bus.subscribe_sync(pattern)
        self.held: list[Event] = []
        self.answered = 0
        self._worker = InThread(self._serve)

    def _serve(self) -> None:
        for request in self.sub:
            if "hold" in request.payload:
                self.held.append(request)
                continue
            self.bus.reply_nowait(request, {"echo": request.payload}, headers=request.headers)
            self.answered += 1

    def stop(self) -> None:
        self.sub.close()
        self._worker.result()


def sync_inbox(bus: BaseBus) -> BlockingReplyInbox:
    inbox = bus._sync_inbox  # type: ignore[attr-defined]
    assert isinstance(inbox, BlockingReplyInbox)
    return inbox


def raise_in(thread: threading.Thread, exc_type: type[BaseException]) -> None:
    """Raise *exc_type* in *thread* at its next bytecode, as a signal handler
    raising there would."""
    assert thread.ident is not None
    done = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread.ident), ctypes.py_object(exc_type)
    )
    assert done == 1


# ─── The round trip ─────────────────────────────────────────────────────────


def test_request_sync_returns_the_reply_that_reply_nowait_sent(answering: Pair) -> None:
    responder = Responder(answering.responder)
    try:
        reply = answering.requester.request_sync("svc.echo", {"n": 1}, timeout=NEVER)
    finally:
        responder.stop()
    assert reply.payload == {"echo": {"n": 1}}
    assert reply.topic.startswith(sync_inbox(answering.requester).prefix + ".")


def test_headers_and_type_travel_with_the_blocking_request_and_its_reply(
    answering: Pair,
) -> None:
    responder = Responder(answering.responder)
    try:
        reply = answering.requester.request_sync(
            "svc.echo", {}, timeout=NEVER, event_type="ask", headers={"trace": "t-1"}
        )
    finally:
        responder.stop()
    assert reply.headers == {"trace": "t-1"}


def test_many_threads_requesting_at_once_each_get_their_own_reply(answering: Pair) -> None:
    responder = Responder(answering.responder)
    replies: dict[int, Any] = {}

    def ask(first: int) -> None:
        for n in range(first, first + 25):
            replies[n] = answering.requester.request_sync("svc.echo", {"n": n}, timeout=NEVER)

    try:
        askers = [InThread(lambda first=first: ask(first)) for first in range(0, 400, 25)]
        for asker in askers:
            asker.result()
    finally:
        responder.stop()
    assert {n: reply.payload for n, reply in replies.items()} == {
        n: {"echo": {"n": n}} for n in range(400)
    }
    inbox = sync_inbox(answering.requester)
    assert (inbox.waiting, inbox.late, inbox._pumper) == (0, 0, None)


def test_blocking_requests_share_one_inbox_subscription_kept_until_the_bus_closes(
    answering: Pair,
) -> None:
    before = answering.requester.stats().subscriptions
    responder = Responder(answering.responder)
    try:
        for n in range(5):
            answering.requester.request_sync("svc.echo", {"n": n}, timeout=NEVER)
    finally:
        responder.stop()
    assert answering.requester.stats().subscriptions == before + 1
    inbox_sub = sync_inbox(answering.requester).subscription
    assert inbox_sub is not None and not inbox_sub.closed
    close(answering.requester)
    assert inbox_sub.closed


def test_the_blocking_and_the_asyncio_inbox_never_share_a_prefix(answering: Pair) -> None:
    bus = answering.requester
    assert sync_inbox(bus).prefix != bus._inbox.prefix  # type: ignore[attr-defined]


# ─── Ending without a reply ─────────────────────────────────────────────────


def test_a_blocking_request_nobody_answers_raises_request_timeout_error(
    answering: Pair,
) -> None:
    """A subscriber that never answers: the request times out (on MemoryBus
    too, since somebody listens)."""
    silent = answering.responder.subscribe_sync("svc.>")
    try:
        with pytest.raises(RequestTimeoutError) as info:
            answering.requester.request_sync("svc.silent", {}, timeout=SHORT)
    finally:
        silent.close()
    assert isinstance(info.value, TimeoutError)
    assert not isinstance(info.value, NoRespondersError)
    assert "'svc.silent'" in str(info.value) and f"within {SHORT:g} s" in str(info.value)
    assert sync_inbox(answering.requester).waiting == 0


def test_a_blocking_request_nobody_subscribes_to_raises_no_responders_in_process() -> None:
    for bus in (MemoryBus(), NullBus()):
        with pytest.raises(NoRespondersError) as info:
            bus.request_sync("svc.nobody", {}, timeout=NEVER)
        assert "'svc.nobody'" in str(info.value)
        if isinstance(bus, MemoryBus):
            assert sync_inbox(bus).waiting == 0
        close(bus)


def test_a_late_reply_that_comes_while_a_request_waits_is_dropped_and_counted(
    answering: Pair,
) -> None:
    """The late reply comes after the next request started (and skipped the
    inbox's backlog): that request reads it, drops it, counts it, and gets
    its own."""
    responder = Responder(answering.responder)
    try:
        with pytest.raises(RequestTimeoutError):
            answering.requester.request_sync("svc.slow", {"hold": 1}, timeout=SHORT)
        wait_until(lambda: len(responder.held) == 1, "the held request")
        waiting = InThread(
            lambda: answering.requester.request_sync("svc.slow", {"hold": 2}, timeout=NEVER)
        )
        wait_until(lambda: len(responder.held) == 2, "the second request")
        answering.responder.reply_nowait(responder.held[0], {"late": True})
        answering.responder.reply_nowait(responder.held[1], {"for": 2})
        reply = waiting.result()
    finally:
        responder.stop()
    assert reply.payload == {"for": 2}
    inbox = sync_inbox(answering.requester)
    assert (inbox.late, inbox.waiting) == (1, 0)


@pytest.mark.parametrize("answering", ["shm", "memory"], indirect=True)
def test_a_late_reply_that_came_between_requests_is_skipped_on_shm_and_counted_in_process(
    answering: Pair, request: pytest.FixtureRequest
) -> None:
    """On a shm bus the next request starts its inbox from now: the late
    reply, unread, is skipped and counted nowhere. An in-process bus queued
    it on arrival: the next request reads it and counts it late."""
    responder = Responder(answering.responder)
    try:
        with pytest.raises(RequestTimeoutError):
            answering.requester.request_sync("svc.slow", {"hold": 1}, timeout=SHORT)
        wait_until(lambda: len(responder.held) == 1, "the held request")
        answering.responder.reply_nowait(responder.held[0], {"late": True})
        reply = answering.requester.request_sync("svc.echo", {"n": 2}, timeout=NEVER)
    finally:
        responder.stop()
    assert reply.payload == {"echo": {"n": 2}}
    inbox = sync_inbox(answering.requester)
    assert inbox.subscription is not None
    late = 0 if request.node.callspec.params["answering"] == "shm" else 1
    assert (inbox.late, inbox.waiting, inbox.subscription.dropped) == (late, 0, 0)


def test_a_request_that_starts_while_another_waits_skips_nothing(
    answering: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first request is held between publishing and reading (its reply
    already there, unread); a second request starts meanwhile: it must not
    skip the inbox's backlog, and both get their replies."""
    inbox = sync_inbox(answering.requester)
    gate = threading.Event()
    real_wait = inbox._wait

    def held_wait(token: str, *args: Any) -> Event:
        if token == "1":
            assert gate.wait(FINISH)
        return real_wait(token, *args)

    monkeypatch.setattr(inbox, "_wait", held_wait)
    responder = Responder(answering.responder)
    try:
        first = InThread(
            lambda: answering.requester.request_sync("svc.echo", {"n": 1}, timeout=FINISH)
        )
        wait_until(lambda: responder.answered == 1, "the first reply")
        second = answering.requester.request_sync("svc.echo", {"n": 2}, timeout=FINISH)
        gate.set()
        replies = [first.result(), second]
    finally:
        gate.set()
        responder.stop()
    assert [reply.payload for reply in replies] == [{"echo": {"n": 1}}, {"echo": {"n": 2}}]
    assert (inbox.late, inbox.waiting) == (0, 0)


def test_a_flood_on_other_topics_between_blocking_requests_counts_nothing_on_the_inbox(
    bus_name: str,
) -> None:
    """A third instance wraps its tiny ring many times between two blocking
    requests: both get their replies, and neither the inbox subscription nor
    the bus's statistics count anything lost or lapped."""
    pair = Pair("shm", bus_name)
    flooder = ShmBus(bus_name, capacity=min_capacity(256), max_event_size=256)
    flooder.connect_sync()
    responder = Responder(pair.responder)
    try:
        flooder.publish_nowait("noise.first", {})
        first = pair.requester.request_sync("svc.echo", {"n": 1}, timeout=NEVER)
        for n in range(2000):
            flooder.publish_nowait(f"noise.{n % 8}", {"n": n})
        ring = flooder._ring
        assert ring is not None and int(ring.words[W_WRITE_CURSOR]) // ring.capacity >= 4
        second = pair.requester.request_sync("svc.echo", {"n": 2}, timeout=NEVER)
        inbox = sync_inbox(pair.requester)
        assert inbox.subscription is not None
        dropped = inbox.subscription.dropped
        stats = pair.requester.stats()
    finally:
        responder.stop()
        flooder.close_sync()
        pair.close()
    assert (first.payload, second.payload) == ({"echo": {"n": 1}}, {"echo": {"n": 2}})
    assert (dropped, stats.dropped, stats.lapped, inbox.late) == (0, 0, 0, 0)


def test_closing_the_bus_from_another_thread_fails_every_waiting_request(
    answering: Pair,
) -> None:
    """Three threads wait (one reads the inbox, two wait for it); the bus
    closes: each raises BusClosedError naming its topic at once."""
    silent = answering.responder.subscribe_sync("svc.>")
    bus = answering.requester
    waiting = [
        InThread(lambda n=n: bus.request_sync(f"svc.w{n}", {}, timeout=NEVER)) for n in range(3)
    ]
    # In the table and published: a request still inside its publish when
    # the bus closes fails there, as a publish on a closed bus does.
    wait_until(
        lambda: sync_inbox(bus).waiting == 3 and bus.stats().published == 3,
        "three requests published and waiting",
    )
    close(bus)
    for n, each in enumerate(waiting):
        with pytest.raises(BusClosedError) as info:
            each.result()
        assert f"'svc.w{n}'" in str(info.value)
    silent.close()
    assert sync_inbox(bus).waiting == 0


def test_an_exception_raised_in_the_thread_reading_the_inbox_hands_over_to_another(
    answering: Pair,
) -> None:
    """The thread reading the inbox for everyone gets an exception (as a
    raising signal handler would give it): it leaves the table and lets go
    of the inbox; a thread still waiting takes over and gets its reply."""
    responder = Responder(answering.responder)
    bus = answering.requester
    inbox = sync_inbox(bus)
    try:
        first = InThread(lambda: bus.request_sync("svc.a", {"hold": "a"}, timeout=NEVER))
        wait_until(lambda: inbox._pumper is not None, "a thread reading the inbox")
        second = InThread(lambda: bus.request_sync("svc.b", {"hold": "b"}, timeout=NEVER))
        wait_until(lambda: len(responder.held) == 2, "both requests held")
        raise_in(first.thread, KeyboardInterrupt)
        with pytest.raises(KeyboardInterrupt):
            first.result()
        assert inbox.waiting == 1
        held_b = next(r for r in responder.held if r.payload == {"hold": "b"})
        answering.responder.reply_nowait(held_b, {"to": "b"})
        assert second.result().payload == {"to": "b"}
    finally:
        responder.stop()
    assert (inbox.waiting, inbox._pumper) == (0, None)


def test_a_signal_handler_raising_in_the_waiting_thread_leaves_nothing_waiting(
    answering: Pair,
) -> None:
    responder = Responder(answering.responder)
    bus = answering.requester
    inbox = sync_inbox(bus)

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(KeyboardInterrupt):
            bus.request_sync("svc.sig", {"hold": 1}, timeout=NEVER)
        signal.setitimer(signal.ITIMER_REAL, 0)
        assert (inbox.waiting, inbox._pumper) == (0, None)
        reply = bus.request_sync("svc.echo", {"n": 2}, timeout=NEVER)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        responder.stop()
    assert reply.payload == {"echo": {"n": 2}}


# ─── Bad input and closed buses ─────────────────────────────────────────────


@pytest.mark.parametrize(
    ("timeout", "error", "words"),
    [
        (0, ValueError, "timeout"),
        (-1.0, ValueError, "timeout"),
        (float("nan"), ValueError, "timeout"),
        (MAX_REQUEST_TIMEOUT * 2, ValueError, f"{MAX_REQUEST_TIMEOUT:g}"),
        ("1", TypeError, "timeout"),
        (True, TypeError, "timeout"),
    ],
)
def test_a_bad_timeout_is_refused_as_request_refuses_it(
    any_pair: Pair, timeout: Any, error: type[Exception], words: str
) -> None:
    bus = any_pair.requester
    with pytest.raises(error) as info:
        bus.request_sync("svc.x", {}, timeout=timeout)

    async def the_async_form() -> None:
        await bus.request("svc.x", {}, timeout=timeout)

    with pytest.raises(error) as async_info:
        asyncio.run(the_async_form())
    assert str(info.value) == str(async_info.value)
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("topic", "payload", "headers", "error"),
    [
        ("bad topic", {}, None, ValueError),
        ("svc.*", {}, None, ValueError),
        (7, {}, None, TypeError),
        ("svc.x", {"x": object()}, None, TypeError),
        ("svc.x", {}, {"bad name": "v"}, ValueError),
    ],
)
def test_bad_input_is_refused_and_the_bus_keeps_answering(
    answering: Pair, topic: Any, payload: Any, headers: Any, error: type[Exception]
) -> None:
    responder = Responder(answering.responder)
    try:
        with pytest.raises(error):
            answering.requester.request_sync(topic, payload, timeout=NEVER, headers=headers)
        assert sync_inbox(answering.requester).waiting == 0
        reply = answering.requester.request_sync("svc.echo", {"n": 1}, timeout=NEVER)
    finally:
        responder.stop()
    assert reply.payload == {"echo": {"n": 1}}


def test_request_sync_on_a_closed_bus_raises_runtime_error(any_pair: Pair) -> None:
    bus = any_pair.requester
    close(bus)
    with pytest.raises(RuntimeError) as info:
        bus.request_sync("svc.x", {}, timeout=NEVER)
    assert "closed" in str(info.value)


def test_request_sync_from_a_thread_running_an_event_loop_is_refused(any_pair: Pair) -> None:
    bus = any_pair.requester

    async def on_the_loop() -> None:
        bus.request_sync("svc.x", {}, timeout=SHORT)

    with pytest.raises(RuntimeError) as info:
        asyncio.run(on_the_loop())
    assert "await bus.request(" in str(info.value)


def test_reply_nowait_to_an_event_that_is_not_a_request_raises_like_reply(
    any_pair: Pair,
) -> None:
    bus = any_pair.responder
    plain = Event("svc.x", {})
    with pytest.raises(ValueError) as info:
        bus.reply_nowait(plain, {})

    async def the_async_form() -> None:
        await bus.reply(plain, {})

    with pytest.raises(ValueError) as async_info:
        asyncio.run(the_async_form())
    assert str(info.value) == str(async_info.value)
    with pytest.raises(TypeError):
        bus.reply_nowait("svc.x", {})  # type: ignore[arg-type]


def test_nats_transports_have_no_blocking_requests_and_say_what_to_use() -> None:
    from shmbus.fallback import FallbackBus
    from shmbus.nats import NatsBus

    nats = NatsBus("nats://127.0.0.1:1")
    fallback = FallbackBus(nats, ShmBus("unused"))
    for bus in (nats, fallback):
        with pytest.raises(NotImplementedError) as info:
            bus.request_sync("svc.x", {})
        assert type(bus).__name__ in str(info.value)
        assert "await bus.request(" in str(info.value) and "ShmBus" in str(info.value)
