"""Child-side behaviours for the fault-injection tests (run by
:class:`shmbus_tools.children.Agent`).

Same conventions as :mod:`agents`: every function takes its link to the
parent first, connects its own :class:`~shmbus.ShmBus`, sends ``"ready"`` once
it is connected (and subscribed, for a subscriber), and answers the parent's
small messages.

Events
------
Every event published here carries :func:`make_payload`: ``{"pub":
publisher id, "n": that publisher's counter, "pad": "x" * pad_length(pub,
n)}``. Counters start at 0 and go up by one per publish, so a subscriber
can check, per publisher, order, duplicates, losses and the payload itself
(:class:`Tally`). One publisher id is one bus instance (one ring).

Timing
------
Publishers time every ``publish_nowait`` call with ``time.monotonic()`` (one
clock for every process of the host), and report their slowest calls with
the instant they started, so that the parent can tell a call that waited for
another process from one that was itself stopped.

Crash points
------------
A *doomed* publisher stops at one point of its write path, on its chosen
publish, tells the parent ``("dying", point)`` and blocks until it is
SIGKILLed there (or, with ``stop=True``, sends ``("stopping", point)`` and
SIGSTOPs itself there):

===============  ===========================================================
``before-ring``  first publish, before its ring exists (wraps
                 ``directory.install_ring``)
``installing``   ring file created, directory entry still INSTALLING (wraps
                 ``directory.create_file``)
``installed``    ring installed (entry LIVE), no record written yet (wraps
                 ``directory.install_ring``)
``mid-record``   record written, not committed
                 (``ShmBus._critical_section_hook("mid-record")``)
``committed``    ``RingWriter.append`` returned (the record is committed),
                 the publish has not returned: no wake-up sent yet
===============  ===========================================================

Only ``mid-record`` has a documented hook; the others wrap module-level
names of :mod:`shmbus._core.directory` and a method of :class:`~shmbus._core.ring.RingWriter`,
so they follow those names if the core renames them.

Signal handlers that raise
--------------------------
:func:`alarmed_worker` is a process with a SIGALRM timeout helper whose
handler raises :class:`Alarm` every 0.7 ms, at whatever bytecode runs then;
:func:`interrupted_once` raises it once, deterministically, at a chosen point
of ``connect()`` or ``close()`` (:data:`INTERRUPTIONS`, wrapping names of the
core the same way).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import mmap
import os
import random
import signal
import time
from collections.abc import Callable
from typing import Any

from shmbus_tools.children import EOF, AsyncLink, BlockingLink

import shmbus._core.directory
from shmbus import ShmBus
from shmbus._core.inspection import read_bus
from shmbus._core.ring import RingWriter
from shmbus._core.shmfiles import bus_file_paths

#: Where a doomed publisher can die, in the order its write path passes them.
CRASH_POINTS = ("before-ring", "installing", "installed", "mid-record", "committed")
#: Crash points passed only by an instance's first publish (it installs its ring).
FIRST_PUBLISH_POINTS = frozenset({"before-ring", "installing", "installed"})
#: Crash points at which the dying publish's record is already committed.
COMMITTED_AT = frozenset({"committed"})

#: Payload filler bounds: ``pad_length`` is between 0 and this.
PAD_MAX = 40
_TOPIC = "fault.ev"
_SLOW_CALLS_KEPT = 500
_CHECK_PIPE_EVERY = 16


# ─── Payloads ────────────────────────────────────────────────────────────────


def pad_length(pub: int, n: int) -> int:
    """Filler length of event *n* of publisher *pub*: varies, so records
    differ in size and wrap the ring at changing offsets."""
    return (n * 7 + pub * 3) % (PAD_MAX + 1)


def make_payload(pub: int, n: int) -> dict[str, Any]:
    return {"pub": pub, "n": n, "pad": "x" * pad_length(pub, n)}


def payload_problem(payload: Any) -> str | None:
    """None if *payload* is exactly what :func:`make_payload` makes, else why not."""
    if not isinstance(payload, dict) or set(payload) != {"pub", "n", "pad"}:
        return f"unexpected payload {payload!r:.200}"
    pub, n, pad = payload["pub"], payload["n"], payload["pad"]
    if not isinstance(pub, int) or not isinstance(n, int) or n < 0:
        return f"bad pub/n in {payload!r:.200}"
    if pad != "x" * pad_length(pub, n):
        return f"bad pad in {payload!r:.200}"
    return None


class Tally:
    """What a subscriber received, per publisher, compactly: runs of
    consecutive counters ``[first, end)``. A counter at or below the last one
    of its publisher (a duplicate, or out of order) is not added but kept
    in :attr:`disorder`."""

    def __init__(self) -> None:
        self.runs: dict[int, list[list[int]]] = {}
        self.disorder: dict[int, list[tuple[int, int]]] = {}
        self.invalid: list[str] = []
        self.delivered = 0

    def add(self, payload: Any) -> None:
        self.delivered += 1
        problem = payload_problem(payload)
        if problem is not None:
            if len(self.invalid) < 10:
                self.invalid.append(problem)
            return
        pub, n = payload["pub"], payload["n"]
        runs = self.runs.setdefault(pub, [])
        if runs and runs[-1][1] == n:
            runs[-1][1] = n + 1
        elif runs and n < runs[-1][1]:
            bad = self.disorder.setdefault(pub, [])
            if len(bad) < 10:
                bad.append((runs[-1][1] - 1, n))
        else:
            runs.append([n, n + 1])

    def report(self) -> dict[str, Any]:
        return {
            "runs": {pub: [tuple(run) for run in runs] for pub, runs in self.runs.items()},
            "disorder": dict(self.disorder),
            "invalid": list(self.invalid),
            "delivered": self.delivered,
        }


class Counters:
    """Shared 8-byte counters in a small file (not in ``/dev/shm``): a child
    stores, the parent reads after the child is dead."""

    def __init__(self, path: str, count: int = 0) -> None:
        if count:
            with open(path, "wb") as f:
                f.truncate(8 * count)
        with open(path, "r+b") as f:
            self._mm = mmap.mmap(f.fileno(), 0)
        self.words = memoryview(self._mm).cast("q")

    def __getitem__(self, index: int) -> int:
        return int(self.words[index])

    def __setitem__(self, index: int, value: int) -> None:
        self.words[index] = value

    def close(self) -> None:
        self.words.release()
        self._mm.close()


def _block_forever() -> None:
    while True:
        time.sleep(3600)


def _noop_handler(counter: list[int]) -> Callable[[int, Any], None]:
    def handler(_signum: int, _frame: Any) -> None:
        counter[0] += 1

    return handler


# ─── Subscribers ─────────────────────────────────────────────────────────────


def tally_subscriber(
    link: BlockingLink,
    name: str,
    *,
    pattern: str = ">",
    bus_kwargs: dict[str, Any] | None = None,
    lazy: bool = False,
    noop_signal: int | None = None,
) -> None:
    """Subscribe to *pattern*, send ``"ready"`` and consume continuously into
    a :class:`Tally`. With *lazy*, send ``"connected"`` first and subscribe
    only on ``"subscribe"``. With *noop_signal*, a handler that only counts
    is installed for that signal first. Answers:

    * ``("tally", expected, quiet, timeout)``: once delivered + dropped
      reaches *expected* and no event came for *quiet* seconds (or *timeout*
      passed), send the tally's report plus ``"dropped"``, ``"evicted"``,
      ``"lost"``, ``"signals"`` and ``"bus"`` (stats);
    * ``"close"``: close the bus, send ``"closed"``.
    """
    signals = [0]
    if noop_signal is not None:
        signal.signal(noop_signal, _noop_handler(signals))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        bus = ShmBus(name, **(bus_kwargs or {}))
        await bus.connect()
        inbox = AsyncLink(link)
        tally = Tally()
        last_event = loop.time()
        try:
            if lazy:
                link.send("connected")
                await inbox.expect("subscribe")
            sub = bus.subscribe(pattern)

            async def consume() -> None:
                nonlocal last_event
                async for event in sub:
                    tally.add(event.payload)
                    last_event = loop.time()

            consumer = asyncio.ensure_future(consume())
            link.send("ready")
            while True:
                message = await inbox.expect("tally", "close", EOF)
                if message in ("close", EOF):
                    break
                _, expected, quiet, timeout = message
                deadline = loop.time() + timeout
                while loop.time() < deadline and (
                    tally.delivered + sub.dropped < expected or loop.time() - last_event < quiet
                ):
                    if consumer.done():
                        consumer.result()  # raises what ended it
                        raise RuntimeError("the subscription ended")
                    await asyncio.sleep(0.01)
                link.send(
                    {
                        **tally.report(),
                        "dropped": sub.dropped,
                        "evicted": sub.evicted,
                        "lost": sub.lost,
                        "signals": signals[0],
                        "bus": dict(bus.stats()),
                    }
                )
            inbox.close()
            consumer.cancel()
        finally:
            await bus.close()
        link.send("closed")

    asyncio.run(main())


# ─── Publishers ──────────────────────────────────────────────────────────────


def steady_publisher(
    link: BlockingLink,
    name: str,
    pub_id: int,
    *,
    bus_kwargs: dict[str, Any] | None = None,
    count: int | None = None,
    burst: int = 10,
    pause: float = 0.0,
    progress_at: int | None = None,
    progress: tuple[str, int] | None = None,
    noop_signal: int | None = None,
    slow: float = 0.005,
) -> None:
    """Connect (no event loop: ``publish_nowait`` from plain code), send
    ``"ready"``, wait for ``"go"``, then publish :func:`make_payload` events
    in bursts of *burst*, sleeping *pause* seconds after each, until
    ``"stop"`` arrives (looked for after every burst) or *count* events are
    out. Then send the report and close on ``"close"`` (sending
    ``"closed"``); a ``"stop"`` that comes after the report is ignored.

    Every call is timed: the report has ``"published"`` (calls that
    returned), ``"max_call"`` (seconds), ``"slow_calls"`` (``(start,
    seconds)`` of calls over *slow* seconds), ``"errors"`` (calls that
    raised, and the first one's repr; publishing stops at the first),
    ``"signals"`` and ``"bus"`` (stats).

    *progress_at*: send ``"progress"`` once that many events are out.
    *progress*: ``(path, index)`` of a :class:`Counters` file where word
    *index* is set to the number of calls that returned, after each one.
    *noop_signal*: install a handler that only counts, for that signal.
    """
    signals = [0]
    if noop_signal is not None:
        signal.signal(noop_signal, _noop_handler(signals))
    counters = Counters(progress[0]) if progress is not None else None
    slot = progress[1] if progress is not None else 0
    bus = ShmBus(name, **(bus_kwargs or {}))
    bus.connect_sync(30.0)
    try:
        link.send("ready")
        link.expect("go")
        published = 0
        max_call = 0.0
        slow_calls: list[tuple[float, float]] = []
        errors: list[str] = []
        monotonic = time.monotonic
        stopped = False
        while not stopped and not errors:
            for _ in range(burst):
                payload = make_payload(pub_id, published)
                start = monotonic()
                try:
                    bus.publish_nowait(_TOPIC, payload)
                except Exception as exc:
                    errors.append(repr(exc))
                    break
                took = monotonic() - start
                published += 1
                if counters is not None:
                    counters[slot] = published
                if took > max_call:
                    max_call = took
                if took > slow and len(slow_calls) < _SLOW_CALLS_KEPT:
                    slow_calls.append((start, took))
                if published == progress_at:
                    link.send("progress")
                if published == count:
                    stopped = True
                    break
            if link.poll():
                link.expect("stop")
                stopped = True
            elif pause:
                time.sleep(pause)
        link.send(
            {
                "published": published,
                "max_call": max_call,
                "slow_calls": slow_calls,
                "errors": len(errors),
                "first_error": errors[0] if errors else None,
                "signals": signals[0],
                "bus": dict(bus.stats()),
            }
        )
        while link.expect("stop", "close") != "close":
            pass
    finally:
        bus.close_sync()
        if counters is not None:
            counters.close()
    link.send("closed")


class _Armed:
    """Whether the crash point fires on the next pass (one publish only)."""

    def __init__(self) -> None:
        self.on = False


def _install_crash_point(point: str, armed: _Armed, at_point: Callable[[], None]) -> None:
    if point == "mid-record":

        def hook(stage: str) -> None:
            if armed.on and stage == point:
                at_point()

        ShmBus._critical_section_hook = hook
    elif point in ("before-ring", "installed"):
        install_ring = shmbus._core.directory.install_ring

        def install_then_stop(*args: Any, **kwargs: Any) -> Any:
            if armed.on and point == "before-ring":
                at_point()
            ring = install_ring(*args, **kwargs)
            if armed.on and point == "installed":
                at_point()
            return ring

        shmbus._core.directory.install_ring = install_then_stop  # type: ignore[assignment]
    elif point == "installing":
        create_file = shmbus._core.directory.create_file

        def create_then_stop(*args: Any, **kwargs: Any) -> int:
            fd = create_file(*args, **kwargs)
            if armed.on:
                at_point()
            return fd

        shmbus._core.directory.create_file = create_then_stop  # type: ignore[assignment]
    elif point == "committed":
        append = RingWriter.append

        def append_then_stop(
            self: RingWriter, topic: bytes, body: bytes, checksum: int, assignments: bytes = b""
        ) -> int:
            seq = append(self, topic, body, checksum, assignments)
            if armed.on:
                at_point()
            return seq

        RingWriter.append = append_then_stop  # type: ignore[method-assign]
    else:
        raise ValueError(f"unknown crash point {point!r}; known: {CRASH_POINTS}")


def doomed_publisher(
    link: BlockingLink,
    name: str,
    pub_id: int,
    point: str,
    *,
    before: int = 0,
    stop: bool = False,
    bus_kwargs: dict[str, Any] | None = None,
) -> None:
    """Connect, send ``"ready"``, wait for ``"go"``, publish *before* events
    normally, then publish event number *before*, which stops at crash point
    *point*: send ``("dying", point)`` and block until killed.

    With *stop*, send ``("stopping", point)`` and SIGSTOP itself there
    instead; once continued, finish that publish, send ``{"published":
    before + 1, "bus": stats}`` and close on ``"close"`` (sending
    ``"closed"``)."""
    if point in FIRST_PUBLISH_POINTS and before:
        raise ValueError(f"crash point {point!r} is on an instance's first publish: before=0")
    armed = _Armed()

    def at_point() -> None:
        armed.on = False
        if stop:
            link.send(("stopping", point))
            os.kill(os.getpid(), signal.SIGSTOP)
            return
        link.send(("dying", point))
        _block_forever()

    bus = ShmBus(name, **(bus_kwargs or {}))
    bus.connect_sync(30.0)
    try:
        _install_crash_point(point, armed, at_point)
        link.send("ready")
        link.expect("go")
        for n in range(before):
            bus.publish_nowait(_TOPIC, make_payload(pub_id, n))
        armed.on = True
        bus.publish_nowait(_TOPIC, make_payload(pub_id, before))
        if not stop:
            raise RuntimeError(f"the publish did not stop at crash point {point!r}")
        if armed.on:
            raise RuntimeError(f"the publish never passed crash point {point!r}")
        link.send({"published": before + 1, "bus": dict(bus.stats())})
        link.expect("close")
    finally:
        bus.close_sync()
    link.send("closed")


# ─── A process whose signal handler raises ───────────────────────────────────


class Alarm(Exception):
    """What the SIGALRM handler of :func:`alarmed_worker` raises."""


#: Whether the SIGALRM handler raises now: set by :func:`_attempt` around
#: its call, cleared by the handler when it raises (so it raises once per
#: arming) and by :func:`_attempt` when the call is over.
_armed = [False]


def _raise_alarm(_signum: int, _frame: Any) -> None:
    if _armed[0]:
        _armed[0] = False
        raise Alarm


_ALARM = {signal.SIGALRM}


def _attempt(call: Callable[..., object], *args: Any) -> bool:
    """Run ``call(*args)`` with SIGALRM unblocked; True if it returned, False
    if an :class:`Alarm` interrupted it (or landed right after it returned).

    SIGALRM is blocked everywhere else, and the handler raises only while
    this function is armed and at most once per arming, so the exception can
    only land inside *call* or in this function's own frame: an Alarm that
    interrupts the re-blocking itself cannot leave a later one free to land
    in the caller's code."""
    done = False
    try:
        _armed[0] = True
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _ALARM)
            call(*args)
            done = True
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, _ALARM)
            # A SIGALRM the kernel delivered before the block runs its Python
            # handler at the next check of the interpreter, which may come
            # after this function returned; a call makes that check here.
            _handle_pending_signals()
            _armed[0] = False
    except Alarm:
        pass
    return done


