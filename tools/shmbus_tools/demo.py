"""The live demo: one publisher and three subscriber processes on a fresh bus.

Owns
----
``python -m shmbus_tools.demo`` (``tools/demo``, and ``shmbus demo`` once the CLI
wires :func:`add_arguments` and :func:`main`): the processes it starts, the
messages they send it over their pipes, its console output, and the bus it
names (``demo-<pid>`` unless ``--bus`` is given).

What it shows
-------------
A publisher process publishes ``decky.<id>.traffic`` over 64 ids, each event
a 9-field payload stamped with ``time.monotonic_ns()`` (one clock for every
process of a host), at ``--rate`` events/s (``--rate 0``: as fast as it can).
Three subscriber processes follow the bus with different patterns and measure
one-way latency per event. Once a second each child reports to the parent,
which redraws a table: per subscriber its pattern, events/s, p50 and p99
latency of that second, events received and events dropped (counted by the
bus: a subscriber that falls behind loses the oldest events and is told how
many).

At the end the publisher stops and reports what it published per topic; each
subscriber drains until everything published to it is either received or
counted as dropped, then reports its totals. The final summary checks that
accounting: for a pattern matching every topic, ``received + dropped`` must
equal ``published`` exactly. The last line of output is ``SUMMARY {json}``
for scripts. Exit status: 0 if the accounting holds, 1 if not (or a child
failed), 130 on Ctrl-C, 143 on SIGTERM, 2 for a bus that cannot be used.

Clean-up
--------
Every process closes its bus; the last to close removes the bus's files.
On any abnormal exit the parent asks its children to stop, terminates then
kills the ones that do not, and removes the bus's files if no live process
is still attached (see :func:`remove_if_abandoned`). Children ignore SIGINT
(Ctrl-C is the parent's to handle) and stop on their own when the parent's
end of their pipe closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TextIO

from shmbus._checks import int_argument, number_argument
from shmbus._core.layout import DEFAULT_CAPACITY
from shmbus._core.leftovers import cleanup
from shmbus._core.shmfiles import SHM_DIR, validate_bus_name
from shmbus.contract import matches
from shmbus.delivery import QueueSubscription
from shmbus.errors import BusInUseError, ShmBusError
from shmbus.shm import ShmBus

from .children import (
    EOF,
    AsyncLink,
    BlockingLink,
    Child,
    ChildFailed,
    await_all,
    data_of,
    kind_of,
    stop_all,
)

__all__ = ["DEFAULT_RATE", "PATTERNS", "add_arguments", "main", "remove_if_abandoned"]

log = logging.getLogger("shmbus_tools.demo")

#: Events/s the publisher aims at by default: sustainable on a 2-core host
#: with three subscribers, so the latencies shown are not queueing delays.
DEFAULT_RATE: Final = 20_000
DEFAULT_SECONDS: Final = 10.0
#: One subscriber per pattern; the first two match every topic published.
PATTERNS: Final = ("decky.*.traffic", "decky.>", "decky.7.*")
DECKY_IDS: Final = 64
#: The demo's events are ~250 bytes; a small limit lets the ring be small too.
MAX_EVENT_SIZE: Final = 64 * 1024
TOPICS: Final = tuple(f"decky.{i}.traffic" for i in range(DECKY_IDS))

#: Most events published between two yields to the event loop.
_PACED_BATCH_MAX: Final = 1000
_FLOOD_BATCH: Final = 256
#: A paced publisher that falls this far behind (seconds) stops catching up.
_MAX_LAG: Final = 0.05
_READY_TIMEOUT: Final = 60.0
_FINAL_TIMEOUT: Final = 15.0
_DRAIN_TIMEOUT: Final = 10.0
_STOP_GRACE: Final = 3.0
_POLL: Final = 0.02
#: The parent redraws this long after each whole second of the run, when the
#: children's reports for that second are in.
_RENDER_DELAY: Final = 0.15


# ─── Arguments ───────────────────────────────────────────────────────────────


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to *parser*."""
    parser.add_argument(
        "--rate",
        type=number_argument("--rate", unit="events/s"),
        default=DEFAULT_RATE,
        metavar="N",
        help=f"events/s the publisher aims at (default {DEFAULT_RATE}); 0 = flood, as fast "
        "as it can: the subscribers then fall behind and their drops are counted",
    )
    parser.add_argument(
        "--seconds",
        type=number_argument("--seconds", above=True, unit="seconds"),
        default=DEFAULT_SECONDS,
        metavar="S",
        help=f"how long to publish (default {DEFAULT_SECONDS:g})",
    )
    parser.add_argument(
        "--bus",
        default=None,
        metavar="NAME",
        help="bus name (default demo-<pid>, a fresh bus)",
    )
    parser.add_argument(
        "--capacity",
        type=int_argument("--capacity", minimum=1),
        default=DEFAULT_CAPACITY // (1 << 20),
        metavar="MIB",
        help=f"ring size in MiB (default {DEFAULT_CAPACITY >> 20}); a smaller ring makes a "
        "subscriber that falls behind lose events sooner",
    )
    parser.add_argument(
        "--queue-size",
        type=int_argument("--queue-size", minimum=1),
        default=1024,
        metavar="N",
        help="bound of each subscription's queue (default 1024)",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shmbus_tools.demo",
        description="Live shmbus demo: one publisher and three subscriber processes, "
        "with per-second rates, latencies and drops.",
    )
    add_arguments(parser)
    return parser


