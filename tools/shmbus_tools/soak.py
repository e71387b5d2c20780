"""Soak test: many processes on one bus for a long time, with faults and
exact books.

``python -m shmbus_tools.soak --minutes N`` (or ``tools/soak``) runs publisher
processes (each one :class:`~shmbus.shm.ShmBus` instance, so one ring) that
publish continuously, events of random sizes up to ``max_event_size``, and
subscriber processes with different patterns (one of them deliberately slow)
on one bus. Meanwhile, if asked:

* ``--kill-every S``: about every *S* seconds (0.5 to 1.5 times *S*, at
  random) a random publisher is SIGKILLed and a new one started. Every other
  kill, the first one first, lands *mid-record* (the publisher stops itself
  through ``ShmBus._critical_section_hook`` after writing a record's bytes
  and before committing it); the others at whatever instruction a SIGSTOP
  finds.
* ``--stop-every S``: about every *S* seconds a random running publisher is
  SIGSTOPped for 0.2 to 2 s, then SIGCONTed. Kills and stops run at once (a
  stopped publisher may be killed).
* ``--stop-subscribers``: subscribers are stopped the same way, on their own
  schedule (``--stop-every``, or 3 s).

The books are exact, per publisher:

* A publisher's *published* count is the number of events committed to its
  ring. A live publisher reports its own count at the end (and checks it
  against its ring). A publisher about to be killed is SIGSTOPped first (a
  stopped process commits nothing more), its ring is read with
  :func:`shmbus._core.inspection.read_bus` (``RingInfo.published``, found by
  ``writer_pid``), and only then is it killed. The count must lie between the
  publishes that returned and one more (the one in flight); for a mid-record
  kill it must equal the publishes that returned (the record was not
  committed). Anything else is a *publisher books error*.
* For every subscription matching every topic:
  ``received + dropped == published`` (summed over all publishers, killed ones
  included), exactly. For one matching a subset: the events missing from each
  publisher's sequence are at most its ``dropped``. A shortfall is an
  *uncounted loss*, which must be 0.
* Duplicates, per-publisher order violations, damaged payloads and events a
  publisher never committed must all be 0; so must publish errors (exceptions
  from ``publish()`` plus ``stats().publish_errors``).
* The rings of killed publishers must be reclaimed (their files removed) by
  the time the last publishers have closed.
* Every publish call is timed. The longest one of a publisher that was not
  stopped during it is reported, in wall time and without the time its
  thread waited for a CPU (``/proc/thread-self/schedstat``): stopping or
  killing one publisher never delays another, so the latter stays at the
  cost of a publish, far below the 0.2 s of the shortest stop, while the wall
  time also shows how busy the machine was.

The test suite runs a short soak through :func:`run_soak`; the tool runs long
ones.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing
import os
import random
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shmbus._checks import (
    check_int,
    check_number,
    check_seconds,
    int_argument,
    number_argument,
)
from shmbus._core.inspection import RingInfo, read_bus
from shmbus.codec import encode_envelope
from shmbus.contract import matches
from shmbus.shm import ShmBus

from .children import EOF, AsyncLink, BlockingLink, Child, stop_all

__all__ = ["SoakConfig", "SoakTally", "SubscriberSpec", "SubscriptionBooks", "main", "run_soak"]

_CTX = multiprocessing.get_context("spawn")
#: Topic kinds; publisher ``p`` publishes event ``s`` on ``soak.p<p>.<kind>``.
_KINDS = "abc"
#: Hang guard for any one exchange with a child process, in seconds.
_EXCHANGE_TIMEOUT = 120.0
#: A subscriber whose books do not balance reports anyway once nothing has
#: come for this long (s): publishers have stopped, more will not come.
_GIVE_UP_QUIET_S = 5.0
#: How long a publisher asked to stop itself mid-record may take to get there.
_SELF_STOP_TIMEOUT = 2.0
#: Publishes at least this long (s) are logged with their start time, so that
#: the parent can tell those a stop explains from those it does not.
_SLOW_PUBLISH_S = 0.001
#: Publishes at least this long (s), not explained by a stop, are counted.
_VERY_SLOW_PUBLISH_S = 0.010
#: Slots of a publisher's slow-publish log (the longest ones are kept).
_SLOW_SLOTS = 512
#: Doubles per slow-publish entry.
_SLOT_WIDTH = 4

# A publisher's shared counters (a RawArray of int64, readable after its death).
_C_RETURNED = 0  # publishes that returned
_C_BYTES = 1  # their payload bytes
_C_ERRORS = 2  # publishes that raised
_C_MAX_SHORT_NS = 3  # longest publish not in the slow log
_C_SLOW = 4  # slow publishes seen (some may have been evicted from the log)
_C_STOP_MID_RECORD = 5  # set by the parent: stop yourself in the next record
_C_STOPPED_MID_RECORD = 6  # set by the publisher just before it does
_COUNTERS = 7


def topic_of(pub: int, seq: int) -> str:
    """The topic of event *seq* of publisher *pub* (known to the checker)."""
    return f"soak.p{pub}.{_KINDS[(seq + pub) % len(_KINDS)]}"


def pad_of(seq: int, size: int) -> str:
    """The payload padding of event *seq* (known to the checker)."""
    return chr(97 + seq % 26) * size


@dataclass(frozen=True)
class SubscriberSpec:
    """One subscriber process: its pattern, queue bound, and how long it
    blocks its event loop per event (0: as fast as it can)."""

    pattern: str
    queue_size: int = 1024
    slow_s: float = 0.0


DEFAULT_SUBSCRIBERS = (
    SubscriberSpec(">"),
    SubscriberSpec("soak.*.a"),
    SubscriberSpec("soak.>", queue_size=256, slow_s=0.001),
)


@dataclass(frozen=True)
class SoakConfig:
    """What to run. ``rate`` is events/s per publisher (0: unpaced); the
    fault periods are in seconds (0: no such fault)."""

    name: str = field(default_factory=lambda: f"soak-{os.getpid()}")
    seconds: float = 20.0
    publishers: int = 4
    subscribers: tuple[SubscriberSpec, ...] = DEFAULT_SUBSCRIBERS
    capacity: int = 1 << 20
    max_event_size: int = 16 * 1024
    rate: float = 1500.0
    kill_every_s: float = 0.0
    stop_every_s: float = 0.0
    stop_min_s: float = 0.2
    stop_max_s: float = 2.0
    stop_subscribers: bool = False
    seed: int = field(default_factory=lambda: random.randrange(1 << 30))

    def __post_init__(self) -> None:
        check_seconds("seconds", self.seconds, above=True)
        check_int("publishers", self.publishers, minimum=1)
        check_number("rate", self.rate, unit="events/s")
        for name in ("kill_every_s", "stop_every_s", "stop_min_s"):
            check_seconds(name, getattr(self, name))
        check_seconds("stop_max_s", self.stop_max_s, minimum=self.stop_min_s)


@dataclass
class SubscriptionBooks:
    """What one subscription received, and what it should have."""

    pattern: str
    slow: bool
    #: The pattern matches every topic published: received + dropped must
    #: equal the events published exactly.
    matches_everything: bool
    received: int
    dropped: int
    corrupt: int
    lapped: int
    #: Events published that the pattern matches.
    expected: int
    #: Events of ``expected`` never received (each publisher's sequence).
    missing: int
    duplicates: int
    order_violations: int
    bad_payloads: int
    #: Publishers it got an event from that they never committed (a sequence
    #: number at or past their count, or an unknown publisher).
    phantoms: int
    #: Matches everything: events published neither received nor dropped;
    #: else: events missing beyond the ``dropped`` count.
    uncounted: int
    #: Matches everything: received + dropped beyond the events published.
    overcounted: int


@dataclass
class SoakTally:
    """The books of one soak run."""

    name: str
    seed: int
    seconds: float
    publishers: int
    subscribers: int
    #: Events committed to the publishers' rings (killed ones included).
    published: int
    bytes_published: int
    delivered: int
    dropped: int
    corrupt: int
    lapped: int
    uncounted: int
    overcounted: int
    duplicates: int
    order_violations: int
    bad_payloads: int
    phantoms: int
    publish_errors: int
    #: Publishers whose count did not fit what their publish calls returned.
    publisher_books_errors: int
    publisher_kills: int
    #: Kills of a publisher stopped between a record's bytes and its commit.
    kills_mid_record: int
    #: Kills of a publisher that a stop fault had already stopped.
    kills_while_stopped: int
    publisher_stops: int
    subscriber_stops: int
    #: Publish calls timed, and the longest one no stop of its own
    #: publisher explains (seconds); those of at least 10 ms among them.
    publishes_timed: int
    max_publish_s: float
    very_slow_publishes: int
    #: The longest such publish not counting the time its thread waited for
    #: a CPU (runnable, not running: the machine was busy). What remains is
    #: time working or blocked: what another process could cause.
    max_publish_not_runnable_s: float
    #: The longest of those while another publisher was stopped (or being
    #: killed); 0.0 if none took 1 ms or more.
    max_publish_during_other_stops_s: float
    #: Ring files of killed publishers, and how many of them were removed.
    killed_rings: int
    rings_reclaimed: int
    subscriptions: list[SubscriptionBooks]
    #: Every fault, in order: (seconds since start, what, details).
    faults: list[tuple[float, str, str]] = field(default_factory=list)
    #: The slowest publishes no stop of their own publisher explains:
    #: (seconds since start, ms, ms of it on a CPU (approximate: the kernel
    #: accounts it per tick), ms of it waiting for a CPU, publisher, another
    #: publisher was stopped meanwhile).
    slowest_publishes: list[tuple[float, float, float, float, int, bool]] = field(
        default_factory=list
    )

    @property
    def ok(self) -> bool:
        return (
            self.uncounted == 0
            and self.overcounted == 0
            and self.duplicates == 0
            and self.order_violations == 0
            and self.bad_payloads == 0
            and self.phantoms == 0
            and self.publish_errors == 0
            and self.publisher_books_errors == 0
            and self.rings_reclaimed == self.killed_rings
        )

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["ok"] = self.ok
        return data

    def render(self) -> str:
        lines = [
            f"soak of bus {self.name!r} (seed {self.seed}): {self.seconds:.0f} s, "
            f"{self.publishers} publishers, {self.subscribers} subscribers",
            f"  events published      {self.published:>12,}   "
            f"({self.bytes_published / 2**20:,.1f} MiB of payload)",
            f"  events delivered      {self.delivered:>12,}   (over all subscriptions)",
            f"  events dropped        {self.dropped:>12,}   "
            f"(counted: queue overflow, lapped; {self.lapped:,} lapped records)",
            f"  UNCOUNTED LOSSES      {self.uncounted:>12,}   (must be 0; "
            f"{self.overcounted:,} over-counted)",
            f"  duplicates            {self.duplicates:>12,}",
            f"  order violations      {self.order_violations:>12,}",
            f"  bad payloads          {self.bad_payloads:>12,}   "
            f"({self.phantoms:,} never published, {self.corrupt:,} corrupt records)",
            f"  publisher kills       {self.publisher_kills:>12,}   "
            f"({self.kills_mid_record:,} mid-record, {self.kills_while_stopped:,} "
            "while stopped; replaced)",
            f"  publisher stops       {self.publisher_stops:>12,}   "
            f"(SIGSTOP 0.2-2 s; {self.subscriber_stops:,} subscriber stops)",
            f"  publish errors        {self.publish_errors:>12,}   "
            f"({self.publisher_books_errors:,} publisher books errors)",
            f"  max single publish    {self.max_publish_s * 1e3:>12,.2f}   ms, not stopped "
            f"({self.publishes_timed:,} timed, {self.very_slow_publishes:,} of 10 ms or more)",
            f"    less CPU waits      {self.max_publish_not_runnable_s * 1e3:>12,.2f}   ms "
            "(time working or blocked: what another process could cause)",
            f"    while others stopped{self.max_publish_during_other_stops_s * 1e3:>12,.2f}   ms "
            "(0: none took 1 ms)",
            f"  rings reclaimed       {self.rings_reclaimed:>12,}   "
            f"(of {self.killed_rings:,} rings of killed publishers)",
        ]
        for books in self.subscriptions:
            lines.append(
                f"  sub {books.pattern!r:<12} {'slow' if books.slow else 'fast'}: "
                f"received {books.received:,} + dropped {books.dropped:,} "
                f"(lapped {books.lapped:,}) for {books.expected:,} expected; "
                f"missing {books.missing:,}, uncounted {books.uncounted:,}"
            )
        lines.append("  RESULT: " + ("OK" if self.ok else "FAILED"))
        return "\n".join(lines)


# ─── Child processes ────────────────────────────────────────────────────────


class _SlowLog:
    """A publisher's log of its slow publishes in shared memory: the first
    ``_SLOW_SLOTS``, then the longest ones. An entry is (start, wall time,
    time on a CPU, time waiting for a CPU), in seconds."""

    def __init__(self, counters: Any, slots: Any) -> None:
        self._counters = counters
        self._slots = slots

    def add(self, start: float, took: float, on_cpu: float, runnable: float) -> None:
        slots = self._slots
        n = self._counters[_C_SLOW]
        if n < _SLOW_SLOTS:
            index = n
        else:
            index = min(range(_SLOW_SLOTS), key=lambda i: slots[_SLOT_WIDTH * i + 1])
            if slots[_SLOT_WIDTH * index + 1] >= took:
                self._counters[_C_SLOW] = n + 1
                return
        base = _SLOT_WIDTH * index
        slots[base + 1] = 0.0  # an entry with no wall time is ignored
        slots[base] = start
        slots[base + 2] = on_cpu
        slots[base + 3] = runnable
        slots[base + 1] = took
        self._counters[_C_SLOW] = n + 1


def _slow_entries(counters: Any, slots: Any) -> list[tuple[float, float, float, float]]:
    n = min(int(counters[_C_SLOW]), _SLOW_SLOTS)
    return [
        (slots[base], slots[base + 1], slots[base + 2], slots[base + 3])
        for base in range(0, _SLOT_WIDTH * n, _SLOT_WIDTH)
        if slots[base + 1] > 0
    ]


class _SchedClock:
    """This thread's time on a CPU and time spent runnable but waiting for
    one, in ns (``/proc/thread-self/schedstat``; zeros where it is missing).
    Their growth during a publish tells CPU starvation (the machine is busy)
    from a publish that spun or waited for something."""

    def __init__(self) -> None:
        try:
            self._fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._fd = -1

    def read(self) -> tuple[int, int]:
        if self._fd < 0:
            return 0, 0
        fields = os.pread(self._fd, 96, 0).split()
        return int(fields[0]), int(fields[1])


def _own_ring(name: str, pid: int) -> RingInfo | None:
    """The ring bus *name*'s directory says *pid* writes (None: none yet)."""
    rings = [ring for ring in read_bus(name).rings if ring.writer_pid == pid]
    live = [ring for ring in rings if ring.state in ("live", "dead", "installing")]
    if len(live) > 1:
        raise RuntimeError(f"bus {name!r}: pid {pid} writes {len(live)} rings: {live}")
    return live[0] if live else None


