"""Request/reply on every transport, in one process: a request returns its
first reply, concurrent requests get their own, nobody listening is a clear
TimeoutError, and nothing is left waiting however a request ends. (Between
processes: tests/test_request_processes.py.)"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from awaiting import take, wait_until
from conftest import SMALL_RING
from every_transport import kind_of, ready, responder, within

from shmbus import (
    BaseBus,
    BusClosedError,
    Event,
    NoRespondersError,
    RequestTimeoutError,
    ShmBus,
    ShmBusError,
)
from shmbus.inbox import INBOX_PREFIX, MAX_REQUEST_TIMEOUT

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

#: A timeout no test waits for: a request that ends must end for another reason.
NEVER = 600.0
#: A short timeout for requests that must time out.
SHORT = 0.2


def echo(event: Event) -> dict[str, Any]:
    return {"echo": event.payload}


def waiting_requests(bus: BaseBus) -> int:
    inbox = getattr(bus, "_inbox", None)
    return inbox.waiting if inbox is not None else 0


def spin_holds(bus: BaseBus) -> int:
    """Polling holds a ShmBus's reader still has for requests (0 elsewhere)."""
    reader = getattr(bus, "_reader", None)
    return reader.spin_holds if reader is not None else 0


# ─── The round trip ──────────────────────────────────────────────────────────


async def test_a_request_returns_the_responders_reply(transport: BaseBus) -> None:
    sub = transport.subscribe("svc.echo")
    task = responder(transport, sub, echo)
    await ready(transport)
    reply = await within(transport.request("svc.echo", {"n": 1}, timeout=NEVER))
    assert reply.payload == {"echo": {"n": 1}}
    task.cancel()
    await sub.aclose()


async def test_the_responder_sees_the_request_with_a_reply_to_in_the_inbox(
    transport: BaseBus,
) -> None:
    async with transport.subscribe("svc.look") as sub:
        await ready(transport)
        pending = asyncio.create_task(
            transport.request("svc.look", {"q": 1}, event_type="query", timeout=NEVER)
        )
        [request] = await take(sub, 1)
        await transport.reply(request, {"a": 2}, event_type="answer")
        reply = await within(pending)
    assert request.reply_to is not None and request.reply_to.startswith(f"{INBOX_PREFIX}.")
    assert (request.topic, request.payload, request.type) == ("svc.look", {"q": 1}, "query")
    assert (reply.topic, reply.payload, reply.type) == (request.reply_to, {"a": 2}, "answer")
    assert reply.reply_to is None


async def test_headers_travel_with_the_request_and_with_the_reply(transport: BaseBus) -> None:
    async with transport.subscribe("svc.traced") as sub:
        await ready(transport)
        pending = asyncio.create_task(
            transport.request(
                "svc.traced", {}, headers={"traceparent": TRACEPARENT}, timeout=NEVER
            )
        )
        [request] = await take(sub, 1)
        await transport.reply(request, {}, headers={"traceparent": request.headers["traceparent"]})
        reply = await within(pending)
    assert request.headers == {"traceparent": TRACEPARENT}
    assert reply.headers == {"traceparent": TRACEPARENT}


async def test_concurrent_requests_from_many_tasks_each_get_their_own_reply(
    transport: BaseBus,
) -> None:
    """The responder answers the requests queued together in reverse order,
    so replies do not come back in request order."""
    sub = transport.subscribe("svc.square")

    async def serve() -> None:
        async for request in sub:
            batch = [request]
            while sub.statistics().queued:
                batch.append(await anext(sub))
            for each in reversed(batch):
                n = each.payload["n"]
                await transport.reply(each, {"n": n, "sq": n * n})

    task = asyncio.create_task(serve())
    await ready(transport)
    replies = await within(
        asyncio.gather(
            *(transport.request("svc.square", {"n": n}, timeout=NEVER) for n in range(100))
        ),
        30,
    )
    assert [(r.payload["n"], r.payload["sq"]) for r in replies] == [(n, n * n) for n in range(100)]
    assert waiting_requests(transport) == 0
    task.cancel()
    await sub.aclose()