# ─── Child side ──────────────────────────────────────────────────────────────


def _bus_for(config: dict[str, Any]) -> ShmBus:
    return ShmBus(
        config["bus"],
        capacity=config["capacity"],
        max_event_size=MAX_EVENT_SIZE,
        queue_size=config["queue_size"],
    )


def publisher_process(link: BlockingLink, config: dict[str, Any]) -> None:
    """Entry point of the publisher process."""
    asyncio.run(_publisher(link, config))


async def _publisher(pipe: BlockingLink, config: dict[str, Any]) -> None:
    link = AsyncLink(pipe)
    try:
        bus = _bus_for(config)
        async with bus:
            link.send(("ready", {"pid": os.getpid()}))
            if not await link.wait_start():
                return
            counts, elapsed = await _publish_until(bus, float(config["rate"]), link)
            stats = bus.stats()
        link.send(
            (
                "final",
                {
                    "published": stats["published"],
                    "publish_errors": stats["publish_errors"],
                    "per_topic": dict(zip(TOPICS, counts, strict=True)),
                    "seconds": elapsed,
                },
            )
        )
    finally:
        link.close()


async def _publish_until(bus: ShmBus, rate: float, link: AsyncLink) -> tuple[list[int], float]:
    """Publish the workload until told to stop; return (per-topic counts, seconds)."""
    publish = bus.publish_nowait
    mono_ns = time.monotonic_ns
    counts = [0] * DECKY_IDS
    sources = [f"10.7.{i // 250}.{i % 250 + 1}" for i in range(DECKY_IDS)]
    seq = 0
    started = time.monotonic()
    base, base_seq = started, 0  # pacing reference point
    tick_at, tick_seq = started, 0

    def tick(now: float) -> None:
        nonlocal tick_at, tick_seq
        link.send(("tick", {"rate": (seq - tick_seq) / (now - tick_at), "published": seq}))
        tick_at, tick_seq = now, seq

    stop = link.stopped
    while not stop.is_set():
        now = time.monotonic()
        if rate > 0:
            due = base_seq + int((now - base) * rate)
            if due - seq > rate * _MAX_LAG:  # cannot keep up: do not burst
                base, base_seq = now, seq
                due = seq + max(1, int(rate * _MAX_LAG))
            batch = min(due - seq, _PACED_BATCH_MAX)
        else:
            batch = _FLOOD_BATCH
        for _ in range(batch):
            i = seq % DECKY_IDS
            publish(
                TOPICS[i],
                {
                    "decky": i,
                    "seq": seq,
                    "t_ns": mono_ns(),
                    "src": sources[i],
                    "dst": "10.7.255.254",
                    "sport": 32768 + (seq & 0x3FFF),
                    "dport": 443,
                    "proto": "tcp",
                    "bytes": 64 + (seq * 37) % 1400,
                },
                event_type="traffic",
            )
            counts[i] += 1
            seq += 1
        if now >= tick_at + 1.0:
            tick(time.monotonic())
        if rate > 0:
            delay = base + (seq + 1 - base_seq) / rate - time.monotonic()
            await asyncio.sleep(max(delay, 0.0))
        else:
            await asyncio.sleep(0)
    now = time.monotonic()
    if now - tick_at > 0.1:  # the last (partial) second, for the final table
        tick(now)
    return counts, now - started


