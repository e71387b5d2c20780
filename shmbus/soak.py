"""Soak test: many processes on one bus for a long time, with exact books.

``python -m shmbus.soak --minutes N`` (or ``tools/soak``) runs publisher
processes and subscriber processes with different patterns (one of them
deliberately slow) on one bus, events of random sizes up to
``max_event_size``, and checks, for every subscription:

* no event is delivered twice and each publisher's events arrive in the
  order they were published;
* every event delivered is intact (its payload is what was published);
* every event a subscription should have had but did not get is counted:
  for a subscription that matches every topic, ``received + dropped`` equals
  the events published, exactly; for the others, the events missing from a
  publisher's sequence are at most the subscription's ``dropped``.

Anything short of that is an *uncounted loss*, which must be 0. The test
suite runs a short soak through :func:`run_soak`; the tool runs long ones.

Optionally (``--kill-every``) a random publisher is SIGKILLed every few
seconds and replaced: then the events reserved by dead writers (sequence
numbers handed out, never committed) count as published, as readers see
them as gaps.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import mmap
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .codec import encode_envelope
from .contract import matches
from .inspect import read_bus
from .layout import OFF_LOCK_PID
from .shm import ShmBus

__all__ = ["SoakConfig", "SoakTally", "SubscriberSpec", "main", "run_soak"]

_CTX = multiprocessing.get_context("spawn")
#: Topic kinds; publisher ``p`` publishes event ``s`` on ``soak.p<p>.<kind>``.
_KINDS = "abc"
#: Hang guard for any one exchange with a child process, in seconds.
_EXCHANGE_TIMEOUT = 120.0


def topic_of(pub: int, seq: int) -> str:
    """The topic of event *seq* of publisher *pub* (known to the checker)."""
    return f"soak.p{pub}.{_KINDS[(seq + pub) % len(_KINDS)]}"


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
    """What to run. ``rate`` is events/s per publisher (0: unpaced)."""

    name: str = field(default_factory=lambda: f"soak-{os.getpid()}")
    seconds: float = 20.0
    publishers: int = 4
    subscribers: tuple[SubscriberSpec, ...] = DEFAULT_SUBSCRIBERS
    capacity: int = 1 << 20
    max_event_size: int = 16 * 1024
    rate: float = 1500.0
    kill_every_s: float = 0.0
    seed: int = field(default_factory=lambda: random.randrange(1 << 30))


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
    expected: int
    missing: int
    order_violations: int
    bad_payloads: int
    uncounted: int


@dataclass
class SoakTally:
    """The books of one soak run."""

    name: str
    seconds: float
    publishers: int
    subscribers: int
    publisher_kills: int
    #: Events publishers reported published (killed ones: those whose
    #: publish returned), and sequence numbers the bus handed out meanwhile
    #: (also counts events reserved by killed writers).
    published: int
    issued: int
    bytes_published: int
    delivered: int
    dropped: int
    corrupt: int
    lapped: int
    lock_recoveries: int
    torn_records: int
    publish_errors: int
    order_violations: int
    bad_payloads: int
    uncounted: int
    subscriptions: list[SubscriptionBooks]

    @property
    def ok(self) -> bool:
        return (
            self.uncounted == 0
            and self.order_violations == 0
            and self.bad_payloads == 0
            and self.publish_errors == 0
            and self.published <= self.issued <= self.published + self.publisher_kills
        )

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["ok"] = self.ok
        return data

    def render(self) -> str:
        lines = [
            f"soak of bus {self.name!r}: {self.seconds:.0f} s, {self.publishers} publishers "
            f"({self.publisher_kills} killed and replaced), {self.subscribers} subscribers",
            f"  events published      {self.published:>12,}   "
            f"({self.issued:,} sequence numbers issued)",
            f"  payload bytes         {self.bytes_published / 2**20:>12,.1f}   MiB",
            f"  events delivered      {self.delivered:>12,}   (over all subscriptions)",
            f"  events dropped        {self.dropped:>12,}   "
            "(counted: queue overflow, lapped, torn)",
            f"  corrupt records       {self.corrupt:>12,}",
            f"  lock recoveries       {self.lock_recoveries:>12,}   "
            f"({self.torn_records:,} torn records)",
            f"  publish errors        {self.publish_errors:>12,}",
            f"  order violations      {self.order_violations:>12,}",
            f"  bad payloads          {self.bad_payloads:>12,}",
            f"  UNCOUNTED LOSSES      {self.uncounted:>12,}   (must be 0)",
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


def _pipe_messages(
    conn: multiprocessing.connection.Connection, loop: asyncio.AbstractEventLoop
) -> asyncio.Queue[Any]:
    """The parent's messages, read on *loop*; ``"close"`` if the parent goes."""
    messages: asyncio.Queue[Any] = asyncio.Queue()

    def on_readable() -> None:
        try:
            while conn.poll():
                messages.put_nowait(conn.recv())
        except (EOFError, OSError):
            loop.remove_reader(conn.fileno())
            messages.put_nowait("close")

    loop.add_reader(conn.fileno(), on_readable)
    return messages


