"""Child-side behaviours for the queue-group tests (run by :mod:`spawn`).

Same conventions as :mod:`agents`: the pipe to the parent comes first, the
agent connects its own :class:`~shmbus.ShmBus`, says ``"ready"`` once its
subscription exists, and ends with a report dict.

A worker writes one line ``"<pub> <seq>\\n"`` per event its consumer takes to
a log file of its own, with one ``os.write`` each: a worker killed with
SIGKILL leaves the list of what it handled, short of the event in hand at
most.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from shmbus_tools.children import EOF, BlockingLink

from shmbus import ShmBus


def group_worker(
    conn: BlockingLink,
    name: str,
    pattern: str,
    queue: str,
    log_path: str,
    *,
    bus_kwargs: dict[str, Any] | None = None,
) -> None:
    """Join group *queue* on *pattern* and send ``"ready"``; log every event
    taken until the parent sends ``"stop"``; then close the subscription and
    send ``{"pid", "delivered", "dropped", "repaired"}``."""

    async def main() -> None:
        bus = ShmBus(name, **(bus_kwargs or {}))
        await bus.connect()
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_message() -> None:
            while not stop.is_set() and conn.poll():
                if conn.recv() in ("stop", EOF):  # EOF: the parent went away
                    stop.set()

        try:
            sub = bus.subscribe(pattern, queue=queue)
            loop.add_reader(conn.conn.fileno(), on_message)

            async def close_on_stop() -> None:
                await stop.wait()
                await sub.aclose()

            closer = asyncio.ensure_future(close_on_stop())
            conn.send("ready")
            async for event in sub:
                payload = event.payload
                os.write(fd, b"%d %d\n" % (payload["pub"], payload["seq"]))
            await closer
            loop.remove_reader(conn.conn.fileno())
            report = {
                "pid": os.getpid(),
                "delivered": sub.delivered,
                "dropped": sub.dropped,
                "repaired": getattr(sub, "repaired", 0),
            }
        finally:
            os.close(fd)
            await bus.close()
        conn.send(report)

    asyncio.run(main())


def overlap_publisher(
    conn: BlockingLink,
    nats_url: str,
    name: str,
    topic: str,
    count: int,
    *,
    bus_kwargs: dict[str, Any] | None = None,
) -> None:
    """Publish ``{"n": 0..count-1}`` on *topic* through a FallbackBus whose
    overlap outlasts the test, so that every event goes to NATS and to shm
    bus *name*; then send ``{"routes": bus.routes()}``."""
    from shmbus.fallback import FallbackBus
    from shmbus.nats import NatsBus

    async def main() -> None:
        bus = FallbackBus(NatsBus(nats_url), ShmBus(name, **(bus_kwargs or {})), overlap=3600)
        await bus.connect()
        try:
            async with asyncio.timeout(30):  # only turns a hang into a failure
                while not bus.using_nats:
                    await asyncio.sleep(0.01)
            for n in range(count):
                await bus.publish(topic, {"n": n})
            await bus.primary.flush()
            routes = bus.routes()
        finally:
            await bus.close()
        conn.send({"routes": routes})

    asyncio.run(main())