def _handle_pending_signals() -> None:
    """Nothing: entering a Python function runs pending signal handlers."""


def alarmed_worker(
    link: BlockingLink,
    name: str,
    pub_base: int,
    *,
    seconds: float = 2.0,
    interval: float = 0.0007,
    subscribe_every: float = 0.01,
    reopen_every: float = 0.1,
    per_instance: int = 8000,
    after: int = 100,
    bus_kwargs: dict[str, Any] | None = None,
) -> None:
    """A process using a SIGALRM-based timeout helper whose handler raises.

    Connect, send ``"ready"``, wait for ``"go"``. Then, for *seconds*, with
    an interval timer firing SIGALRM every *interval* s and a handler that
    raises :class:`Alarm`, caught around each call (see :func:`_attempt`):
    publish :func:`make_payload` events with ``publish_nowait``; every
    *subscribe_every* s subscribe to ``>`` and close that subscription; every
    *reopen_every* s, or after *per_instance* publishes, close the bus
    instance and connect a new one (publisher id ``pub_base * 1000 + k`` for
    the k-th instance, counters from 0). (Give it rings that hold
    *per_instance* events: then no reader can be lapped, however far behind.)

    Then the timer stops, and the process checks it still works: it
    publishes *after* more events on its last instance; then, on that
    instance and on a new one, subscribes, publishes one more event and
    waits (2 s at most) for it to arrive. Report:

    * ``"attempts"``: publisher id -> publish calls made (counters 0..n-1);
    * ``"maybe"``: publisher id -> counters whose publish was interrupted
      (committed or not: nobody can know);
    * ``"interrupted"``: how many calls of each kind an Alarm interrupted;
      ``"alarms"``: how many fired; ``"calls"``: calls of each kind;
    * ``"after"``: ``{"published": n, "same_instance_receives": bool,
      "new_instance_receives": bool, "error": repr or None}``, and ``"bus"``:
      the last instance's stats.
    """
    kwargs = bus_kwargs or {}
    # No thread may run with SIGALRM unblocked: it would take the signal and
    # the handler would then run in this thread at any point.
    signal.pthread_sigmask(signal.SIG_BLOCK, _ALARM)
    alarms = [0]

    def handler(signum: int, frame: Any) -> None:
        alarms[0] += 1
        _raise_alarm(signum, frame)

    async def main() -> dict[str, Any]:
        index = 0
        bus = ShmBus(name, **kwargs)
        bus.connect_sync(30.0)
        pub = pub_base * 1000
        attempts: dict[int, int] = {pub: 0}
        maybe: dict[int, list[int]] = {pub: []}
        calls = dict.fromkeys(("publish", "subscribe", "unsubscribe", "close", "connect"), 0)
        interrupted = dict.fromkeys(calls, 0)
        link.send("ready")
        link.expect("go")
        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, interval, interval)
        try:
            now = time.monotonic()
            end = now + seconds
            next_subscribe = now + subscribe_every
            next_reopen = now + reopen_every
            while now < end:
                if now >= next_reopen or attempts[pub] >= per_instance:
                    next_reopen = now + reopen_every
                    calls["close"] += 1
                    if not _attempt(bus.close_sync):
                        interrupted["close"] += 1
                    index += 1
                    bus = ShmBus(name, **kwargs)
                    pub = pub_base * 1000 + index
                    attempts[pub] = 0
                    maybe[pub] = []
                    while True:  # a process retries its connect when it times out
                        calls["connect"] += 1
                        if _attempt(bus.connect_sync):
                            break
                        interrupted["connect"] += 1
                elif now >= next_subscribe:
                    next_subscribe = now + subscribe_every
                    subs: list[Any] = []
                    calls["subscribe"] += 1
                    if not _attempt(_subscribe_into, bus, subs):
                        interrupted["subscribe"] += 1
                    if subs:
                        calls["unsubscribe"] += 1
                        if not _attempt(_run_now, subs[0].aclose):
                            interrupted["unsubscribe"] += 1
                else:
                    n = attempts[pub]
                    attempts[pub] = n + 1
                    calls["publish"] += 1
                    payload = make_payload(pub, n)
                    if not _attempt(bus.publish_nowait, _TOPIC, payload):
                        interrupted["publish"] += 1
                        maybe[pub].append(n)
                now = time.monotonic()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
            signal.signal(signal.SIGALRM, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _ALARM)
        after_report: dict[str, Any] = {
            "published": 0,
            "same_instance_receives": None,
            "new_instance_receives": None,
            "error": None,
        }
        try:
            for _ in range(after):
                n = attempts[pub]
                bus.publish_nowait(_TOPIC, make_payload(pub, n))
                attempts[pub] = n + 1
                after_report["published"] += 1
            after_report["same_instance_receives"] = await _receives_own(bus, pub_base, 1)
            fresh = ShmBus(name, **kwargs)
            await fresh.connect()
            try:
                after_report["new_instance_receives"] = await _receives_own(fresh, pub_base, 2)
            finally:
                await fresh.close()
        except Exception as exc:
            after_report["error"] = repr(exc)
        stats = dict(bus.stats())
        bus.close_sync()
        return {
            "attempts": attempts,
            "maybe": maybe,
            "interrupted": interrupted,
            "calls": calls,
            "alarms": alarms[0],
            "after": after_report,
            "bus": stats,
        }

    report = asyncio.run(main())
    link.send(report)
    link.expect("close")
    link.send("closed")