async def test_only_the_first_reply_is_returned_and_later_ones_are_dropped(
    transport: BaseBus,
) -> None:
    async with transport.subscribe("svc.twice") as sub:
        await ready(transport)
        pending = asyncio.create_task(transport.request("svc.twice", {}, timeout=NEVER))
        [request] = await take(sub, 1)
        await transport.reply(request, {"nth": 1})
        await transport.reply(request, {"nth": 2})
        first = await within(pending)
        task = responder(transport, sub, echo)
        after = await within(transport.request("svc.twice", {"next": True}, timeout=NEVER))
        task.cancel()
    assert first.payload == {"nth": 1}
    assert after.payload == {"echo": {"next": True}}


async def test_requests_reuse_one_inbox_subscription(transport: BaseBus) -> None:
    sub = transport.subscribe("svc.count")
    task = responder(transport, sub, echo)
    await ready(transport)
    for n in range(5):
        await within(transport.request("svc.count", {"n": n}, timeout=NEVER))
    # The responder's subscription and one inbox (on NATS, the client's own).
    expected = 1 if kind_of(transport) == "nats" else 2
    assert transport.stats().subscriptions == expected
    task.cancel()
    await sub.aclose()


async def test_a_request_counts_as_a_published_event(transport: BaseBus) -> None:
    sub = transport.subscribe("svc.stat")
    task = responder(transport, sub, echo)
    await ready(transport)
    before = transport.stats().published
    await within(transport.request("svc.stat", {}, timeout=NEVER))
    task.cancel()
    await sub.aclose()
    assert transport.stats().published == before + 2  # the request and its reply


# ─── Nobody answers ──────────────────────────────────────────────────────────


async def test_a_request_nobody_answers_raises_request_timeout_error(
    with_null: BaseBus,
) -> None:
    """Where the transport knows nobody listens (memory, NATS, null), at once
    with NoRespondersError, otherwise after the timeout; both are a
    RequestTimeoutError, a TimeoutError and a ShmBusError."""
    knows = kind_of(with_null) in ("memory", "nats", "null")
    timeout = NEVER if knows else SHORT
    with pytest.raises(RequestTimeoutError) as info:
        await within(with_null.request("nobody.home", {}, timeout=timeout), 30)
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, ShmBusError)
    assert isinstance(info.value, NoRespondersError) == knows
    assert "'nobody.home'" in str(info.value)
    assert waiting_requests(with_null) == 0
    assert spin_holds(with_null) == 0


async def test_a_silent_subscriber_makes_the_request_time_out_naming_topic_and_timeout(
    transport: BaseBus,
) -> None:
    async with transport.subscribe("svc.silent"):
        await ready(transport)
        with pytest.raises(RequestTimeoutError) as info:
            await within(transport.request("svc.silent", {}, timeout=SHORT))
    assert not isinstance(info.value, NoRespondersError)
    assert "'svc.silent'" in str(info.value) and f"{SHORT:g} s" in str(info.value)
    assert waiting_requests(transport) == 0
    assert spin_holds(transport) == 0


async def test_a_reply_after_the_timeout_is_dropped_and_the_next_request_works(
    transport: BaseBus,
) -> None:
    async with transport.subscribe("svc.slow") as sub:
        await ready(transport)
        pending = asyncio.create_task(transport.request("svc.slow", {"n": 1}, timeout=SHORT))
        [late] = await take(sub, 1)
        with pytest.raises(RequestTimeoutError):
            await within(pending)
        await transport.reply(late, {"late": True})
        task = responder(transport, sub, echo)
        reply = await within(transport.request("svc.slow", {"n": 2}, timeout=NEVER))
        task.cancel()
    assert reply.payload == {"echo": {"n": 2}}


# ─── Ending a request early ──────────────────────────────────────────────────


