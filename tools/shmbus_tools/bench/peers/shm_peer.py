"""shmbus itself, default settings, driven through its public asyncio API.

Publishers ``await bus.publish(topic, payload, event_type=...)`` (P1 also
measures ``bus.publish_nowait``); subscribers ``async for event in sub`` and
get the library's own frozen :class:`shmbus.Event`. Every run gets a fresh bus
``bench-<parent pid>-<run>``: the last process to close it removes its files,
and the parent removes whatever a killed child left behind.

The ``shmsync`` row (:class:`ShmSyncDriver`) drives the blocking API instead:
``publish_nowait`` from a plain loop and ``for event in bus.subscribe_sync(...)``
in processes that run no event loop; each publisher ends its stream with an
event on :data:`END_TOPIC`, and the subscriber is done when it took one from
every publisher.

Two peers use these workers: ``shm`` (the shmbus this package belongs to) and
``shm@<rev>`` (:class:`BaselineDriver`: shmbus as of an older git revision,
see :mod:`shmbus_tools.bench.baseline`). So that one worker drives both versions,
the workers use only the API every version has: ``ShmBus(name[,
low_latency=...])``, ``connect``/``publish``/``publish_nowait``/``subscribe``/
``close``, and read ``stats()`` and ``statistics()`` by name, tolerating a
counter that is missing.

Q1 and R1 run the ``shm`` peer only. Q1's workers ``bus.subscribe(pattern,
queue="workers")``, one bus instance per worker process; a ShmBus without
queue groups raises NotImplementedError there, and the worker reports the
run unsupported with that reason. R1's requester awaits ``bus.request(topic,
payload)`` for each request; its responder answers each event of ``async for
event in sub`` with ``await bus.reply(event, event.payload)``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from shmbus._core.leftovers import cleanup
from shmbus.shm import ShmBus

from ...children import AsyncLink, BlockingLink
from ..baseline import BASELINE_PREFIX, bus_class
from ..harness import (
    async_publisher,
    async_requester,
    async_subscriber,
    blocking_publisher,
    blocking_subscriber,
    report_unsupported,
)
from ..spec import RunSpec
from ..workload import EVENT_TYPE, PATTERN, Recorder
from . import Driver, Env

__all__ = [
    "DRIVERS",
    "END_TOPIC",
    "BaselineDriver",
    "ShmDriver",
    "ShmSyncDriver",
    "ShmUvloopDriver",
    "bus_name",
]

log = logging.getLogger("shmbus_tools.bench")

#: The end-of-stream event of the blocking row (it matches the pattern).
END_TOPIC = "decky.end.traffic"

#: Makes an unconnected bus: ``(name, **options) -> bus``.
BusFactory = Callable[..., Any]


def bus_name(run_id: int) -> str:
    """The bus of run *run_id* of this benchmark process."""
    return f"bench-{os.getpid()}-{run_id}"


class ShmDriver(Driver):
    name = "shm"

    def bus_factory(self) -> BusFactory:
        return ShmBus

    def prepare(self, spec: RunSpec) -> str:
        return bus_name(spec.run_id)

    def release(self, spec: RunSpec, resources: Any) -> None:
        _release(cleanup, str(resources))

    def publisher(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        asyncio.run(_publisher(link, spec, str(resources), self.bus_factory()))

    def subscriber(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        asyncio.run(_subscriber(link, spec, str(resources), self.bus_factory()))

    def group_member(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        asyncio.run(_group_member(link, spec, str(resources), self.bus_factory()))

    def requester(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        asyncio.run(_requester(link, spec, str(resources), self.bus_factory()))

    def responder(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        asyncio.run(_responder(link, spec, str(resources), self.bus_factory()))


class ShmLowLatencyDriver(ShmDriver):
    """shmbus with the readers that wait for events (L1's subscriber, R1's
    requester and responder) in the opt-in low-latency mode."""

    name = "shmll"

    def subscriber(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        asyncio.run(_subscriber(link, spec, str(resources), self.bus_factory(), low_latency=True))

    def requester(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        factory = functools.partial(self.bus_factory(), low_latency=True)
        asyncio.run(_requester(link, spec, str(resources), factory))

    def responder(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        factory = functools.partial(self.bus_factory(), low_latency=True)
        asyncio.run(_responder(link, spec, str(resources), factory))


class ShmUvloopDriver(ShmDriver):
    """shmbus with publisher and subscriber on uvloop's event loop."""

    name = "shmuv"

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            import uvloop  # noqa: F401
        except ImportError:
            return "uvloop is not installed (pip install 'shmbus[uvloop]')"
        return None

    def publisher(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        import uvloop

        uvloop.run(_publisher(link, spec, str(resources), self.bus_factory()))

    def subscriber(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        import uvloop

        uvloop.run(_subscriber(link, spec, str(resources), self.bus_factory()))


class ShmSyncDriver(ShmDriver):
    """shmbus's blocking API: no event loop in either process."""

    name = "shmsync"
    blocking_subscriber = True

    def publisher(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        bus = ShmBus(str(resources))
        bus.connect_sync()
        try:

            def end_of_stream() -> None:
                bus.publish_nowait(END_TOPIC, {"publisher": index}, event_type=EVENT_TYPE)

            blocking_publisher(
                link,
                spec,
                functools.partial(bus.publish_nowait, event_type=EVENT_TYPE),
                after=end_of_stream,
                errors=lambda: bus.stats().publish_errors,
            )
        finally:
            bus.close_sync()

    def subscriber(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        bus = ShmBus(str(resources))
        bus.connect_sync()
        try:
            sub = bus.subscribe_sync(PATTERN)

            def consume(record: Recorder) -> None:
                ends = 0
                for event in sub:
                    if event.topic == END_TOPIC:
                        ends += 1
                        if ends == spec.publishers:
                            return
                        continue
                    record(event)

            blocking_subscriber(link, spec, consume)
        finally:
            bus.close_sync()


class BaselineDriver(ShmDriver):
    """shmbus as of an older revision: the old copy the runner imported
    (``Env.baseline``), driven by the same workers as :class:`ShmDriver`."""

    name = BASELINE_PREFIX

    def __init__(self, env: Env) -> None:
        super().__init__(env)
        if env.baseline is None:
            raise RuntimeError("the baseline peer needs Env.baseline (the exported package)")
        self.package: ModuleType = env.baseline

    def bus_factory(self) -> BusFactory:
        return bus_class(self.package)

    def release(self, spec: RunSpec, resources: Any) -> None:
        # The old copy knows its own files best; any version has cleanup().
        old_cleanup = getattr(self.package, "cleanup", None)
        _release(old_cleanup if callable(old_cleanup) else cleanup, str(resources))


def _release(clean: Callable[[str], Any], name: str) -> None:
    try:
        removed = clean(name)
    except Exception:  # still in use (a child that would not die) or gone
        log.warning("could not clean up bus %s", name, exc_info=True)
        return
    if removed:
        log.warning("removed files a child left behind: %s", ", ".join(removed))


def _count(snapshot: object, key: str) -> int:
    """Counter *key* of a ``stats()``/``statistics()`` snapshot, 0 if it has none
    (a mapping or a record: versions differ)."""
    if isinstance(snapshot, Mapping):
        value = snapshot.get(key)
    else:
        value = getattr(snapshot, key, None)
    return int(value) if isinstance(value, int) else 0


async def _publisher(pipe: BlockingLink, spec: RunSpec, name: str, make_bus: BusFactory) -> None:
    bus = make_bus(name)
    await bus.connect()
    try:

        def errors() -> int:
            return _count(bus.stats(), "publish_errors")

        if spec.variant == "publish_nowait":
            # The synchronous API: no event loop involved in the loop.
            send = functools.partial(bus.publish_nowait, event_type=EVENT_TYPE)
            blocking_publisher(pipe, spec, send, errors=errors)
            return
        link = AsyncLink(pipe)
        try:
            await async_publisher(
                link, spec, functools.partial(bus.publish, event_type=EVENT_TYPE), errors=errors
            )
        finally:
            link.close()
    finally:
        await bus.close()


async def _subscriber(
    pipe: BlockingLink, spec: RunSpec, name: str, make_bus: BusFactory, *, low_latency: bool = False
) -> None:
    link = AsyncLink(pipe)
    try:
        bus = make_bus(name, low_latency=True) if low_latency else make_bus(name)
        await bus.connect()
        try:
            sub = bus.subscribe(PATTERN)

            async def consume(record: Recorder) -> None:
                async for event in sub:
                    record(event)

            await async_subscriber(link, spec, consume, accounting=_sub_accounting(sub))
        finally:
            await bus.close()  # ends the subscription too
    finally:
        link.close()


def _sub_accounting(sub: Any) -> Callable[[], tuple[int, int]] | None:
    """``(dropped, queued)`` of *sub*, if it keeps statistics."""
    if not callable(getattr(sub, "statistics", None)):
        return None

    def accounting() -> tuple[int, int]:
        stats = sub.statistics()
        return _count(stats, "dropped"), _count(stats, "queued")

    return accounting


async def _group_member(pipe: BlockingLink, spec: RunSpec, name: str, make_bus: BusFactory) -> None:
    link = AsyncLink(pipe)
    try:
        bus = make_bus(name)
        await bus.connect()
        try:
            try:
                sub = bus.subscribe(PATTERN, queue=spec.queue)
            except NotImplementedError as exc:
                # Until ShmBus has cross-process queue groups (measured once
                # it has them, with no change here).
                report_unsupported(
                    link,
                    f"{type(bus).__name__}.subscribe(pattern, queue=...) raised "
                    f"NotImplementedError: {exc}",
                )
                await link.wait_stop()
                return

            async def consume(record: Recorder) -> None:
                async for event in sub:
                    record(event)

            await async_subscriber(link, spec, consume, accounting=_sub_accounting(sub), share=True)
        finally:
            await bus.close()
    finally:
        link.close()


async def _requester(pipe: BlockingLink, spec: RunSpec, name: str, make_bus: BusFactory) -> None:
    link = AsyncLink(pipe)
    try:
        bus = make_bus(name)
        await bus.connect()
        try:
            request = bus.request

            async def ask(topic: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
                reply = await request(topic, payload, timeout=timeout, event_type=EVENT_TYPE)
                answer: dict[str, Any] = reply.payload
                return answer

            await async_requester(link, spec, ask)
        finally:
            await bus.close()
    finally:
        link.close()


async def _responder(pipe: BlockingLink, spec: RunSpec, name: str, make_bus: BusFactory) -> None:
    link = AsyncLink(pipe)
    try:
        bus = make_bus(name)
        await bus.connect()
        try:
            sub = bus.subscribe(PATTERN)
            reply = bus.reply

            async def consume(record: Recorder) -> None:
                async for event in sub:
                    record(event)
                    await reply(event, event.payload, event_type=EVENT_TYPE)

            await async_subscriber(link, spec, consume, accounting=_sub_accounting(sub))
        finally:
            await bus.close()
    finally:
        link.close()


DRIVERS: dict[str, type[Driver]] = {
    "shm": ShmDriver,
    "shmll": ShmLowLatencyDriver,
    "shmuv": ShmUvloopDriver,
    "shmsync": ShmSyncDriver,
    BASELINE_PREFIX: BaselineDriver,
}