def _publisher_main(
    link: BlockingLink,
    config: SoakConfig,
    pub: int,
    counters: Any,
    slots: Any,
    seed: int,
) -> None:
    """Publish until ``"stop"``, then report ``{"published", "bytes",
    "ring_published", "publish_errors"}``. *counters* (shared) count as it
    goes, for the parent to read if it kills us."""
    rng = random.Random(seed)
    slow_log = _SlowLog(counters, slots)

    def stop_mid_record(_where: str) -> None:
        if counters[_C_STOP_MID_RECORD]:
            counters[_C_STOP_MID_RECORD] = 0
            counters[_C_STOPPED_MID_RECORD] = 1
            os.kill(os.getpid(), signal.SIGSTOP)  # the parent kills us here

    if config.kill_every_s > 0:
        ShmBus._critical_section_hook = stop_mid_record

    async def main() -> None:
        bus = ShmBus(config.name, capacity=config.capacity, max_event_size=config.max_event_size)
        await bus.connect()
        try:
            base = len(
                encode_envelope(
                    topic_of(pub, 0),
                    {"p": pub, "s": 1 << 62, "sz": 1 << 62, "pad": ""},
                    "",
                    1 << 30,
                )
            )
            max_pad = config.max_event_size - base - 5  # str header: up to 5 bytes
            link.send("ready")
            link.expect("go")
            seq = 0
            sent_bytes = 0
            max_short = 0.0
            errors_shown = 0
            started = time.monotonic()
            clock = time.monotonic
            sched = _SchedClock().read
            while not link.poll():
                burst = rng.randint(1, 200)
                for _ in range(burst):
                    roll = rng.random()
                    if roll < 0.7:
                        size = rng.randint(0, min(200, max_pad))
                    elif roll < 0.97:
                        size = rng.randint(0, max_pad // 8)
                    elif roll < 0.995:
                        size = rng.randint(0, max_pad)
                    else:
                        size = max_pad
                    payload = {"p": pub, "s": seq, "sz": size, "pad": pad_of(seq, size)}
                    topic = topic_of(pub, seq)
                    cpu0, runnable0 = sched()
                    t0 = clock()
                    try:
                        await bus.publish(topic, payload)
                    except Exception:
                        # Counted; the same sequence number is published again.
                        counters[_C_ERRORS] += 1
                        if errors_shown < 5:
                            errors_shown += 1
                            print(
                                f"soak publisher {pub} (pid {os.getpid()}): publish "
                                f"failed:\n{traceback.format_exc()}",
                                file=sys.stderr,
                                flush=True,
                            )
                        continue
                    took = clock() - t0
                    seq += 1
                    sent_bytes += size
                    counters[_C_RETURNED] = seq
                    counters[_C_BYTES] = sent_bytes
                    if took >= _SLOW_PUBLISH_S:
                        cpu1, runnable1 = sched()
                        slow_log.add(t0, took, (cpu1 - cpu0) / 1e9, (runnable1 - runnable0) / 1e9)
                    elif took > max_short:
                        max_short = took
                        counters[_C_MAX_SHORT_NS] = int(took * 1e9)
                if config.rate > 0:
                    ahead = seq / config.rate - (time.monotonic() - started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                else:
                    await asyncio.sleep(0)
            link.expect("stop")
            ring = _own_ring(config.name, os.getpid())
            link.send(
                {
                    "published": seq,
                    "bytes": sent_bytes,
                    "ring_published": ring.published if ring is not None else 0,
                    "publish_errors": int(counters[_C_ERRORS]) + bus.stats().publish_errors,
                }
            )
        finally:
            await bus.close()

    asyncio.run(main())


class _PublisherBooks:
    """What one subscriber got from one publisher."""

    __slots__ = ("received", "last", "highest", "duplicates", "violations", "seen")

    def __init__(self) -> None:
        self.received = 0
        self.last = -1
        self.highest = -1
        self.duplicates = 0
        self.violations = 0
        self.seen = bytearray()  # one bit per sequence number

    def add(self, seq: int) -> None:
        byte, bit = seq >> 3, 1 << (seq & 7)
        if byte >= len(self.seen):
            self.seen.extend(bytes(max(byte + 1 - len(self.seen), len(self.seen))))
        if self.seen[byte] & bit:
            self.duplicates += 1
            return
        self.seen[byte] |= bit
        self.received += 1
        if seq < self.last:
            self.violations += 1
        self.last = seq
        self.highest = max(self.highest, seq)


def _subscriber_main(link: BlockingLink, config: SoakConfig, spec: SubscriberSpec) -> None:
    """Subscribe, keep per-publisher books, report on ``("drain", expected,
    quiet)`` once received + dropped reaches *expected* and no event came
    for *quiet* seconds (or none for ``_GIVE_UP_QUIET_S``); ``"close"`` ends
    it."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        bus = ShmBus(
            config.name,
            capacity=config.capacity,
            max_event_size=config.max_event_size,
            queue_size=spec.queue_size,
        )
        await bus.connect()
        inbox = AsyncLink(link)
        books: dict[int, _PublisherBooks] = {}
        state = {"received": 0, "bad": 0, "last_event": loop.time()}
        try:
            sub = bus.subscribe(spec.pattern)

            async def consume() -> None:
                async for event in sub:
                    payload = event.payload
                    pub, seq = payload.get("p"), payload.get("s")
                    size, pad = payload.get("sz"), payload.get("pad")
                    if (
                        not isinstance(pub, int)
                        or not isinstance(seq, int)
                        or seq < 0
                        or event.topic != topic_of(pub, seq)
                        or not isinstance(size, int)
                        or pad != pad_of(seq, size)
                    ):
                        state["bad"] += 1
                    else:
                        entry = books.get(pub)
                        if entry is None:
                            entry = books[pub] = _PublisherBooks()
                        entry.add(seq)
                    state["received"] += 1
                    state["last_event"] = loop.time()
                    if spec.slow_s:
                        time.sleep(spec.slow_s)  # a consumer stuck in synchronous work

            consumer = asyncio.ensure_future(consume())
            link.send("ready")
            while True:
                message = await inbox.expect("drain", "close", EOF)
                if message in ("close", EOF):
                    break
                _, expected, quiet = message
                deadline = loop.time() + _EXCHANGE_TIMEOUT / 2
                while loop.time() < deadline:
                    idle = loop.time() - state["last_event"]
                    if idle >= _GIVE_UP_QUIET_S or (
                        idle >= quiet and state["received"] + sub.dropped >= expected
                    ):
                        break
                    await asyncio.sleep(0.02)
                stats = bus.stats()
                link.send(
                    {
                        "books": {
                            pub: {
                                "received": entry.received,
                                "highest": entry.highest,
                                "duplicates": entry.duplicates,
                                "violations": entry.violations,
                            }
                            for pub, entry in books.items()
                        },
                        "received": state["received"],
                        "dropped": sub.dropped,
                        "bad": state["bad"],
                        "corrupt": stats.corrupt,
                        "lapped": stats.lapped,
                    }
                )
            consumer.cancel()
            inbox.close()
        finally:
            await bus.close()
        link.send("closed")

    asyncio.run(main())


# ─── The parent ─────────────────────────────────────────────────────────────


class _Child(Child):
    """A soak process, with the windows a stop fault stopped it for."""

    deadline = _EXCHANGE_TIMEOUT

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        super().__init__(target, args)
        #: When a stop fault stopped it, and when it is to be continued.
        self.stopped_at: float | None = None
        self.resume_at = 0.0
        self.windows: list[tuple[float, float]] = []
        self.start()

    def stop(self, now: float, resume_at: float) -> None:
        self.signal(signal.SIGSTOP)
        self.stopped_at, self.resume_at = now, resume_at

    def cont(self) -> None:
        if self.stopped_at is None:
            return
        self.signal(signal.SIGCONT)
        self.windows.append((self.stopped_at, time.monotonic()))
        self.stopped_at = None


@dataclass
class _Publisher:
    pub: int
    child: _Child
    counters: Any
    slots: Any
    #: "starting" (until it is ready), "running", "killed", "finished".
    state: str = "starting"
    #: Events committed to its ring (known once killed or finished).
    published: int = 0
    sent_bytes: int = 0
    publish_errors: int = 0
    books_error: str = ""
    ring_path: str | None = None
    killed_at: float = float("inf")


@dataclass
class _PublishTimes:
    longest: float = 0.0
    longest_not_runnable: float = 0.0
    very_slow: int = 0
    longest_during_other_stops: float = 0.0
    slowest: list[tuple[float, float, float, float, int, bool]] = field(default_factory=list)


def _expected(pattern: str, published: dict[int, int]) -> int:
    """Events of *published* (pub -> count) whose topic matches *pattern*."""
    total = 0
    for pub, count in published.items():
        for kind_index, kind in enumerate(_KINDS):
            # seqs s with (s + pub) % 3 == kind_index
            first = (kind_index - pub) % len(_KINDS)
            n = 0 if count <= first else (count - 1 - first) // len(_KINDS) + 1
            if matches(pattern, f"soak.p{pub}.{kind}"):
                total += n
    return total


def _wait_until_stopped(pid: int, timeout: float, ready: Callable[[], bool] = lambda: True) -> bool:
    """Wait until *pid* is in the stopped state and *ready*() holds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            return False
        if state in (b"T", b"t") and ready():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.0005)


class _Soak:
    """One run: the processes, the fault schedule and the books."""

    def __init__(self, config: SoakConfig, say: Callable[[str], None]) -> None:
        self.config = config
        self.say = say
        self.rng = random.Random(config.seed)
        self.subscribers: list[_Child] = []
        self.publishers: list[_Publisher] = []
        self.faults: list[tuple[float, str, str]] = []
        self.started = time.monotonic()
        self.kills = self.kills_mid_record = self.kills_while_stopped = 0
        self.publisher_stops = self.subscriber_stops = 0

    def note(self, what: str, details: str) -> None:
        self.faults.append((round(time.monotonic() - self.started, 3), what, details))

    def start_publisher(self) -> _Publisher:
        pub = max((p.pub for p in self.publishers), default=0) + 1
        counters = _CTX.RawArray("q", _COUNTERS)
        slots = _CTX.RawArray("d", _SLOT_WIDTH * _SLOW_SLOTS)
        child = _Child(
            _publisher_main, self.config, pub, counters, slots, self.rng.randrange(1 << 30)
        )
        publisher = _Publisher(pub, child, counters, slots)
        self.publishers.append(publisher)
        return publisher

    def running(self) -> list[_Publisher]:
        return [p for p in self.publishers if p.state == "running"]

    def kill_publisher(self, victim: _Publisher, mid_record: bool) -> None:
        """Stop *victim*, count what its ring holds, then SIGKILL it."""
        child = victim.child
        pid = child.pid
        stopped_at = child.stopped_at
        stopped_before = stopped_at is not None
        if stopped_at is None:
            stopped_at = time.monotonic()
        in_record = False
        if not stopped_before and mid_record:
            victim.counters[_C_STOP_MID_RECORD] = 1
            in_record = _wait_until_stopped(
                pid, _SELF_STOP_TIMEOUT, lambda: bool(victim.counters[_C_STOPPED_MID_RECORD])
            )
            if not in_record:
                victim.counters[_C_STOP_MID_RECORD] = 0
        if not stopped_before and not in_record:
            os.kill(pid, signal.SIGSTOP)
            _wait_until_stopped(pid, 5.0)
            in_record = bool(victim.counters[_C_STOPPED_MID_RECORD])  # it got there first
        if not _wait_until_stopped(pid, 5.0):
            raise RuntimeError(f"soak publisher {victim.pub} (pid {pid}) did not stop")
        ring = _own_ring(self.config.name, pid)
        returned = int(victim.counters[_C_RETURNED])
        child.stopped_at = None
        child.windows.append((stopped_at, float("inf")))
        child.signal(signal.SIGKILL)
        victim.killed_at = time.monotonic()
        child.kill()  # reaps it
        child.close()
        victim.state = "killed"
        victim.published = ring.published if ring is not None else 0
        victim.sent_bytes = int(victim.counters[_C_BYTES])
        victim.publish_errors = int(victim.counters[_C_ERRORS])
        victim.ring_path = ring.path if ring is not None else None
        if in_record and victim.published != returned:
            victim.books_error = (
                f"killed mid-record after {returned} publishes returned, but its ring "
                f"holds {victim.published} events (the record in flight was committed?)"
            )
        elif not returned <= victim.published <= returned + 1:
            victim.books_error = (
                f"killed after {returned} publishes returned, but its ring holds "
                f"{victim.published} events"
            )
        self.kills += 1
        self.kills_mid_record += in_record
        self.kills_while_stopped += stopped_before
        how = "mid-record" if in_record else ("while stopped" if stopped_before else "anywhere")
        self.note(
            "kill",
            f"publisher {victim.pub} pid {pid} ({how}): {victim.published} committed, "
            f"{returned} returned{'; ' + victim.books_error if victim.books_error else ''}",
        )

    def run(self) -> SoakTally:
        config, rng = self.config, self.rng
        for spec in config.subscribers:
            self.subscribers.append(_Child(_subscriber_main, config, spec))
        for child in self.subscribers:
            child.expect("ready")
        for _ in range(config.publishers):
            self.start_publisher()
        for publisher in self.publishers:
            publisher.child.expect("ready")
        for publisher in self.publishers:
            publisher.state = "running"
            publisher.child.send("go")

        def period(every: float) -> float:
            return every * rng.uniform(0.5, 1.5) if every > 0 else float("inf")

        def stop_length() -> float:
            return rng.uniform(config.stop_min_s, config.stop_max_s)

        sub_every = config.stop_every_s or 3.0
        self.started = started = time.monotonic()
        end = started + config.seconds
        next_kill = started + period(config.kill_every_s)
        next_stop = started + period(config.stop_every_s)
        next_sub_stop = started + (period(sub_every) if config.stop_subscribers else float("inf"))
        next_note = started + 60
        while (now := time.monotonic()) < end:
            for publisher in self.publishers:
                child = publisher.child
                if child.stopped_at is not None and now >= child.resume_at:
                    child.cont()
                    self.note("cont", f"publisher {publisher.pub} pid {child.pid}")
                if publisher.state == "starting" and child.poll():
                    child.expect("ready")
                    publisher.state = "running"
                    child.send("go")
            for index, child in enumerate(self.subscribers):
                if child.stopped_at is not None and now >= child.resume_at:
                    child.cont()
                    self.note("cont", f"subscriber {index} pid {child.pid}")
            if now >= next_kill:
                # Every other kill (the first one first) is mid-record, of a
                # publisher not stopped; the others may hit a stopped one.
                mid_record = self.kills % 2 == 0
                candidates = [
                    p for p in self.running() if not mid_record or p.child.stopped_at is None
                ] or self.running()
                if candidates:
                    self.kill_publisher(rng.choice(candidates), mid_record)
                    self.start_publisher()
                next_kill = max(now, next_kill) + period(config.kill_every_s)
            if now >= next_stop:
                candidates = [p for p in self.running() if p.child.stopped_at is None]
                if candidates:
                    victim = rng.choice(candidates)
                    length = stop_length()
                    victim.child.stop(time.monotonic(), now + length)
                    self.publisher_stops += 1
                    self.note(
                        "stop", f"publisher {victim.pub} pid {victim.child.pid} for {length:.2f} s"
                    )
                next_stop = now + period(config.stop_every_s)
            if now >= next_sub_stop:
                awake = [c for c in self.subscribers if c.stopped_at is None]
                if awake:
                    child = rng.choice(awake)
                    length = stop_length()
                    child.stop(time.monotonic(), now + length)
                    self.subscriber_stops += 1
                    self.note(
                        "stop",
                        f"subscriber {self.subscribers.index(child)} pid {child.pid} "
                        f"for {length:.2f} s",
                    )
                next_sub_stop = now + period(sub_every)
            if now >= next_note:
                returned = sum(int(p.counters[_C_RETURNED]) for p in self.publishers)
                self.say(
                    f"{now - started:6.0f} s: {returned:,} events published, "
                    f"{self.kills} publisher kills, {self.publisher_stops} publisher stops, "
                    f"{self.subscriber_stops} subscriber stops"
                )
                next_note += 60
            time.sleep(0.005)
        return self.finish()

    def finish(self) -> SoakTally:
        config = self.config
        seconds = time.monotonic() - self.started
        for child in [*(p.child for p in self.publishers), *self.subscribers]:
            child.cont()
        for publisher in self.publishers:
            if publisher.state == "starting":
                publisher.child.expect("ready")
                publisher.state = "running"
                publisher.child.send("go")
        live = self.running()
        for publisher in live:
            publisher.child.send("stop")
        for publisher in live:
            report = publisher.child.recv()
            publisher.state = "finished"
            publisher.published = report["published"]
            publisher.sent_bytes = report["bytes"]
            publisher.publish_errors = report["publish_errors"]
            if report["ring_published"] != report["published"]:
                publisher.books_error = (
                    f"{report['published']} publishes returned, but its ring holds "
                    f"{report['ring_published']} events"
                )
        for publisher in live:
            publisher.child.join(_EXCHANGE_TIMEOUT)
        killed_rings = [p.ring_path for p in self.publishers if p.state == "killed" and p.ring_path]
        reclaimed = sum(1 for path in killed_rings if not os.path.exists(path))
        published_by = {p.pub: p.published for p in self.publishers}
        books = [
            self.subscription_books(spec, child, published_by)
            for spec, child in zip(config.subscribers, self.subscribers, strict=True)
        ]
        for child in self.subscribers:
            child.send("close")
        for child in self.subscribers:
            child.expect("closed")
        timed = sum(int(p.counters[_C_RETURNED]) for p in self.publishers)
        times = self.publish_times()
        for publisher in self.publishers:
            if publisher.books_error:
                self.note("books", f"publisher {publisher.pub}: {publisher.books_error}")
        return SoakTally(
            name=config.name,
            seed=config.seed,
            seconds=seconds,
            publishers=config.publishers,
            subscribers=len(config.subscribers),
            published=sum(published_by.values()),
            bytes_published=sum(p.sent_bytes for p in self.publishers),
            delivered=sum(b.received for b in books),
            dropped=sum(b.dropped for b in books),
            corrupt=sum(b.corrupt for b in books),
            lapped=sum(b.lapped for b in books),
            uncounted=sum(b.uncounted for b in books),
            overcounted=sum(b.overcounted for b in books),
            duplicates=sum(b.duplicates for b in books),
            order_violations=sum(b.order_violations for b in books),
            bad_payloads=sum(b.bad_payloads for b in books),
            phantoms=sum(b.phantoms for b in books),
            publish_errors=sum(p.publish_errors for p in self.publishers),
            publisher_books_errors=sum(1 for p in self.publishers if p.books_error),
            publisher_kills=self.kills,
            kills_mid_record=self.kills_mid_record,
            kills_while_stopped=self.kills_while_stopped,
            publisher_stops=self.publisher_stops,
            subscriber_stops=self.subscriber_stops,
            publishes_timed=timed,
            max_publish_s=times.longest,
            very_slow_publishes=times.very_slow,
            max_publish_not_runnable_s=times.longest_not_runnable,
            max_publish_during_other_stops_s=times.longest_during_other_stops,
            killed_rings=len(killed_rings),
            rings_reclaimed=reclaimed,
            subscriptions=books,
            faults=self.faults,
            slowest_publishes=times.slowest,
        )

    def subscription_books(
        self, spec: SubscriberSpec, child: _Child, published_by: dict[int, int]
    ) -> SubscriptionBooks:
        everything = all(
            matches(spec.pattern, topic_of(pub, seq))
            for pub in published_by
            for seq in range(len(_KINDS))
        )
        expected = _expected(spec.pattern, published_by)
        child.send(("drain", expected, 0.5))
        report = child.recv()
        by_pub: dict[int, dict[str, int]] = report["books"]
        missing = phantoms = duplicates = violations = 0
        for pub, entry in by_pub.items():
            duplicates += entry["duplicates"]
            violations += entry["violations"]
            if entry["highest"] >= published_by.get(pub, 0):
                phantoms += 1  # at least one; the tally needs 0 anyway
        for pub, count in published_by.items():
            got = by_pub.get(pub, {}).get("received", 0)
            missing += max(0, _expected(spec.pattern, {pub: count}) - got)
        received, dropped = report["received"], report["dropped"]
        if everything:
            balance = received + dropped - expected
            uncounted, overcounted = max(0, -balance), max(0, balance)
        else:
            uncounted, overcounted = max(0, missing - dropped), 0
        return SubscriptionBooks(
            pattern=spec.pattern,
            slow=spec.slow_s > 0,
            matches_everything=everything,
            received=received,
            dropped=dropped,
            corrupt=report["corrupt"],
            lapped=report["lapped"],
            expected=expected,
            missing=missing,
            duplicates=duplicates,
            order_violations=violations,
            bad_payloads=report["bad"],
            phantoms=phantoms,
            uncounted=uncounted,
            overcounted=overcounted,
        )

    def publish_times(self) -> _PublishTimes:
        """The publishes no stop of their own publisher explains: the longest,
        those of 10 ms or more, the longest while another publisher was
        stopped, and the slowest few."""
        times = _PublishTimes()
        # Stop windows as the other publishers see them: a killed one's last
        # window ends at its death.
        windows = {
            p.pub: [(stopped, min(resumed, p.killed_at)) for stopped, resumed in p.child.windows]
            for p in self.publishers
        }
        slow: list[tuple[float, float, float, float, int, bool]] = []
        for publisher in self.publishers:
            counters = publisher.counters
            short = counters[_C_MAX_SHORT_NS] / 1e9
            times.longest = max(times.longest, short)
            times.longest_not_runnable = max(times.longest_not_runnable, short)
            own = publisher.child.windows
            for start, took, on_cpu, runnable in _slow_entries(counters, publisher.slots):
                end = start + took
                if any(start < resumed and end > stopped for stopped, resumed in own):
                    continue  # its own publisher was stopped meanwhile
                others = any(
                    start < resumed and end > stopped
                    for pub, spans in windows.items()
                    if pub != publisher.pub
                    for stopped, resumed in spans
                )
                times.longest = max(times.longest, took)
                times.longest_not_runnable = max(times.longest_not_runnable, took - runnable)
                times.very_slow += took >= _VERY_SLOW_PUBLISH_S
                if others:
                    times.longest_during_other_stops = max(times.longest_during_other_stops, took)
                slow.append(
                    (
                        round(start - self.started, 3),
                        round(took * 1e3, 2),
                        round(on_cpu * 1e3, 2),
                        round(runnable * 1e3, 2),
                        publisher.pub,
                        others,
                    )
                )
        times.slowest = sorted(slow, key=lambda entry: -entry[1])[:10]
        return times

    def kill_all(self) -> None:
        stop_all([*self.subscribers, *(p.child for p in self.publishers)])


def run_soak(config: SoakConfig, *, progress: Callable[[str], None] | None = None) -> SoakTally:
    """Run one soak and return its books (see the module docstring)."""
    host = ShmBus(config.name, capacity=config.capacity, max_event_size=config.max_event_size)
    host.connect_sync()
    soak = _Soak(config, progress or (lambda _text: None))
    try:
        return soak.run()
    finally:
        soak.kill_all()
        host.close_sync()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tools/soak",
        description="Soak a shmbus bus with publisher and subscriber processes, killing and "
        "stopping publishers at random if asked, and check that every event is delivered "
        "or counted (uncounted losses and publish errors must be 0).",
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument(
        "--minutes",
        type=number_argument("--minutes", above=True, unit="minutes"),
        help="how long to publish (default 1)",
    )
    length.add_argument(
        "--seconds",
        type=number_argument("--seconds", above=True, unit="seconds"),
        help="how long to publish, in seconds",
    )
    parser.add_argument("--publishers", type=int_argument("--publishers", minimum=1), default=4)
    parser.add_argument(
        "--rate",
        type=number_argument("--rate", unit="events/s"),
        default=1500.0,
        help="events/s per publisher (0: unpaced)",
    )
    parser.add_argument(
        "--kill-every",
        type=number_argument("--kill-every", unit="seconds"),
        default=0.0,
        metavar="SECONDS",
        help="SIGKILL a random publisher about this often (0.5-1.5 times, at random; every "
        "other kill mid-record) and start a new one (default: never)",
    )
    parser.add_argument(
        "--stop-every",
        type=number_argument("--stop-every", unit="seconds"),
        default=0.0,
        metavar="SECONDS",
        help="SIGSTOP a random publisher about this often for 0.2-2 s, then SIGCONT it "
        "(default: never)",
    )
    parser.add_argument(
        "--stop-subscribers",
        action="store_true",
        help="also SIGSTOP a random subscriber for 0.2-2 s, about every --stop-every "
        "seconds (3 without it)",
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--name", default=None, help="bus name (default soak-PID)")
    parser.add_argument("--json", metavar="PATH", help="also write the tally as JSON to PATH")
    parser.add_argument(
        "--faults", action="store_true", help="also print every fault (kill, stop, cont)"
    )
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else 60 * (args.minutes or 1)
    config = SoakConfig(
        seconds=seconds,
        publishers=args.publishers,
        rate=args.rate,
        kill_every_s=args.kill_every,
        stop_every_s=args.stop_every,
        stop_subscribers=args.stop_subscribers,
        **({"seed": args.seed} if args.seed is not None else {}),
        **({"name": args.name} if args.name else {}),
    )

    def say(text: str) -> None:
        print(text, flush=True)

    faults = []
    if config.kill_every_s > 0:
        faults.append(f"a publisher killed about every {config.kill_every_s:g} s")
    if config.stop_every_s > 0:
        faults.append(f"a publisher stopped about every {config.stop_every_s:g} s")
    if config.stop_subscribers:
        faults.append(f"a subscriber stopped about every {config.stop_every_s or 3.0:g} s")
    say(
        f"soaking bus {config.name!r} for {seconds:.0f} s: {config.publishers} publishers at "
        f"{config.rate:g} events/s each, {len(config.subscribers)} subscribers, "
        f"{'; '.join(faults) or 'no faults'}; seed {config.seed}"
    )
    tally = run_soak(config, progress=say)
    if args.faults or not tally.ok:
        for at, what, details in tally.faults:
            say(f"  {at:9.3f} s  {what:<5} {details}")
    say(tally.render())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(tally.as_dict(), f, indent=1)
    return 0 if tally.ok else 1


if __name__ == "__main__":
    sys.exit(main())
