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