class _LatencySketch:
    """The whole run's latency distribution, kept small and cheap to feed.

    Each second's samples arrive sorted; the sketch keeps ``POINTS`` evenly
    spaced quantiles of them, each weighted by how many samples it stands
    for, so feeding it is a C-speed slice (a per-sample Python loop here would
    stall the subscriber's event loop and show up in its own p99).
    """

    POINTS: Final = 500

    def __init__(self) -> None:
        self.values: list[int] = []
        self.weights: list[float] = []
        self.total = 0
        self.maximum: int | None = None

    def add_sorted(self, samples: Sequence[int]) -> None:
        count = len(samples)
        if not count:
            return
        step = max(1, count // self.POINTS)
        points = samples[step // 2 :: step]
        self.values.extend(points)
        self.weights.extend([count / len(points)] * len(points))
        self.total += count
        self.maximum = samples[-1] if self.maximum is None else max(self.maximum, samples[-1])

    def percentile(self, q: float) -> int | None:
        if not self.total:
            return None
        rank = q * self.total
        seen = 0.0
        for index in sorted(range(len(self.values)), key=self.values.__getitem__):
            seen += self.weights[index]
            if seen > rank:
                return self.values[index]
        return self.maximum


def _percentile(sorted_values: Sequence[int], q: float) -> int | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _us(ns: int | None) -> float | None:
    return None if ns is None else round(ns / 1000, 1)


@contextlib.asynccontextmanager
async def _open(bus: ShmBus, pattern: str) -> AsyncIterator[QueueSubscription]:
    sub = bus.subscribe(pattern)
    # ShmBus hands out QueueSubscriptions; the contract's Subscription type
    # does not declare statistics().
    assert isinstance(sub, QueueSubscription)
    try:
        yield sub
    finally:
        await sub.aclose()


@dataclass
class _Receiver:
    received: int = 0
    window: list[int] = field(default_factory=list)


def subscriber_process(link: BlockingLink, config: dict[str, Any]) -> None:
    """Entry point of a subscriber process."""
    asyncio.run(_subscriber(link, config))


async def _subscriber(pipe: BlockingLink, config: dict[str, Any]) -> None:
    link = AsyncLink(pipe)
    state = _Receiver()
    sketch = _LatencySketch()

    async def consume(sub: QueueSubscription) -> None:
        window = state.window
        mono_ns = time.monotonic_ns
        async for event in sub:
            stamp = event.payload.get("t_ns")
            if type(stamp) is int:
                window.append(max(mono_ns() - stamp, 0))
            state.received += 1

    def take_window() -> list[int]:
        samples = sorted(state.window)
        state.window.clear()
        sketch.add_sorted(samples)
        return samples

    try:
        bus = _bus_for(config)
        async with bus, _open(bus, config["pattern"]) as sub:
            consumer = asyncio.create_task(consume(sub))
            link.send(("ready", {"pid": os.getpid()}))
            last_tick, last_received = time.monotonic(), 0
            expected: int | None = None
            while True:
                timeout = max(last_tick + 1.0 - time.monotonic(), 0.0)
                try:
                    message = await link.recv(timeout)
                except TimeoutError:
                    now = time.monotonic()
                    samples = take_window()
                    stats = sub.statistics()
                    link.send(
                        (
                            "tick",
                            {
                                "rate": (state.received - last_received) / (now - last_tick),
                                "p50_us": _us(_percentile(samples, 0.50)),
                                "p99_us": _us(_percentile(samples, 0.99)),
                                "received": state.received,
                                "dropped": stats.dropped,
                                "queued": stats.queued,
                            },
                        )
                    )
                    last_tick, last_received = now, state.received
                    continue
                kind = kind_of(message)
                if kind == "start":  # report whole seconds of the run from now on
                    take_window()
                    last_tick, last_received = time.monotonic(), state.received
                    continue
                if kind == "drain":
                    expected = int(data_of(message)["expected"])
                    break
                if kind in ("stop", EOF):
                    break
            drained = expected is None or await _drain(sub, state, expected)
            take_window()
            stats = sub.statistics()
            bus_stats = bus.stats()
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
        link.send(
            (
                "final",
                {
                    "received": state.received,
                    "dropped": stats.dropped,
                    "queued": stats.queued,
                    "lapped": bus_stats["lapped"],
                    "corrupt": bus_stats["corrupt"],
                    "drained": drained,
                    "p50_us": _us(sketch.percentile(0.50)),
                    "p99_us": _us(sketch.percentile(0.99)),
                    "max_us": _us(sketch.maximum),
                },
            )
        )
    finally:
        link.close()


async def _drain(sub: QueueSubscription, state: _Receiver, expected: int) -> bool:
    """Wait until *expected* events are received or counted dropped, the queue
    is empty and the count has settled; False on timeout."""
    deadline = time.monotonic() + _DRAIN_TIMEOUT
    settled = -1
    while time.monotonic() < deadline:
        stats = sub.statistics()
        total = state.received + stats.dropped
        if total >= expected and stats.queued == 0:
            if total == settled:
                return True
            settled = total
        else:
            settled = -1
        await asyncio.sleep(0.05)
    return False


# ─── Parent side ─────────────────────────────────────────────────────────────


def remove_if_abandoned(name: str) -> bool:
    """Remove bus *name*'s files from /dev/shm if no live instance is attached
    (:func:`shmbus.cleanup`, which leaves a live bus alone). Returns False only
    if files of an abandoned bus remain."""
    try:
        removed = cleanup(name)
    except BusInUseError:
        log.info("bus %r: still attached by other live processes; left in place", name)
        return True
    except (OSError, ShmBusError) as exc:
        log.warning("bus %r: cannot remove the files left behind: %s", name, exc)
        return False
    if removed:
        log.info("bus %r: removed files left behind", name)
    return True


class _BusUnusable(Exception):
    """The bus cannot be created or joined (name, geometry, permissions)."""


class _Child(Child):
    """One of the demo's processes; a subscriber knows its pattern."""

    def __init__(
        self,
        label: str,
        target: Callable[[BlockingLink, dict[str, Any]], None],
        config: dict[str, Any],
        pattern: str | None = None,
    ) -> None:
        super().__init__(target, (config,), name=label)
        self.pattern = pattern

    @property
    def tick(self) -> dict[str, Any]:
        """Its latest once-a-second report."""
        tick: dict[str, Any] = self.latest.get("tick") or {}
        return tick

    @property
    def final(self) -> dict[str, Any] | None:
        """Its totals, once it sent them."""
        final: dict[str, Any] | None = self.latest.get("final")
        return final


class _Console:
    """The live table: redrawn in place on a terminal, one block per second otherwise."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.lines_shown = 0
        encoding = getattr(out, "encoding", None) or "ascii"
        try:
            "µ".encode(encoding)
            self.us = "µs"
        except (UnicodeEncodeError, LookupError):
            self.us = "us"

    def bold(self, text: str) -> str:
        return f"\x1b[1m{text}\x1b[0m" if self.tty else text

    def red(self, text: str) -> str:
        return f"\x1b[31m{text}\x1b[0m" if self.tty else text

    def show(self, lines: list[str]) -> None:
        if self.tty:
            parts = [f"\x1b[{self.lines_shown}A\r"] if self.lines_shown else []
            parts.extend(f"{line}\x1b[K\n" for line in lines)
            parts.append("\x1b[J")
            self.lines_shown = len(lines)
            self.out.write("".join(parts))
        else:
            self.out.write("\n".join(lines) + "\n\n")
        self.out.flush()

    def write(self, lines: list[str]) -> None:
        self.lines_shown = 0
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()


def _fmt(value: float | None, spec: str = "") -> str:
    if value is None:
        return "-"
    if not spec:  # latencies: one decimal below 1000, then whole numbers
        spec = ".1f" if value < 1000 else ",.0f"
    return format(value, spec)


class _Demo:
    def __init__(self, args: argparse.Namespace, out: TextIO) -> None:
        try:
            self.name: str = validate_bus_name(args.bus or f"demo-{os.getpid()}")
        except ValueError as exc:
            raise _BusUnusable(str(exc)) from None
        self.rate = float(args.rate)
        self.seconds = float(args.seconds)
        self.queue_size = int(args.queue_size)
        self.capacity = int(args.capacity) << 20
        self.console = _Console(out)
        self.children: list[_Child] = []
        self.anchor: ShmBus | None = None
        self.joined = False

    # ── Children ──

    def _config(self, **extra: Any) -> dict[str, Any]:
        return {
            "bus": self.name,
            "capacity": self.capacity,
            "queue_size": self.queue_size,
            **extra,
        }

    async def _until(
        self, what: str, done: Callable[[_Child], bool], children: list[_Child], timeout: float
    ) -> None:
        await await_all(children, done, time.monotonic() + timeout, what, every=_POLL)

    @property
    def publisher(self) -> _Child:
        return self.children[0]

    @property
    def subscribers(self) -> list[_Child]:
        return self.children[1:]

    def stop_children(self, grace: float) -> None:
        """Ask every child to stop, then terminate and kill the ones that do not."""
        stop_all(self.children, grace)

    # ── Run ──

    async def run(self) -> dict[str, Any]:
        try:
            self.anchor = _bus_for(self._config())
            await self.anchor.connect()
        except (ShmBusError, ValueError, OSError) as exc:
            raise _BusUnusable(str(exc)) from None
        self.joined = True
        try:
            self.children.append(
                _Child("publisher", publisher_process, self._config(rate=self.rate))
            )
            for index, pattern in enumerate(PATTERNS, 1):
                config = self._config(pattern=pattern)
                self.children.append(
                    _Child(f"subscriber-{index}", subscriber_process, config, pattern)
                )
            for child in self.children:
                child.start()
            await self._until(
                "the children to start",
                lambda c: "ready" in c.latest,
                self.children,
                _READY_TIMEOUT,
            )
            for child in self.children:
                child.send("start")
            started = time.monotonic()
            second = 0.0
            while second < self.seconds:
                second = min(second + 1, self.seconds)
                if second == self.seconds:
                    await self._sleep_until(started + second)
                    self.publisher.send("stop")
                # Redraw just after the children's once-a-second reports.
                await self._sleep_until(started + second + _RENDER_DELAY)
                self.console.show(self._table(second))
            await self._until(
                "the publisher's totals",
                lambda c: c.final is not None,
                [self.publisher],
                _FINAL_TIMEOUT,
            )
            assert self.publisher.final is not None
            per_topic: dict[str, int] = self.publisher.final["per_topic"]
            expected = {
                child.name: sum(
                    n for topic, n in per_topic.items() if matches(str(child.pattern), topic)
                )
                for child in self.subscribers
            }
            for child in self.subscribers:
                child.send(("drain", {"expected": expected[child.name]}))
            await self._until(
                "the subscribers' totals",
                lambda c: c.final is not None,
                self.subscribers,
                _DRAIN_TIMEOUT + _FINAL_TIMEOUT,
            )
            self.stop_children(_STOP_GRACE)
            return self._summary(expected)
        except BaseException:
            self.stop_children(1.0)
            raise
        finally:
            await self.close_anchor()

    async def _sleep_until(self, when: float) -> None:
        while (left := when - time.monotonic()) > 0:
            self._check_alive()
            await asyncio.sleep(min(left, 0.1))
        self._check_alive()  # and their latest reports are in

    def _check_alive(self) -> None:
        """Read what the children sent; ChildFailed if one ended early."""
        for child in self.children:
            if child.pump() and child.final is None:
                raise ChildFailed(child.describe("exited early"))

    async def close_anchor(self) -> None:
        if self.anchor is not None:
            anchor, self.anchor = self.anchor, None
            await anchor.close()

    # ── Output ──

    def _table(self, elapsed: float) -> list[str]:
        us = self.console.us
        target = "flood" if self.rate == 0 else f"{self.rate:,.0f} ev/s"
        pub = self.publisher.tick
        lines = [
            self.console.bold(
                f"shmbus demo  bus {self.name!r}  target {target}  t={elapsed:g}/{self.seconds:g} s"
            ),
            f"publisher: {_fmt(pub.get('rate'), ',.0f'):>9} ev/s   "
            f"published {pub.get('published', 0):,}",
            f"  {'pattern':<16} {'ev/s':>9} {'p50 ' + us:>10} {'p99 ' + us:>10} "
            f"{'received':>11} {'dropped':>9}",
        ]
        for child in self.subscribers:
            s = child.tick
            dropped = f"{s.get('dropped', 0):>9,}"
            if s.get("dropped"):
                dropped = self.console.red(dropped)
            lines.append(
                f"  {child.pattern:<16} {_fmt(s.get('rate'), ',.0f'):>9} "
                f"{_fmt(s.get('p50_us')):>10} {_fmt(s.get('p99_us')):>10} "
                f"{s.get('received', 0):>11,} {dropped}"
            )
        return lines

    def _summary(self, expected: dict[str, int]) -> dict[str, Any]:
        publisher = self.publisher.final
        assert publisher is not None
        published = int(publisher["published"])
        subscribers = []
        ok = True
        for child in self.subscribers:
            final = child.final
            assert final is not None and child.pattern is not None
            matches_all = all(matches(child.pattern, topic) for topic in TOPICS)
            accounted = final["received"] + final["dropped"]
            want = expected[child.name]
            # A lapped reader counts the whole gap as dropped for every
            # subscription (the topics are gone), so a narrow pattern may
            # count more than it matched; it must never count fewer.
            good = accounted == want if matches_all else accounted >= want
            ok = ok and good and bool(final["drained"])
            subscribers.append(
                {
                    "pattern": child.pattern,
                    "matches_all": matches_all,
                    "matching_published": want,
                    "received": final["received"],
                    "dropped": final["dropped"],
                    "lapped": final["lapped"],
                    "corrupt": final["corrupt"],
                    "accounted": good,
                    "p50_us": final["p50_us"],
                    "p99_us": final["p99_us"],
                    "max_us": final["max_us"],
                }
            )
        return {
            "bus": self.name,
            "rate": self.rate,
            "seconds": round(float(publisher["seconds"]), 3),
            "published": published,
            "publish_errors": publisher["publish_errors"],
            "publish_rate": round(published / max(float(publisher["seconds"]), 1e-9), 1),
            "subscribers": subscribers,
            "ok": ok,
        }

    def print_summary(self, summary: dict[str, Any]) -> None:
        us = self.console.us
        lines = [
            "",
            self.console.bold(
                f"summary: published {summary['published']:,} events in "
                f"{summary['seconds']:.1f} s ({summary['publish_rate']:,.0f} ev/s), "
                f"{summary['publish_errors']} publish errors"
            ),
            f"  {'pattern':<16} {'matching':>10} {'received':>10} {'dropped':>9} "
            f"{'recv+drop':>10}  {'check':<9} {'p50 ' + us:>9} {'p99 ' + us:>9} {'max ' + us:>9}",
        ]
        for sub in summary["subscribers"]:
            total = sub["received"] + sub["dropped"]
            check = "==" if total == sub["matching_published"] else ">="
            check += " ok" if sub["accounted"] else " FAIL"
            lines.append(
                f"  {sub['pattern']:<16} {sub['matching_published']:>10,} {sub['received']:>10,} "
                f"{sub['dropped']:>9,} {total:>10,}  {check:<9} {_fmt(sub['p50_us']):>9} "
                f"{_fmt(sub['p99_us']):>9} {_fmt(sub['max_us']):>9}"
            )
        lines.append(
            "result: every event published was received or counted as dropped"
            if summary["ok"]
            else "result: FAILED: events unaccounted for (see the check column)"
        )
        lines.append("SUMMARY " + json.dumps(summary, sort_keys=True))
        self.console.write(lines)

    # ── Last resort ──

    def cleanup(self) -> bool:
        """Synchronous clean-up for any exit: no child alive, no file left.

        Returns False if files of the bus remain that nobody uses.
        """
        self.stop_children(1.0)
        if self.anchor is not None:
            anchor, self.anchor = self.anchor, None
            with contextlib.suppress(Exception):
                asyncio.run(anchor.close())
        # A bus we never joined (it could not be used) is not ours to sweep.
        return not self.joined or remove_if_abandoned(self.name)


def main(args: argparse.Namespace) -> int:
    """Run the demo with parsed *args*; return the exit status."""
    out = sys.stdout
    demo: _Demo | None = None
    status = 1
    terminated = False

    async def run() -> dict[str, Any]:
        nonlocal demo, terminated
        task = asyncio.current_task()
        assert task is not None

        def on_sigterm() -> None:
            nonlocal terminated
            terminated = True
            task.cancel()

        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)
        demo = _Demo(args, out)
        return await demo.run()

    try:
        summary = asyncio.run(run())
        assert demo is not None
        demo.print_summary(summary)
        status = 0 if summary["ok"] else 1
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        status = 130
    except asyncio.CancelledError:
        if not terminated:
            raise
        sys.stderr.write("terminated\n")
        status = 143
    except ChildFailed as exc:
        sys.stderr.write(f"shmbus demo: {exc}\n")
        status = 1
    except _BusUnusable as exc:
        sys.stderr.write(f"shmbus demo: cannot use the bus: {exc}\n")
        status = 2
    finally:
        # Usually a no-op (run() stopped everything); after a second Ctrl-C
        # it is the only clean-up, and a third must not cut it short.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if demo is not None and not demo.cleanup():
                sys.stderr.write(f"shmbus demo: files of bus {demo.name!r} remain in {SHM_DIR}\n")
                status = status or 1
        finally:
            signal.signal(signal.SIGINT, previous)
        sys.stdout.flush()
    return status


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(processName)s %(name)s: %(message)s")
    sys.exit(main(_build_parser().parse_args()))