async def _receives_own(bus: ShmBus, pub: int, n: int) -> bool:
    """Whether a new subscription of *bus* receives, within 2 s, an event
    *bus* itself publishes."""
    async with bus.subscribe(f"{_TOPIC}.own") as sub:
        bus.publish_nowait(f"{_TOPIC}.own", make_payload(pub, n))
        try:
            event = await asyncio.wait_for(anext(aiter(sub)), 2.0)
        except TimeoutError:
            return False
        return bool(event.payload == make_payload(pub, n))


def _subscribe_into(bus: ShmBus, subs: list[Any]) -> None:
    subs.append(bus.subscribe(">"))


def _run_now(make: Callable[[], Any]) -> None:
    """Run the coroutine *make* returns, which never suspends, to its end,
    without the event loop."""
    coroutine = make()
    try:
        coroutine.send(None)
    except StopIteration:
        return
    coroutine.close()
    raise RuntimeError("the coroutine suspended")


#: Where :func:`interrupted_once` raises, once: (the call interrupted, what
#: raises inside it) -> (module, attribute) to wrap.
INTERRUPTIONS = {
    ("connect", "slot claim"): ("shmbus._core.segment", "Segment._claim_slot"),
    ("connect", "waker setup"): ("shmbus.shm", "Waker"),
    ("close", "reader stop"): ("shmbus._core.reader", "BusReader.stop"),
    ("close", "ring retirement"): ("shmbus._core.directory", "retire_ring"),
}


