"""The loops every peer's child processes share: publishing and receiving.

Owns
----
* The publisher loops, in an asyncio flavour (``await send(...)``, the event
  loop given a turn every :data:`BATCH` events while flooding and after every
  paced step) and a blocking one. Flooding publishes as fast as the peer takes
  events for the run's duration; pacing publishes event ``n`` at ``t0 + n /
  rate`` (``time.sleep`` to the due time, precise to tens of µs, then the
  events due; a publisher more than 50 ms late resets its schedule rather than
  bursting).
* The subscriber harnesses. A peer hands in its receive loop, which gets a
  :class:`~shmbus_tools.bench.workload.Recorder` and calls it with each
  :class:`shmbus.Event`; the harness reports ready, starts measuring on
  "start", and ends the run:

  - asyncio peers: after "drain", once the events received (plus those the
    transport counted as dropped, where it counts them) reach the number
    published; for peers without such accounting, also after 250 ms without
    an event; in any case at the drain deadline;
  - blocking peers (lossless queues): when the receive loop returns, i.e. it
    took every publisher's end-of-stream sentinel, or when the parent signals
    ``SIGUSR1`` at the drain deadline.

* The figures each child reports in its "final" message.

Invariants
----------
* No child exits before the parent says "stop" (or goes away): a publisher's
  buffered output (ZeroMQ's I/O thread, a ``multiprocessing.Queue`` feeder
  thread) keeps flowing while subscribers drain.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from types import FrameType
from typing import Any, Final

from ..children import EOF, AsyncLink, BlockingLink, data_of, kind_of
from .spec import RunSpec
from .workload import PayloadFactory, Recorder, cpu_seconds, payload_factory

__all__ = [
    "AsyncSend",
    "BATCH",
    "SyncSend",
    "async_publisher",
    "async_subscriber",
    "blocking_publisher",
    "blocking_subscriber",
]

#: Events a flooding publisher sends between two looks at the clock (and, on
#: asyncio, two turns of the event loop).
BATCH: Final = 256
#: An asyncio subscriber of a peer that does not count its drops stops after
#: this long without an event, once the publishers are done.
QUIET_S: Final = 0.25
_MAX_LAG_S: Final = 0.05

AsyncSend = Callable[[str, dict[str, Any]], Awaitable[None]]
SyncSend = Callable[[str, dict[str, Any]], None]


# ─── Publishers ─────────────────────────────────────────────────────────────


async def async_publisher(
    link: AsyncLink,
    spec: RunSpec,
    send: AsyncSend,
    *,
    flush: Callable[[], Awaitable[None]] | None = None,
    errors: Callable[[], int] | None = None,
) -> None:
    """Report ready, publish through *send* on "start", report, wait for "stop".

    *flush* runs after the last event and counts in the publishing time (the
    events have not left the process before it returns).
    """
    make = payload_factory(spec.blob_size)
    link.send("ready")
    if not await link.wait_start():
        return
    cpu0 = cpu_seconds()
    start_ns = time.monotonic_ns()
    if spec.rate is None:
        published = await _async_flood(send, make, spec.duration)
    else:
        published = await _async_paced(send, make, spec.duration, spec.rate)
    if flush is not None:
        await flush()
    end_ns = time.monotonic_ns()
    link.send(("final", _publisher_final(published, start_ns, end_ns, cpu0, errors)))
    await link.wait_stop()


async def _async_flood(send: AsyncSend, make: PayloadFactory, duration: float) -> int:
    mono = time.monotonic
    end = mono() + duration
    seq = 0
    while True:
        for _ in range(BATCH):
            topic, payload = make(seq)
            await send(topic, payload)
            seq += 1
        await asyncio.sleep(0)
        if mono() >= end:
            return seq


async def _async_paced(send: AsyncSend, make: PayloadFactory, duration: float, rate: float) -> int:
    mono = time.monotonic
    base = mono()
    end = base + duration
    base_seq = seq = 0
    while True:
        now = mono()
        if now >= end:
            return seq
        due = base_seq + int((now - base) * rate) + 1
        if due - seq > rate * _MAX_LAG_S:  # far behind: do not burst to catch up
            base, base_seq, due = now, seq, seq + 1
        while seq < due:
            topic, payload = make(seq)
            await send(topic, payload)
            seq += 1
        await asyncio.sleep(0)  # let the client library write what it buffered
        delay = base + (seq - base_seq) / rate - mono()
        if delay > 0:
            time.sleep(delay)


def blocking_publisher(
    link: BlockingLink,
    spec: RunSpec,
    send: SyncSend,
    *,
    after: Callable[[], None] | None = None,
    errors: Callable[[], int] | None = None,
) -> None:
    """The blocking twin of :func:`async_publisher`. *after* runs once the
    figures are taken (end-of-stream sentinels go there)."""
    make = payload_factory(spec.blob_size)
    link.send("ready")
    if not link.wait_start():
        return
    cpu0 = cpu_seconds()
    start_ns = time.monotonic_ns()
    if spec.rate is None:
        published = _blocking_flood(send, make, spec.duration)
    else:
        published = _blocking_paced(send, make, spec.duration, spec.rate)
    end_ns = time.monotonic_ns()
    final = _publisher_final(published, start_ns, end_ns, cpu0, errors)
    if after is not None:
        after()
    link.send(("final", final))
    link.wait_stop()


def _blocking_flood(send: SyncSend, make: PayloadFactory, duration: float) -> int:
    mono = time.monotonic
    end = mono() + duration
    seq = 0
    while True:
        for _ in range(BATCH):
            topic, payload = make(seq)
            send(topic, payload)
            seq += 1
        if mono() >= end:
            return seq


def _blocking_paced(send: SyncSend, make: PayloadFactory, duration: float, rate: float) -> int:
    mono = time.monotonic
    base = mono()
    end = base + duration
    base_seq = seq = 0
    while True:
        now = mono()
        if now >= end:
            return seq
        due = base_seq + int((now - base) * rate) + 1
        if due - seq > rate * _MAX_LAG_S:
            base, base_seq, due = now, seq, seq + 1
        while seq < due:
            topic, payload = make(seq)
            send(topic, payload)
            seq += 1
        delay = base + (seq - base_seq) / rate - mono()
        if delay > 0:
            time.sleep(delay)


def _publisher_final(
    published: int, start_ns: int, end_ns: int, cpu0: float, errors: Callable[[], int] | None
) -> dict[str, Any]:
    return {
        "published": published,
        "errors": errors() if errors is not None else 0,
        "start_ns": start_ns,
        "end_ns": end_ns,
        "cpu_s": cpu_seconds() - cpu0,
    }


# ─── Subscribers ────────────────────────────────────────────────────────────


async def async_subscriber(
    link: AsyncLink,
    spec: RunSpec,
    consume: Callable[[Recorder], Coroutine[Any, Any, None]],
    *,
    accounting: Callable[[], tuple[int, int]] | None = None,
) -> None:
    """Run *consume* from "start" until the run is drained; report; wait for "stop".

    *accounting*, for a transport that counts what it drops, returns
    ``(dropped, queued)``: the run is complete once received + dropped
    reaches the number published and nothing is queued.
    """
    record = Recorder(latency=spec.latency)
    link.send("ready")
    if not await link.wait_start():
        return
    cpu0 = cpu_seconds()
    consumer = asyncio.create_task(consume(record))
    try:
        drain = await _next_drain(link, consumer, record)
        if drain is None:
            return
        expected, deadline = int(drain["expected"]), float(drain["deadline"])
        end = await _until_drained(record, consumer, expected, deadline, accounting)
        cpu_s = cpu_seconds() - cpu0
    finally:
        consumer.cancel()
        try:
            await consumer
        except asyncio.CancelledError:
            pass
    dropped = accounting()[0] if accounting is not None else None
    link.send(("final", _subscriber_final(record, dropped, cpu_s, end)))
    await link.wait_stop()


async def _next_drain(
    link: AsyncLink, consumer: asyncio.Task[None], record: Recorder
) -> dict[str, Any] | None:
    while True:
        getter = asyncio.ensure_future(link.recv())
        if not consumer.done():
            await asyncio.wait({getter, consumer}, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            _ended_early(consumer, record)
        message = await getter
        kind = kind_of(message)
        if kind == "drain":
            drain: dict[str, Any] = data_of(message)
            return drain
        if kind in ("stop", EOF):
            return None


def _ended_early(consumer: asyncio.Task[None], record: Recorder) -> None:
    """The receive loop returned (or raised) before the run was over."""
    consumer.result()  # a failure is the run's failure
    if record.end_note is None:
        record.end_note = "receive loop ended early"


async def _until_drained(
    record: Recorder,
    consumer: asyncio.Task[None],
    expected: int,
    deadline: float,
    accounting: Callable[[], tuple[int, int]] | None,
) -> str:
    mono = time.monotonic
    last_count, last_change = -1, mono()
    while True:
        if consumer.done():
            _ended_early(consumer, record)
        now = mono()
        if accounting is not None:
            dropped, queued = accounting()
            if record.count + dropped >= expected and queued == 0:
                return "complete"
        elif record.count >= expected:
            return "complete"
        if record.count != last_count:
            last_count, last_change = record.count, now
        elif (accounting is None or consumer.done()) and now - last_change >= QUIET_S:
            return "quiet"
        if now >= deadline:
            return "deadline"
        await asyncio.sleep(0.01)


class _DrainExpired(BaseException):  # not Exception: library code catches those
    pass


def _expire(signum: int, frame: FrameType | None) -> None:
    raise _DrainExpired


def blocking_subscriber(
    link: BlockingLink, spec: RunSpec, consume: Callable[[Recorder], None]
) -> None:
    """Run *consume* from "start" until it returns (every end-of-stream
    sentinel taken) or the parent's ``SIGUSR1`` says the drain deadline passed."""
    record = Recorder(latency=spec.latency)
    link.send("ready")
    if not link.wait_start():
        return
    cpu0 = cpu_seconds()
    signal.signal(signal.SIGUSR1, _expire)
    try:
        consume(record)
        end = "complete"
    except _DrainExpired:
        end = "deadline"
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    cpu_s = cpu_seconds() - cpu0
    link.send(("final", _subscriber_final(record, None, cpu_s, end)))
    link.wait_stop()


def _subscriber_final(
    record: Recorder, dropped: int | None, cpu_s: float, end: str
) -> dict[str, Any]:
    if record.end_note is not None:
        end = record.end_note
    return {
        "received": record.count,
        "dropped": dropped,
        "first_ns": record.first_ns,
        "last_ns": record.last_ns,
        "cpu_s": cpu_s,
        "end": end,
        "samples": sorted(record.samples),
    }
