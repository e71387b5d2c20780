"""shmbus itself, default settings, driven through its public asyncio API.

Publishers ``await bus.publish(topic, payload, event_type=...)`` (P1 also
measures ``bus.publish_nowait``); subscribers ``async for event in sub`` and
get the library's own frozen :class:`shmbus.Event`. Every run gets a fresh bus
``bench-<parent pid>-<run>``: the last process to close it removes its files,
and the parent removes whatever a killed child left behind.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from multiprocessing.connection import Connection
from typing import Any

from ...leftovers import cleanup
from ...shm import ShmBus
from ..control import AsyncLink, BlockingLink
from ..harness import async_publisher, async_subscriber, blocking_publisher
from ..spec import RunSpec
from ..workload import EVENT_TYPE, PATTERN, Recorder
from . import Driver

__all__ = ["DRIVERS", "ShmDriver", "bus_name"]

log = logging.getLogger("shmbus.bench")


def bus_name(run_id: int) -> str:
    """The bus of run *run_id* of this benchmark process."""
    return f"bench-{os.getpid()}-{run_id}"


class ShmDriver(Driver):
    name = "shm"

    def prepare(self, spec: RunSpec) -> str:
        return bus_name(spec.run_id)

    def release(self, spec: RunSpec, resources: Any) -> None:
        try:
            removed = cleanup(str(resources))
        except Exception:  # still in use (a child that would not die) or gone
            log.warning("could not clean up bus %s", resources, exc_info=True)
            return
        if removed:
            log.warning("removed files a child left behind: %s", ", ".join(removed))

    def publisher(self, conn: Connection, spec: RunSpec, resources: Any, index: int) -> None:
        asyncio.run(_publisher(conn, spec, str(resources)))

    def subscriber(self, conn: Connection, spec: RunSpec, resources: Any, index: int) -> None:
        asyncio.run(_subscriber(conn, spec, str(resources)))


class ShmLowLatencyDriver(ShmDriver):
    """shmbus with the subscriber's reader in the opt-in low-latency mode."""

    name = "shmll"

    def subscriber(self, conn: Connection, spec: RunSpec, resources: Any, index: int) -> None:
        asyncio.run(_subscriber(conn, spec, str(resources), low_latency=True))


async def _publisher(conn: Connection, spec: RunSpec, name: str) -> None:
    async with ShmBus(name) as bus:

        def errors() -> int:
            return bus.stats().publish_errors

        if spec.variant == "publish_nowait":
            # The synchronous API: no event loop involved in the loop.
            send = functools.partial(bus.publish_nowait, event_type=EVENT_TYPE)
            blocking_publisher(BlockingLink(conn), spec, send, errors=errors)
            return
        link = AsyncLink(conn)
        try:
            await async_publisher(
                link, spec, functools.partial(bus.publish, event_type=EVENT_TYPE), errors=errors
            )
        finally:
            link.close()


async def _subscriber(
    conn: Connection, spec: RunSpec, name: str, *, low_latency: bool = False
) -> None:
    link = AsyncLink(conn)
    try:
        async with ShmBus(name, low_latency=low_latency) as bus, bus.subscribe(PATTERN) as sub:

            async def consume(record: Recorder) -> None:
                async for event in sub:
                    record(event)

            def accounting() -> tuple[int, int]:
                stats = sub.statistics()
                return stats.dropped, stats.queued

            await async_subscriber(link, spec, consume, accounting=accounting)
    finally:
        link.close()


DRIVERS: dict[str, type[Driver]] = {"shm": ShmDriver, "shmll": ShmLowLatencyDriver}