def _raise_once_in(module_name: str, attribute: str) -> None:
    """Wrap *attribute* of *module_name* (``"Class.method"`` or a name) so
    that its next call raises :class:`Alarm` first, as a signal handler that
    raises would at that moment; later calls go through."""
    owner: Any = importlib.import_module(module_name)
    *path, leaf = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, leaf)

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        setattr(owner, leaf, original)
        raise Alarm

    setattr(owner, leaf, interrupted)


def interrupted_once(
    link: BlockingLink,
    name: str,
    call: str,
    where: str,
    *,
    bus_kwargs: dict[str, Any] | None = None,
) -> None:
    """Connect, publish one event and subscribe (so the instance has a ring
    and a reader), and close; the one *call* (``"connect"`` or ``"close"``)
    is interrupted once by an :class:`Alarm` raised at *where* (see
    :data:`INTERRUPTIONS`), caught, and the call retried, as a process with
    a raising SIGALRM timeout would. Then send ``"closed"`` and wait, alive,
    for ``"exit"``."""
    module_name, attribute = INTERRUPTIONS[(call, where)]

    async def main() -> None:
        bus = ShmBus(name, **(bus_kwargs or {}))
        if call == "connect":
            _raise_once_in(module_name, attribute)
            with contextlib.suppress(Alarm):
                await bus.connect()
        await bus.connect()
        bus.publish_nowait(_TOPIC, make_payload(1, 0))
        bus.subscribe(">")
        if call == "close":
            _raise_once_in(module_name, attribute)
            with contextlib.suppress(Alarm):
                await bus.close()
        await bus.close()

    asyncio.run(main())
    link.send("closed")
    link.expect("exit")