async def test_a_cancelled_request_leaves_nothing_waiting(transport: BaseBus) -> None:
    async with transport.subscribe("svc.cancel") as sub:
        await ready(transport)
        pending = asyncio.create_task(transport.request("svc.cancel", {}, timeout=NEVER))
        await take(sub, 1)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        assert waiting_requests(transport) == 0
        assert spin_holds(transport) == 0
        task = responder(transport, sub, echo)
        reply = await within(transport.request("svc.cancel", {"again": 1}, timeout=NEVER))
        task.cancel()
    assert reply.payload == {"echo": {"again": 1}}


async def test_closing_the_bus_fails_a_waiting_request_with_bus_closed_error(
    transport: BaseBus,
) -> None:
    async with transport.subscribe("svc.closing") as sub:
        await ready(transport)
        pending = asyncio.create_task(transport.request("svc.closing", {}, timeout=NEVER))
        await take(sub, 1)
        await transport.close()
        with pytest.raises(BusClosedError) as info:
            await within(pending)
    assert "'svc.closing'" in str(info.value) and "closed" in str(info.value)
    assert waiting_requests(transport) == 0


async def test_a_request_on_a_closed_bus_raises_runtime_error(with_null: BaseBus) -> None:
    await with_null.close()
    with pytest.raises(RuntimeError):
        await with_null.request("svc.any", {})


# ─── Bad input ───────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("timeout", "error", "words"),
    [
        (0, ValueError, ["timeout", "above 0"]),
        (-1.0, ValueError, ["timeout", "above 0"]),
        (float("inf"), ValueError, ["timeout", "finite"]),
        (MAX_REQUEST_TIMEOUT * 2, ValueError, ["timeout", f"at most {MAX_REQUEST_TIMEOUT:g}"]),
        ("1", TypeError, ["timeout", "seconds", "'1'"]),
        (True, TypeError, ["timeout", "bool"]),
    ],
)
async def test_a_bad_timeout_is_refused_naming_it_and_the_limit(
    with_null: BaseBus, timeout: object, error: type[Exception], words: list[str]
) -> None:
    with pytest.raises(error) as info:
        await with_null.request("svc.x", {}, timeout=timeout)  # type: ignore[arg-type]
    assert all(word in str(info.value) for word in words), str(info.value)


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        (("bad topic", {}), ValueError),
        (("svc.*", {}), ValueError),
        ((b"svc", {}), TypeError),
        (("svc.x", [1]), TypeError),
        (("svc.x", {"o": object()}), TypeError),
    ],
)
async def test_a_bad_request_raises_as_a_publish_would(
    with_null: BaseBus, arguments: tuple[Any, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        await with_null.request(*arguments, timeout=NEVER)
    assert waiting_requests(with_null) == 0
    assert spin_holds(with_null) == 0


async def test_bad_request_headers_are_refused(with_null: BaseBus) -> None:
    with pytest.raises(ValueError, match="header name"):
        await with_null.request("svc.x", {}, headers={"a:b": "c"}, timeout=NEVER)


async def test_replying_to_an_event_that_is_not_a_request_raises_value_error(
    with_null: BaseBus,
) -> None:
    event = Event("orders.created", {"id": 1})
    with pytest.raises(ValueError, match="not a request: it has no reply_to"):
        await with_null.reply(event, {})


async def test_replying_to_something_that_is_not_an_event_raises_type_error(
    with_null: BaseBus,
) -> None:
    with pytest.raises(TypeError, match="request must be an Event, not dict"):
        await with_null.reply({"reply_to": "x"}, {})  # type: ignore[arg-type]


# ─── Polling for replies (ShmBus) ────────────────────────────────────────────


async def test_a_spin_hold_turns_a_sleeping_reader_to_polling_and_its_release_ends_it(
    bus_name: str,
) -> None:
    async with ShmBus(bus_name, **SMALL_RING) as bus, bus.subscribe("svc.>"):
        reader = bus._reader
        assert reader is not None
        await wait_until(lambda: reader.sleeping, what="the reader to sleep")
        reader.hold_spin()
        assert not reader.sleeping  # its sleep flag is down and a poll is queued
        reader.release_spin()
        # The window (up to 2 ms) ends at the next poll, not when it runs out.
        for _ in range(3):
            await asyncio.sleep(0)
        assert reader.sleeping
        assert reader.spin_holds == 0