def _publisher_main(
    conn: multiprocessing.connection.Connection,
    config: SoakConfig,
    pub: int,
    done: Any,
    seed: int,
) -> None:
    """Publish until ``"stop"``; ``done[0]`` counts the publishes that
    returned and ``done[1]`` their payload bytes (read by the parent if it
    kills us)."""
    rng = random.Random(seed)

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
            conn.send("ready")
            if conn.recv() != "go":
                raise RuntimeError("publisher expected 'go'")
            seq = 0
            sent_bytes = 0
            started = time.monotonic()
            while not conn.poll():
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
                    pad = chr(97 + seq % 26) * size
                    await bus.publish(
                        topic_of(pub, seq), {"p": pub, "s": seq, "sz": size, "pad": pad}
                    )
                    seq += 1
                    sent_bytes += size
                    done[0], done[1] = seq, sent_bytes
                if config.rate > 0:
                    ahead = seq / config.rate - (time.monotonic() - started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                else:
                    await asyncio.sleep(0)
            if conn.recv() != "stop":
                raise RuntimeError("publisher expected 'stop'")
            conn.send({"published": seq, "bytes": sent_bytes, "bus": dict(bus.stats())})
        finally:
            await bus.close()

    asyncio.run(main())


def _subscriber_main(
    conn: multiprocessing.connection.Connection, config: SoakConfig, spec: SubscriberSpec
) -> None:
    """Subscribe, keep per-publisher books, report on ``("drain", expected,
    quiet)`` once received + dropped reaches *expected* and no event came
    for *quiet* seconds; ``"close"`` ends it."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        bus = ShmBus(
            config.name,
            capacity=config.capacity,
            max_event_size=config.max_event_size,
            queue_size=spec.queue_size,
        )
        await bus.connect()
        messages = _pipe_messages(conn, loop)
        books: dict[int, list[int]] = {}  # pub -> [received, last seq]
        state = {"received": 0, "violations": 0, "bad": 0, "last_event": loop.time()}
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
                        or event.topic != topic_of(pub, seq)
                        or not isinstance(pad, str)
                        or len(pad) != size
                        or pad != chr(97 + seq % 26) * size
                    ):
                        state["bad"] += 1
                    else:
                        entry = books.setdefault(pub, [0, -1])
                        if seq <= entry[1]:
                            state["violations"] += 1
                        entry[0] += 1
                        entry[1] = seq
                    state["received"] += 1
                    state["last_event"] = loop.time()
                    if spec.slow_s:
                        time.sleep(spec.slow_s)  # a consumer stuck in synchronous work

            consumer = asyncio.ensure_future(consume())
            conn.send("ready")
            while True:
                message = await messages.get()
                if message == "close":
                    break
                _, expected, quiet = message
                deadline = loop.time() + _EXCHANGE_TIMEOUT / 2
                while loop.time() < deadline and (
                    state["received"] + sub.dropped < expected
                    or loop.time() - state["last_event"] < quiet
                ):
                    await asyncio.sleep(0.02)
                stats = bus.stats()
                conn.send(
                    {
                        "books": {pub: tuple(entry) for pub, entry in books.items()},
                        "received": state["received"],
                        "dropped": sub.dropped,
                        "violations": state["violations"],
                        "bad": state["bad"],
                        "corrupt": stats.corrupt,
                        "lapped": stats.lapped,
                    }
                )
            consumer.cancel()
            with contextlib.suppress(Exception):
                loop.remove_reader(conn.fileno())
        finally:
            await bus.close()
        with contextlib.suppress(OSError):
            conn.send("closed")

    asyncio.run(main())


# ─── The parent ─────────────────────────────────────────────────────────────


class _Child:
    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        self.conn, child_conn = _CTX.Pipe()
        self.process = _CTX.Process(target=target, args=(child_conn, *args), daemon=True)
        self.process.start()
        child_conn.close()

    def recv(self, timeout: float = _EXCHANGE_TIMEOUT) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"soak child pid {self.process.pid} sent nothing in {timeout:g} s")
        try:
            return self.conn.recv()
        except EOFError:
            raise RuntimeError(
                f"soak child pid {self.process.pid} died (exit code {self.process.exitcode})"
            ) from None

    def expect(self, value: Any) -> None:
        got = self.recv()
        if got != value:
            raise RuntimeError(f"soak child pid {self.process.pid} sent {got!r}, not {value!r}")

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self.conn.close()


@dataclass
class _Publisher:
    pub: int
    child: _Child
    done: Any
    report: dict[str, Any] | None = None
    killed: bool = False


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


def _kill_while_holding(name: str, pid: int | None, timeout: float = 1.0) -> None:
    """SIGKILL *pid* while it holds the bus's writer lock: busy-poll the
    holder record, SIGSTOP the process when it shows up there, and kill it
    if it still holds the lock once stopped (else let it go on and try
    again). After *timeout* without success, leave it to the caller's kill."""
    if pid is None:
        return
    with (
        open(f"/dev/shm/shmbus.{name}", "rb") as f,
        mmap.mmap(f.fileno(), OFF_LOCK_PID + 8, prot=mmap.PROT_READ) as mm,
    ):
        words = memoryview(mm).cast("Q")
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if words[OFF_LOCK_PID // 8] != pid:
                    continue
                os.kill(pid, signal.SIGSTOP)
                _wait_until_stopped(pid)
                if words[OFF_LOCK_PID // 8] == pid:
                    os.kill(pid, signal.SIGKILL)
                    return
                os.kill(pid, signal.SIGCONT)
        finally:
            words.release()


def _wait_until_stopped(pid: int, timeout: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            return
        if state in (b"T", b"t"):
            return


def run_soak(config: SoakConfig, *, progress: Callable[[str], None] | None = None) -> SoakTally:
    """Run one soak and return its books (see the module docstring)."""
    rng = random.Random(config.seed)
    say = progress or (lambda _text: None)
    host = ShmBus(config.name, capacity=config.capacity, max_event_size=config.max_event_size)
    asyncio.run(host.connect())
    subscribers: list[_Child] = []
    publishers: list[_Publisher] = []
    try:
        for spec in config.subscribers:
            subscribers.append(_Child(_subscriber_main, config, spec))
        for child in subscribers:
            child.expect("ready")
        before = read_bus(config.name)

        def start_publisher(pub: int) -> _Publisher:
            done = _CTX.RawArray("Q", 2)
            child = _Child(_publisher_main, config, pub, done, rng.randrange(1 << 30))
            return _Publisher(pub, child, done)

        publishers = [start_publisher(pub) for pub in range(1, config.publishers + 1)]
        for publisher in publishers:
            publisher.child.expect("ready")
        for publisher in publishers:
            publisher.child.conn.send("go")
        started = time.monotonic()
        end = started + config.seconds
        next_kill = started + config.kill_every_s if config.kill_every_s > 0 else float("inf")
        next_note = started + 60
        kills = 0
        while (now := time.monotonic()) < end:
            if now >= next_kill:
                victim = rng.choice([p for p in publishers if not p.killed])
                if kills % 2:  # every other kill: while it holds the writer lock
                    _kill_while_holding(config.name, victim.child.process.pid)
                victim.child.kill()
                victim.killed = True
                kills += 1
                replacement = start_publisher(max(p.pub for p in publishers) + 1)
                publishers.append(replacement)
                replacement.child.expect("ready")
                replacement.child.conn.send("go")
                next_kill += config.kill_every_s
            if now >= next_note:
                info = read_bus(config.name)
                say(
                    f"{now - started:6.0f} s: {info.next_seq - before.next_seq:,} events, "
                    f"{kills} publisher kills, {info.lock_recoveries - before.lock_recoveries} "
                    "lock recoveries"
                )
                next_note += 60
            time.sleep(min(0.05, max(0.0, min(end, next_kill, next_note) - now)))
        for publisher in publishers:
            if not publisher.killed:
                publisher.child.conn.send("stop")
        for publisher in publishers:
            if not publisher.killed:
                publisher.report = publisher.child.recv()
        after = read_bus(config.name)
        issued = after.next_seq - before.next_seq
        published_by = {
            p.pub: (p.report["published"] if p.report is not None else int(p.done[0]))
            for p in publishers
        }
        books = []
        for spec, child in zip(config.subscribers, subscribers, strict=True):
            everything = all(
                matches(spec.pattern, topic_of(pub, seq))
                for pub in published_by
                for seq in range(len(_KINDS))
            )
            expected = issued if everything else _expected(spec.pattern, published_by)
            child.conn.send(("drain", expected, 0.5))
            report = child.recv()
            received_by = {pub: entry[0] for pub, entry in report["books"].items()}
            missing = 0
            wanted = 0
            for pub, count in published_by.items():
                got = received_by.get(pub, 0)
                publisher = next(p for p in publishers if p.pub == pub)
                if publisher.killed and report["books"].get(pub, (0, -1))[1] == count:
                    count += 1  # its last, interrupted publish was committed after all
                want = _expected(spec.pattern, {pub: count})
                wanted += want
                missing += max(0, want - got)
            if not everything:
                expected = wanted
            if everything:
                uncounted = abs(expected - report["received"] - report["dropped"])
            else:
                uncounted = max(0, missing - report["dropped"])
            books.append(
                SubscriptionBooks(
                    pattern=spec.pattern,
                    slow=spec.slow_s > 0,
                    matches_everything=everything,
                    received=report["received"],
                    dropped=report["dropped"],
                    corrupt=report["corrupt"],
                    lapped=report["lapped"],
                    expected=expected,
                    missing=missing,
                    order_violations=report["violations"],
                    bad_payloads=report["bad"],
                    uncounted=uncounted,
                )
            )
        for child in subscribers:
            child.conn.send("close")
        for child in subscribers:
            child.expect("closed")
        reports = [p.report for p in publishers if p.report is not None]
        return SoakTally(
            name=config.name,
            seconds=time.monotonic() - started,
            publishers=config.publishers,
            subscribers=len(config.subscribers),
            publisher_kills=kills,
            published=sum(published_by.values()),
            issued=issued,
            bytes_published=sum(
                p.report["bytes"] if p.report is not None else int(p.done[1]) for p in publishers
            ),
            delivered=sum(b.received for b in books),
            dropped=sum(b.dropped for b in books),
            corrupt=sum(b.corrupt for b in books),
            lapped=sum(b.lapped for b in books),
            lock_recoveries=after.lock_recoveries - before.lock_recoveries,
            torn_records=after.torn_records - before.torn_records,
            publish_errors=sum(r["bus"]["publish_errors"] for r in reports),
            order_violations=sum(b.order_violations for b in books),
            bad_payloads=sum(b.bad_payloads for b in books),
            uncounted=sum(b.uncounted for b in books),
            subscriptions=books,
        )
    finally:
        for child in [*subscribers, *(p.child for p in publishers)]:
            with contextlib.suppress(Exception):
                child.kill()
        asyncio.run(host.close())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tools/soak",
        description="Soak a shmbus bus with publisher and subscriber processes and check "
        "that every event is delivered or counted (uncounted losses must be 0).",
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="how long to publish (default 1)")
    length.add_argument("--seconds", type=float, help="how long to publish, in seconds")
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument(
        "--rate", type=float, default=1500.0, help="events/s per publisher (0: unpaced)"
    )
    parser.add_argument(
        "--kill-every",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="SIGKILL a random publisher this often and start a new one (default: never)",
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--name", default=None, help="bus name (default soak-PID)")
    parser.add_argument("--json", metavar="PATH", help="also write the tally as JSON to PATH")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else 60 * (args.minutes or 1)
    config = SoakConfig(
        seconds=seconds,
        publishers=args.publishers,
        rate=args.rate,
        kill_every_s=args.kill_every,
        **({"seed": args.seed} if args.seed is not None else {}),
        **({"name": args.name} if args.name else {}),
    )

    def say(text: str) -> None:
        print(text, flush=True)

    say(
        f"soaking bus {config.name!r} for {seconds:.0f} s: {config.publishers} publishers at "
        f"{config.rate:g} events/s each, {len(config.subscribers)} subscribers, seed {config.seed}"
    )
    tally = run_soak(config, progress=say)
    say(tally.render())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({**tally.as_dict(), "seed": config.seed}, f, indent=1)
    return 0 if tally.ok else 1


if __name__ == "__main__":
    sys.exit(main())