# ─── Event-loop lag ──────────────────────────────────────────────────────────


def lag_probe(
    link: BlockingLink,
    name: str,
    pub_id: int,
    *,
    seconds: float = 3.0,
    tick: float = 0.001,
    seed: int = 0,
    bus_kwargs: dict[str, Any] | None = None,
) -> None:
    """An asyncio application on a bus whose other processes misbehave.

    Connect, send ``"ready"``, wait for ``"go"``. Then for *seconds*, a
    ticker task wakes every *tick* s and records how late it woke, while the
    main task loops at random over the async API: ``await bus.publish`` (20
    events), ``subscribe`` (then a few ms of receiving, then ``aclose``),
    and ``close`` followed by a new instance's ``await connect()``. Report
    ``"max_late"`` (seconds), ``"ticks"``, ``"ops"`` (how many of each) and
    ``"blocked"``: the longest time each synchronous call held the loop."""
    rng = random.Random(seed)
    kwargs = bus_kwargs or {}

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        bus = ShmBus(name, **kwargs)
        await bus.connect()
        link.send("ready")
        link.expect("go")  # the loop has nothing else to do yet
        done = False
        max_late = 0.0
        ticks = 0

        async def ticker() -> None:
            nonlocal max_late, ticks
            due = loop.time()
            while not done:
                due += tick
                await asyncio.sleep(max(0.0, due - loop.time()))
                late = loop.time() - due
                ticks += 1
                max_late = max(max_late, late)
                if late > tick:
                    due = loop.time()  # do not try to catch up

        ops = dict.fromkeys(("publish", "subscribe", "close", "connect"), 0)
        blocked = dict.fromkeys(ops, 0.0)

        def held(op: str, start: float) -> None:
            blocked[op] = max(blocked[op], time.perf_counter() - start)

        ticking = asyncio.ensure_future(ticker())
        index = 0
        sent = 0
        end = loop.time() + seconds
        try:
            while loop.time() < end:
                choice = rng.random()
                if choice < 0.7:
                    for _ in range(20):
                        start = time.perf_counter()
                        await bus.publish(_TOPIC, make_payload(pub_id * 1000 + index, sent))
                        held("publish", start)
                        sent += 1
                    ops["publish"] += 1
                elif choice < 0.9:
                    start = time.perf_counter()
                    sub = bus.subscribe(">")
                    held("subscribe", start)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(anext(aiter(sub)), 0.005)
                    await sub.aclose()
                    ops["subscribe"] += 1
                else:
                    start = time.perf_counter()
                    await bus.close()
                    held("close", start)
                    index += 1
                    sent = 0
                    bus = ShmBus(name, **kwargs)
                    start = time.perf_counter()
                    await bus.connect()
                    blocked["connect"] = max(blocked["connect"], time.perf_counter() - start)
                    ops["close"] += 1
                    ops["connect"] += 1
                await asyncio.sleep(0.001)
        finally:
            done = True
            await ticking
            await bus.close()
        return {"max_late": max_late, "ticks": ticks, "ops": ops, "blocked": blocked}

    report = asyncio.run(main())
    link.send(report)
    link.expect("close")
    link.send("closed")


