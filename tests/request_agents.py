"""Child-side behaviours for the request/reply tests across processes (run by
:mod:`spawn`, see tests/test_request_processes.py).

Each function takes the pipe to the parent first, connects its own
:class:`~shmbus.ShmBus`, says ``"ready"`` once its subscription exists (or,
for a requester, once it is connected), and ends with a report dict. The
``blocking_*`` agents (tests/test_request_sync_processes.py) run no event
loop at all: they use ``subscribe_sync``, ``reply_nowait`` and
``request_sync`` from plain threads.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter
from typing import Any

from shmbus_tools.children import BlockingLink

from shmbus import ShmBus


async def _parent_says(conn: BlockingLink, *words: str) -> str:
    """Wait, off the event loop, for one of *words* from the parent."""
    while True:
        message = await asyncio.to_thread(conn.recv)
        if message in words:
            return str(message)


def responder(
    conn: BlockingLink,
    bus_name: str,
    pattern: str,
    *,
    hold: bool = False,
    bus_kwargs: dict[str, Any] | None = None,
) -> None:
    """Answer each request on *pattern* with ``{"n": its n, "pid": our pid}``
    until the parent says ``"stop"``; then report ``{"answered": count}``.

    The requests already queued when one arrives are answered with it, in
    reverse order, so replies do not come back in request order. With
    *hold*, tell the parent ``("holding", payload)`` for each request
    instead of answering it (the parent then kills or stops us)."""

    async def main() -> dict[str, Any]:
        answered = 0
        async with ShmBus(bus_name, **(bus_kwargs or {})) as bus:
            sub = bus.subscribe(pattern)
            conn.send("ready")

            async def serve() -> None:
                nonlocal answered
                async for request in sub:
                    if hold:
                        conn.send(("holding", request.payload))
                        continue
                    batch = [request]
                    while sub.statistics().queued:
                        batch.append(await anext(sub))
                    for each in reversed(batch):
                        await bus.reply(each, {"n": each.payload["n"], "pid": os.getpid()})
                        answered += 1

            server = asyncio.create_task(serve())
            await _parent_says(conn, "stop")
            server.cancel()
            await sub.aclose()
        return {"answered": answered}

    conn.send(asyncio.run(main()))


def requester(
    conn: BlockingLink,
    bus_name: str,
    topic: str,
    count: int,
    *,
    tasks: int,
    timeout: float,
    bus_kwargs: dict[str, Any] | None = None,
) -> None:
    """After ``"go"``, send *count* requests ``{"n": i}`` from *tasks*
    concurrent tasks and report how many replies carried the right ``n``
    (``ok``), the ``(i, reply)`` pairs that did not (``mismatched``), the
    exceptions by type (``errors``), the pids that answered (``by``), and
    what the bus holds afterwards (``waiting`` requests, ``subscriptions``)."""

    async def main() -> dict[str, Any]:
        async with ShmBus(bus_name, **(bus_kwargs or {})) as bus:
            conn.send("ready")
            await _parent_says(conn, "go")
            numbers = iter(range(count))
            ok = 0
            mismatched: list[tuple[int, Any]] = []
            errors: Counter[str] = Counter()
            by: Counter[int] = Counter()

            async def ask() -> None:
                nonlocal ok
                for n in numbers:
                    try:
                        reply = await bus.request(topic, {"n": n}, timeout=timeout)
                    except Exception as exc:
                        errors[type(exc).__name__] += 1
                        continue
                    if reply.payload.get("n") == n:
                        ok += 1
                        by[reply.payload["pid"]] += 1
                    else:
                        mismatched.append((n, reply.payload))

            await asyncio.gather(*(ask() for _ in range(tasks)))
            return {
                "ok": ok,
                "mismatched": mismatched,
                "errors": dict(errors),
                "by": dict(by),
                "waiting": bus._inbox.waiting,
                "subscriptions": bus.stats().subscriptions,
            }

    conn.send(asyncio.run(main()))


def blocking_responder(
    conn: BlockingLink,
    bus_name: str,
    pattern: str,
    *,
    hold: bool = False,
    bus_kwargs: dict[str, Any] | None = None,
) -> None:
    """:func:`responder` without an event loop: answer each request on
    *pattern* with ``{"n": its n, "pid": our pid}`` (``reply_nowait``) from a
    blocking subscription until the parent says ``"stop"``; then report
    ``{"answered": count}``. With *hold*, tell the parent ``("holding",
    payload)`` for each request instead of answering it."""
    bus = ShmBus(bus_name, **(bus_kwargs or {}))
    bus.connect_sync()
    answered = 0
    try:
        sub = bus.subscribe_sync(pattern)
        conn.send("ready")

        def until_stop() -> None:
            while conn.recv() not in ("stop", "eof"):
                pass
            sub.close()

        watcher = threading.Thread(target=until_stop, daemon=True)
        watcher.start()
        for request in sub:
            if hold:
                conn.send(("holding", request.payload))
                continue
            bus.reply_nowait(request, {"n": request.payload["n"], "pid": os.getpid()})
            answered += 1
        watcher.join()
    finally:
        bus.close_sync()
    conn.send({"answered": answered})


def blocking_requester(
    conn: BlockingLink,
    bus_name: str,
    topic: str,
    count: int,
    *,
    threads: int,
    timeout: float,
    bus_kwargs: dict[str, Any] | None = None,
) -> None:
    """:func:`requester` without an event loop: after ``"go"``, send *count*
    requests ``{"n": i}`` with ``request_sync`` from *threads* threads at once
    and report as :func:`requester` does."""
    bus = ShmBus(bus_name, **(bus_kwargs or {}))
    bus.connect_sync()
    try:
        conn.send("ready")
        while conn.recv() != "go":
            pass
        numbers = iter(range(count))
        lock = threading.Lock()
        ok = 0
        mismatched: list[tuple[int, Any]] = []
        errors: Counter[str] = Counter()
        by: Counter[int] = Counter()

        def ask() -> None:
            nonlocal ok
            while True:
                with lock:
                    n = next(numbers, None)
                if n is None:
                    return
                try:
                    reply = bus.request_sync(topic, {"n": n}, timeout=timeout)
                except Exception as exc:
                    with lock:
                        errors[type(exc).__name__] += 1
                    continue
                with lock:
                    if reply.payload.get("n") == n:
                        ok += 1
                        by[reply.payload["pid"]] += 1
                    else:
                        mismatched.append((n, reply.payload))

        workers = [threading.Thread(target=ask) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        report = {
            "ok": ok,
            "mismatched": mismatched,
            "errors": dict(errors),
            "by": dict(by),
            "waiting": bus._sync_inbox.waiting,
            "late": bus._sync_inbox.late,
            "subscriptions": bus.stats().subscriptions,
        }
    finally:
        bus.close_sync()
    conn.send(report)


def blocking_flooder(
    conn: BlockingLink,
    bus_name: str,
    count: int,
    *,
    early: bool,
    bus_kwargs: dict[str, Any] | None = None,
) -> None:
    """Publish, without an event loop, *count* events on ``noise.*`` (topics
    nobody listens to) after ``"go"``, then report ``{"published": count,
    "wraps": how many times our ring wrapped}`` and keep the ring live until
    ``"stop"``. With *early*, publish one event before saying ``"ready"``,
    so the ring exists before the parent's first request."""
    from shmbus._core.layout import W_WRITE_CURSOR

    bus = ShmBus(bus_name, **(bus_kwargs or {}))
    bus.connect_sync()
    try:
        if early:
            bus.publish_nowait("noise.first", {})
        conn.send("ready")
        while conn.recv() != "go":
            pass
        for n in range(count):
            bus.publish_nowait(f"noise.{n % 8}", {"n": n})
        ring = bus._ring
        assert ring is not None
        conn.send({"published": count, "wraps": int(ring.words[W_WRITE_CURSOR]) // ring.capacity})
        while conn.recv() not in ("stop", "eof"):
            pass
    finally:
        bus.close_sync()
