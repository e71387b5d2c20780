"""Waiting in async tests: bounded polling and bounded receiving, never fixed
sleeps."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from shmbus import Event, Subscription


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll *predicate* until it is true; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        await asyncio.sleep(0.02)


async def take(sub: Subscription, count: int, timeout: float = 10.0) -> list[Event]:
    """The next *count* events of *sub*; fail after *timeout* seconds."""
    events: list[Event] = []

    async def collect() -> None:
        async for event in sub:
            events.append(event)
            if len(events) == count:
                return

    try:
        await asyncio.wait_for(collect(), timeout)
    except TimeoutError:
        last = ", ".join(f"{e.topic} {e.payload}" for e in events[-5:])
        raise AssertionError(
            f"got {len(events)} of {count} events within {timeout} s (last: {last or 'none'})"
        ) from None
    return events