# ─── Memory scribbled on ─────────────────────────────────────────────────────


def scribbler(
    link: BlockingLink,
    path: str,
    *,
    start: int,
    end: int,
    seed: int,
    max_len: int = 16,
    per_ms: int = 4,
) -> None:
    """Map the file *path* (a ring file; without attaching to its bus), send
    ``"ready"``, and after ``"go"`` write random runs of 1 to *max_len*
    random bytes at random offsets in ``[start, end)``, about *per_ms* runs
    per millisecond, until ``"stop"``; then send ``{"writes": n}``."""
    rng = random.Random(seed)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        link.send("ready")
        link.expect("go")
        writes = 0
        while not link.poll():
            for _ in range(per_ms):
                size = rng.randint(1, max_len)
                offset = rng.randrange(start, end - size)
                mm[offset : offset + size] = rng.randbytes(size)
                writes += 1
            time.sleep(0.001)
        link.expect("stop")
    link.send({"writes": writes})


# ─── Removal and fork ────────────────────────────────────────────────────────


def stalled_closer(
    link: BlockingLink, name: str, *, bus_kwargs: dict[str, Any] | None = None
) -> None:
    """Connect, send ``"attached"``; on ``"close"``, close the bus as its
    last instance, but stop inside the removal of its files right after the
    first file other than the segment is unlinked (the segment, removed
    last, is still there): send ``"removing"`` and block until killed.

    Wraps ``os.unlink``. The closer neither publishes nor subscribes, so it
    has no ring or FIFO of its own to unlink before that removal: the parent
    must leave a file behind for it (a killed subscriber's FIFO, say)."""

    async def main() -> None:
        bus = ShmBus(name, **(bus_kwargs or {}))
        await bus.connect()
        unlink = os.unlink
        segment = f"/dev/shm/shmbus.{name}"

        def unlink_then_stop(path: Any, *args: Any, **kwargs: Any) -> None:
            unlink(path, *args, **kwargs)
            if str(path).startswith(segment + ":"):
                link.send("removing")
                _block_forever()

        os.unlink = unlink_then_stop  # type: ignore[assignment]
        link.send("attached")
        link.expect("close")
        await bus.close()
        raise RuntimeError("close() removed no file of the bus but its segment")

    asyncio.run(main())


