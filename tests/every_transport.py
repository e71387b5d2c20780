"""Fixtures for the contract tests of headers, request/reply and queue groups,
which run on every transport: shm, memory, NATS (a real nats-server) and
the NATS/shm fallback bus; ``with_null`` adds the null bus.

The fixtures ``transport`` and ``with_null`` (in conftest.py) are made by
:func:`make`. Waiting is bounded polling, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from awaiting import wait_until
from conftest import SMALL_RING

from shmbus import BaseBus, Event, MemoryBus, NullBus, ShmBus, Subscription

T = TypeVar("T")


#: Bound that only turns a hang into a failure.
ARRIVAL = 10.0

async def make(kind: str, request: pytest.FixtureRequest, bus_name: str) -> BaseBus:
    """A connected bus of *kind*; the fallback bus once it publishes on NATS."""
    bus: BaseBus
    if kind == "shm":
        bus = ShmBus(bus_name, **SMALL_RING)
    elif kind == "memory":
        bus = MemoryBus(max_event_size=SMALL_RING["max_event_size"])
    elif kind == "null":
        bus = NullBus(max_event_size=SMALL_RING["max_event_size"])
    else:
        from shmbus.fallback import FallbackBus
        from shmbus.nats import NatsBus

        server = request.getfixturevalue("contract_nats_server")
        nats = NatsBus(server.url, connect_timeout=5, reconnect_time_wait=0.1)
        if kind == "nats":
            bus = nats
        else:
            # A short overlap: the contract is checked in the steady state,
            # after the shm -> NATS switch (test_fallback.py covers the switch).
            bus = FallbackBus(nats, ShmBus(bus_name, **SMALL_RING), overlap=0.3)
    await bus.connect()
    if kind == "fallback":
        fallback = bus
        await wait_until(
            lambda: fallback.using_nats and not fallback.double_sending,  # type: ignore[attr-defined]
            what="the fallback bus to reach NATS and end its overlap",
        )
    return bus


def kind_of(bus: BaseBus) -> str:
    """The fixture parameter *bus* was made for."""
    name = type(bus).__name__
    return {"ShmBus": "shm", "MemoryBus": "memory", "NullBus": "null", "NatsBus": "nats"}.get(
        name, "fallback"
    )


async def ready(bus: BaseBus) -> None:
    """Make sure the subscriptions made so far on *bus* reach publishers on
    other connections (NATS sends SUBs asynchronously)."""
    flush: Callable[[], Awaitable[None]] | None = getattr(bus, "flush", None)
    if flush is None:
        primary = getattr(bus, "primary", None)
        flush = getattr(primary, "flush", None)
    if flush is not None:
        await flush()


async def within(awaitable: Awaitable[T], timeout: float = ARRIVAL) -> T:
    """*awaitable*'s result; fail if it takes longer than *timeout* seconds."""
    return await asyncio.wait_for(awaitable, timeout)


def responder(
    bus: BaseBus,
    sub: Subscription,
    answer: Callable[[Event], dict[str, Any] | None],
) -> asyncio.Task[None]:
    """A task that replies ``answer(request)`` to each request on *sub*
    (None: no reply)."""

    async def serve() -> None:
        async for event in sub:
            payload = answer(event)
            if payload is not None:
                await bus.reply(event, payload)

    return asyncio.create_task(serve())
