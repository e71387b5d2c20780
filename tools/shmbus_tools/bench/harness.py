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
  - members of a queue group (Q1): each gets a share of what was published
    and cannot know its size, so every peer's member ends after 250 ms
    without an event (with its queue empty, where the transport tells), or
    at the drain deadline.

* The requester of R1 (:func:`async_requester`): after "start", sends
  :data:`~shmbus_tools.bench.spec.REQUEST_WARMUP` requests, then the
  measured ones, each once the previous one's reply is in hand, and keeps the
  round trip of each measured one: from the ``monotonic_ns`` stamp taken when
  its payload is built, right before the request call, to its reply in hand.
  A request not answered within
  :data:`~shmbus_tools.bench.spec.REQUEST_TIMEOUT` counts as timed out; the
  run's duration bounds the whole loop. Its responder is an ordinary
  subscriber whose receive loop answers what it records.
* :func:`report_unsupported`: a child whose peer turns out, at run time, not
  to support what the run needs (ShmBus's queue groups before they exist)
  says why instead of "ready"; the parent skips the run with that reason.

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
from .spec import REQUEST_TIMEOUT, REQUEST_WARMUP, RunSpec
from .workload import PayloadFactory, Recorder, cpu_seconds, payload_factory

__all__ = [
    "UNSUPPORTED",
    "AsyncRequest",
    "AsyncSend",
    "BATCH",
    "SyncSend",
    "async_publisher",
    "async_requester",
    "async_subscriber",
    "blocking_publisher",
    "blocking_subscriber",
    "report_unsupported",
]

#: Events a flooding publisher sends between two looks at the clock (and, on
#: asyncio, two turns of the event loop).
BATCH: Final = 256
#: An asyncio subscriber of a peer that does not count its drops stops after
#: this long without an event, once the publishers are done.
QUIET_S: Final = 0.25
_MAX_LAG_S: Final = 0.05

#: The kind of the message a child sends instead of "ready" when its peer
#: cannot do what the run needs: ``("unsupported", {"reason": ...})``.
UNSUPPORTED: Final = "unsupported"

AsyncSend = Callable[[str, dict[str, Any]], Awaitable[None]]
SyncSend = Callable[[str, dict[str, Any]], None]
#: Sends one request and returns its reply's payload; raises TimeoutError
#: (or a subclass) when no reply came within the timeout it is given.
AsyncRequest = Callable[[str, dict[str, Any], float], Awaitable[dict[str, Any]]]


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


# ─── Request/reply ──────────────────────────────────────────────────────────


async def async_requester(link: AsyncLink, spec: RunSpec, request: AsyncRequest) -> None:
    """Report ready; on "start" send R1's requests through *request*, one
    after the other; report; wait for "stop".

    The figures are a publisher's (``published`` = measured requests sent,
    ``errors`` = those timed out, the time from the first measured request
    to the last reply) plus ``answered`` and the round trips in ``samples``.
    """
    make = payload_factory(spec.blob_size)
    link.send("ready")
    if not await link.wait_start():
        return
    requests = spec.requests or 0
    mono, mono_ns = time.monotonic, time.monotonic_ns
    end = mono() + spec.duration
    seq = 0
    for _ in range(REQUEST_WARMUP):
        if mono() >= end:
            break
        topic, payload = make(seq)
        seq += 1
        try:
            await request(topic, payload, REQUEST_TIMEOUT)
        except TimeoutError:
            pass
    cpu0 = cpu_seconds()
    samples: list[int] = []
    sent = timeouts = wrong = 0
    start_ns = mono_ns()
    while sent < requests and mono() < end:
        topic, payload = make(seq)
        seq += 1
        sent += 1
        try:
            answer = await request(topic, payload, REQUEST_TIMEOUT)
        except TimeoutError:
            timeouts += 1
            continue
        now = mono_ns()
        if answer.get("seq") != payload["seq"]:
            wrong += 1  # someone else's reply: a bug of the peer's driver
            continue
        samples.append(now - payload["t_ns"])
    end_ns = mono_ns()
    final = _publisher_final(sent, start_ns, end_ns, cpu0, lambda: timeouts)
    final.update(answered=len(samples), wrong_replies=wrong, samples=sorted(samples))
    link.send(("final", final))
    await link.wait_stop()


def report_unsupported(link: BlockingLink | AsyncLink, reason: str) -> None:
    """Tell the parent this peer cannot do what the run needs, and why (in
    place of "ready"); the caller then waits for "stop"."""
    link.send((UNSUPPORTED, {"reason": reason}))


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
    share: bool = False,
) -> None:
    """Run *consume* from "start" until the run is drained; report; wait for "stop".

    *accounting*, for a transport that counts what it drops, returns
    ``(dropped, queued)``: the run is complete once received + dropped
    reaches the number published and nothing is queued. *share*: this is a
    queue-group member, which gets a share of what was published; it ends
    once quiet (see the module docstring).
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
        end = await _until_drained(record, consumer, expected, deadline, accounting, share)
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
    share: bool = False,
) -> str:
    mono = time.monotonic
    last_count, last_change = -1, mono()
    while True:
        if consumer.done():
            _ended_early(consumer, record)
        now = mono()
        queued = 0
        if accounting is not None:
            dropped, queued = accounting()
            if not share and record.count + dropped >= expected and queued == 0:
                return "complete"
        elif not share and record.count >= expected:
            return "complete"
        if record.count != last_count:
            last_count, last_change = record.count, now
        elif (
            (accounting is None or share or consumer.done())
            and queued == 0
            and now - last_change >= QUIET_S
        ):
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