def _outcome(call: Callable[[], object]) -> dict[str, Any]:
    """What calling *call* did: raised what (and whether it is a
    RuntimeError), or returned."""
    try:
        call()
    except Exception as exc:
        return {
            "raised": type(exc).__name__,
            "runtime_error": isinstance(exc, RuntimeError),
            "message": str(exc),
        }
    return {"raised": None}


def forking_owner(
    link: BlockingLink, name: str, *, bus_kwargs: dict[str, Any] | None = None
) -> None:
    """Connect a bus, subscribe to ``>`` and fork (from plain code: no event
    loop runs at that moment). The fork child tries the inherited instance
    (publish, subscribe, close), then publishes ``child.new`` from a new
    instance, reports on a pipe and waits (alive) until released; it leaves
    with ``os._exit``. The parent then publishes ``parent.after``, collects
    what its subscription received, closes its instance while the child is
    still alive, notes the bus's files, releases the child and sends the
    report."""
    kwargs = bus_kwargs or {}
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    bus = ShmBus(name, **kwargs)

    async def setup() -> Any:
        await bus.connect()
        return bus.subscribe(">")

    sub = loop.run_until_complete(setup())
    report_r, report_w = os.pipe()
    gate_r, gate_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # ── the fork child ──
        code = 1
        try:
            os.close(report_r)
            os.close(gate_w)
            results: dict[str, Any] = {}

            async def child_main() -> None:
                results["publish"] = _outcome(lambda: bus.publish_nowait("child.inherited", {}))
                results["subscribe"] = _outcome(lambda: bus.subscribe(">"))
                try:
                    await bus.close()
                except Exception as exc:
                    results["close"] = {"raised": type(exc).__name__, "message": str(exc)}
                else:
                    results["close"] = {"raised": None}
                fresh = ShmBus(name, **kwargs)
                await fresh.connect()
                await fresh.publish("child.new", {"pid": os.getpid()})
                results["new_bus_stats"] = dict(fresh.stats())
                await fresh.close()

            asyncio.run(child_main())
            os.write(report_w, json.dumps(results).encode())
            os.close(report_w)
            os.read(gate_r, 1)  # stay alive until the parent has closed
            code = 0
        finally:
            os._exit(code)
    # ── the parent ──
    os.close(report_w)
    os.close(gate_r)
    chunks = []
    while chunk := os.read(report_r, 65536):
        chunks.append(chunk)
    os.close(report_r)
    child_results = json.loads(b"".join(chunks) or b"null")

    async def after() -> dict[str, Any]:
        await bus.publish("parent.after", {"pid": os.getpid()})
        received = []
        while len(received) < 2:
            event = await asyncio.wait_for(anext(aiter(sub)), 30)
            received.append(event.topic)
        me = [s for s in read_bus(name).instances if s.pid == os.getpid()]
        report = {
            "received": received,
            "parent_alive_in_read_bus": bool(me) and me[0].alive,
            "parent_stats": dict(bus.stats()),
        }
        await bus.close()
        report["files_after_parent_close"] = bus_file_paths(name)
        return report

    try:
        report = loop.run_until_complete(after())
    finally:
        os.write(gate_w, b"x")
        os.close(gate_w)
        _, status = os.waitpid(pid, 0)
        loop.close()
    report["child"] = child_results
    report["child_exit"] = os.waitstatus_to_exitcode(status)
    link.send(report)
