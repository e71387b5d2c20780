"""Fault injection across real processes, for the single-writer rings.

Publishers SIGSTOPped (at random points, and mid-record), SIGKILLed at every
step of their write path and at random moments, hit by signal storms (a
no-op handler, and a SIGALRM handler that raises); event loops watched
while the bus's other processes are stopped and killed; subscribers killed;
every process of a bus killed; bus-segment headers corrupted; ring files
scribbled on.

Every process is a spawned interpreter (:mod:`shmbus_tools.children`); the
child-side code is in :mod:`fault_agents` (and :mod:`agents`). Synchronisation is by handshake
(a child reports where it stopped) or by bounded polling with a deadline.
Figures are recorded (:mod:`figures`) for docs/RELIABILITY.md; bounds here
are generous hang guards, never timing claims.

The books kept everywhere, per publisher (one publisher = one bus instance =
one ring; each event carries its publisher's id and counter, see
:func:`fault_agents.make_payload`):

* **nothing that returned is lost**: every event whose ``publish_nowait``
  returned is delivered to a catch-all subscriber process, in its
  publisher's order, once, with the payload it was published with;
* **conservation**: delivered + dropped == published, exactly (these tests
  size rings and queues so that nothing is dropped, so dropped is 0);
* **nobody waits**: a publisher that was not itself stopped never spends
  :data:`NEVER_WAITS` in one ``publish_nowait`` call, whatever the other
  processes are doing (stopped mid-record, killed, interrupted).
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import random
import signal
import struct
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import agents
import fault_agents
import figures
import psutil
import pytest
from conftest import SMALL_RING, new_bus_name
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from shmbus_tools.children import Agent, ChildFailed, running

import shmbus._core.reader
from shmbus import ShmBus
from shmbus._core.inspection import RingInfo, read_bus
from shmbus._core.layout import (
    LAYOUT_VERSION,
    OFF_SLEEP_FLAGS,
    RING_OFFSET,
    W_WRITE_CURSOR,
)
from shmbus._core.leftovers import cleanup
from shmbus._core.shmfiles import bus_file_paths, segment_path

#: Hang guard for a child to finish its part (the box is shared and slow).
FINISH = 60.0
#: The longest a single ``publish_nowait`` call of a publisher that was not
#: itself stopped may take. Every stop here lasts 0.3 s or more, so a
#: publisher that waited for a stopped one would take longer; a descheduled
#: but unhindered call takes milliseconds.
NEVER_WAITS = 0.2
#: Long forms of the storms and of the random kills: SHMBUS_LONG=1.
LONG = os.environ.get("SHMBUS_LONG") == "1"
#: Rings no subscriber here is lapped in (every test publishes far less, or
#: paces itself), with small events.
ROOMY = {"capacity": 4 << 20, "max_event_size": 4096}
#: A subscriber queue no test here fills.
BIG_QUEUE = {"queue_size": 1 << 20}
SUBSCRIBER = {**ROOMY, **BIG_QUEUE}
#: Quiet time after which a subscriber's tally is taken.
QUIET = 0.3


pytestmark = pytest.mark.usefixtures("no_resource_tracker_left")


@pytest.fixture(autouse=True)
def _remove_what_killed_processes_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """A bus whose processes were all killed keeps its files: remove them
    once the test is over (its agents are dead by then)."""
    name = request.getfixturevalue("bus_name") if "bus_name" in request.fixturenames else None
    yield
    if name is not None:
        cleanup(name)


# ─── Helpers ────────────────────────────────────────────────────────────────


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.005)


def process_state(pid: int) -> str:
    """The state letter of process *pid* in /proc (``T``: stopped)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def wait_stopped(pid: int) -> None:
    wait_until(lambda: process_state(pid) == "T", f"pid {pid} to be stopped")


def ring_files(name: str) -> set[str]:
    return {path for path in bus_file_paths(name) if ":ring." in path}


def rings_of(name: str, pid: int) -> list[RingInfo]:
    return [ring for ring in read_bus(name).rings if ring.writer_pid == pid]


def slot_of(name: str, pid: int) -> int:
    """The slot in which process *pid* has an instance of bus *name*."""
    slots = [s.slot for s in read_bus(name).instances if s.pid == pid]
    assert len(slots) == 1, f"pid {pid} has instances in slots {slots}"
    return slots[0]


@contextlib.contextmanager
def mapped(path: str) -> Iterator[mmap.mmap]:
    """An independent read-write mapping of a file of a bus."""
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        yield mm


def tally(subscriber: Agent, expected: int, timeout: float = 30.0) -> dict[str, Any]:
    """The subscriber's tally once *expected* events are in and it is quiet."""
    subscriber.send(("tally", expected, QUIET, timeout))
    report: dict[str, Any] = subscriber.recv(timeout + FINISH)
    return report


def whole(report: dict[str, Any], pub: int) -> list[tuple[int, int]]:
    """Publisher *pub*'s counters the subscriber received, as runs."""
    return [tuple(run) for run in report["runs"].get(pub, [])]


def delivered_count(report: dict[str, Any], pub: int) -> int:
    return sum(end - first for first, end in whole(report, pub))


def assert_clean(report: dict[str, Any]) -> None:
    """No event out of order or twice, none mangled, none dropped."""
    assert report["disorder"] == {}, report["disorder"]
    assert report["invalid"] == [], report["invalid"]
    assert report["dropped"] == 0, (report["dropped"], report["evicted"], report["lost"])
    assert report["bus"]["corrupt"] == 0, report["bus"]


def waits(publisher: dict[str, Any], own_stops: list[tuple[float, float]]) -> list[float]:
    """Durations of the publisher's slow calls that did not overlap one of
    its own stops: the times it waited for something else."""
    return [
        took
        for start, took in publisher["slow_calls"]
        if not any(start < cont and start + took > stop for stop, cont in own_stops)
    ]


def close_all(*agents_: Agent) -> None:
    """Tell every agent to close, one after the other (the last one out
    removes the bus's files)."""
    for agent in agents_:
        agent.send("close")
        agent.expect("closed", FINISH)


def _spin(seconds: float) -> None:
    """Busy-wait: a kill lands at a random point of the victim's loop (a
    sleep's wake-up jitter would cluster the kills)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


# ─── Publishers stopped (SIGSTOP) ──────────────────────────────────────────


def run_stop_storm(name: str, *, seconds: float, pause: tuple[float, float], seed: int) -> None:
    """Three publisher processes publish continuously (paced, so that one
    subscriber process keeps up); the test SIGSTOPs one at a time, at a
    random point, for *pause* seconds, again and again for *seconds*."""
    print(f"stop storm: seed {seed}")  # shown if the test fails
    rng = random.Random(seed)
    subscriber = Agent(fault_agents.tally_subscriber, name, bus_kwargs=SUBSCRIBER)
    publishers = [
        Agent(fault_agents.steady_publisher, name, pub, burst=50, pause=0.002, bus_kwargs=ROOMY)
        for pub in (1, 2, 3)
    ]
    stops: dict[int, list[tuple[float, float]]] = {pub: [] for pub in (1, 2, 3)}
    with running(subscriber, *publishers):
        for agent in (subscriber, *publishers):
            agent.expect("ready", FINISH)
        for agent in publishers:
            agent.send("go")
        end = time.monotonic() + seconds
        order: list[int] = []
        while time.monotonic() < end:
            if not order:
                order = rng.sample([1, 2, 3], 3)  # each is stopped, in random turns
            pub = order.pop()
            victim = publishers[pub - 1]
            _spin(rng.uniform(0.0, 0.05))
            stopped_at = time.monotonic()
            os.kill(victim.pid, signal.SIGSTOP)
            time.sleep(rng.uniform(*pause))
            os.kill(victim.pid, signal.SIGCONT)
            stops[pub].append((stopped_at, time.monotonic()))
        for agent in publishers:
            agent.send("stop")
        reports = {pub: agent.recv(FINISH) for pub, agent in enumerate(publishers, 1)}
        seen = tally(subscriber, sum(r["published"] for r in reports.values()))
        close_all(*publishers, subscriber)
    all_waits = {pub: waits(reports[pub], stops[pub]) for pub in reports}
    figures.record(
        "stop-storm[long]" if LONG else "stop-storm",
        {
            "seconds": seconds,
            "stops": {pub: len(s) for pub, s in stops.items()},
            "published": {pub: r["published"] for pub, r in reports.items()},
            "longest_wait_s": round(max(max(w, default=0.0) for w in all_waits.values()), 4),
            "dropped": seen["dropped"],
        },
    )
    for pub, report in reports.items():
        assert stops[pub], f"publisher {pub} was never stopped"
        assert (report["errors"], report["bus"]["publish_errors"]) == (0, 0), report
        assert max(all_waits[pub], default=0.0) < NEVER_WAITS, (pub, all_waits[pub], stops[pub])
        assert whole(seen, pub) == [(0, report["published"])], (pub, whole(seen, pub))
    assert_clean(seen)
    assert seen["delivered"] + seen["dropped"] == sum(r["published"] for r in reports.values())


def test_publishers_stopped_at_random_points_delay_no_other_publisher_and_lose_nothing(
    bus_name: str,
) -> None:
    """SIGSTOP storm: three publisher processes publish continuously; each
    in turn is SIGSTOPped at a random point of its loop (inside a publish
    or between two) for 0.3-1 s, again and again for 4 s. (Shorter stops
    than the 1-2 s of the issue, to fit the suite's time budget; the long
    form below has them.) No publisher ever waits for a stopped one, no
    publish fails, and a subscriber process gets every event of every
    publisher in its order, intact, none dropped."""
    run_stop_storm(bus_name, seconds=4.0, pause=(0.3, 1.0), seed=random.randrange(1 << 30))


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="long form: set SHMBUS_LONG=1")
def test_publishers_stopped_for_seconds_at_random_points_delay_no_other_publisher_long(
    bus_name: str,
) -> None:
    """The SIGSTOP storm with 1-2 s stops, for 30 s (SHMBUS_LONG=1)."""
    run_stop_storm(bus_name, seconds=30.0, pause=(1.0, 2.0), seed=random.randrange(1 << 30))


def test_a_publisher_stopped_mid_record_delays_no_other_process(bus_name: str) -> None:
    """A publisher process SIGSTOPs itself mid-record (record written, not
    committed). While it is stopped, another publisher process completes
    1000 publishes without waiting and a subscriber process receives all of
    them (and the stopped one's earlier events); once continued, the stopped
    publisher's event is delivered too."""
    stopped = Agent(
        fault_agents.doomed_publisher,
        bus_name,
        100,
        "mid-record",
        before=5,
        stop=True,
        bus_kwargs=ROOMY,
    )
    other = Agent(
        fault_agents.steady_publisher, bus_name, 1, count=1000, burst=1000, bus_kwargs=ROOMY
    )
    subscriber = Agent(fault_agents.tally_subscriber, bus_name, bus_kwargs=SUBSCRIBER)
    with running(subscriber, stopped, other):
        for agent in (subscriber, stopped, other):
            agent.expect("ready", FINISH)
        stopped.send("go")
        stopped.expect(("stopping", "mid-record"), FINISH)
        wait_stopped(stopped.pid)
        other.send("go")
        report = other.recv(FINISH)
        while_stopped = tally(subscriber, 5 + 1000)
        assert process_state(stopped.pid) == "T", "the stopped publisher was continued"
        os.kill(stopped.pid, signal.SIGCONT)
        assert stopped.recv(FINISH)["published"] == 6
        after = tally(subscriber, 5 + 1000 + 1)
        close_all(stopped, other, subscriber)
    assert (report["published"], report["errors"], report["bus"]["publish_errors"]) == (1000, 0, 0)
    assert report["max_call"] < NEVER_WAITS, report["max_call"]
    assert whole(while_stopped, 1) == [(0, 1000)]
    assert whole(while_stopped, 100) == [(0, 5)]
    assert_clean(while_stopped)
    assert whole(after, 100) == [(0, 6)]
    assert_clean(after)


# ─── Publishers killed (SIGKILL) ───────────────────────────────────────────


#: Events the doomed publisher publishes before the one it dies in (its
#: first publish is the one that dies at a FIRST_PUBLISH_POINTS point).
BEFORE = 25
#: How long the doomed publisher holds still at its crash point before the
#: kill: well over NEVER_WAITS.
HOLD = 0.5


@pytest.mark.parametrize("point", fault_agents.CRASH_POINTS)
def test_a_publisher_killed_at_each_step_of_its_write_path_loses_nothing_that_returned(
    bus_name: str, point: str
) -> None:
    """A publisher process is SIGKILLed at crash point *point* of its write
    path (see :mod:`fault_agents`), after holding still there for
    :data:`HOLD` s, while another publisher process publishes continuously:
    that publisher never waits, not before the kill and not after; a
    subscriber process receives every event of the dead publisher whose
    publish returned (and the one it died in once it was committed) and
    every event of the other, in order, none dropped; and the dead
    publisher's ring file is removed once the subscriber has read it (an
    installer that died before its ring was LIVE, which no reader follows,
    by the subscriber's periodic sweep)."""
    before = 0 if point in fault_agents.FIRST_PUBLISH_POINTS else BEFORE
    victim = Agent(
        fault_agents.doomed_publisher, bus_name, 100, point, before=before, bus_kwargs=ROOMY
    )
    other = Agent(
        fault_agents.steady_publisher, bus_name, 1, burst=20, pause=0.001, bus_kwargs=ROOMY
    )
    subscriber = Agent(fault_agents.tally_subscriber, bus_name, bus_kwargs=SUBSCRIBER)
    with running(subscriber, victim, other):
        for agent in (subscriber, victim, other):
            agent.expect("ready", FINISH)
        other.send("go")
        wait_until(lambda: rings_of(bus_name, other.pid), "the other publisher's ring")
        victim.send("go")
        victim.expect(("dying", point), FINISH)
        own = [ring.path for ring in read_bus(bus_name).rings if ring.writer_pid == victim.pid]
        if point == "installing":  # the entry names no writer yet
            own = [ring.path for ring in read_bus(bus_name).rings if ring.state == "installing"]
        time.sleep(HOLD)  # a publisher waiting for it would wait this long
        victim.kill()
        time.sleep(0.2)
        other.send("stop")
        report = other.recv(FINISH)
        committed = before + (1 if point in fault_agents.COMMITTED_AT else 0)
        seen = tally(subscriber, report["published"] + committed)
        wait_until(
            lambda: not ring_files(bus_name) & set(own),
            f"the dead publisher's ring file to go ({read_bus(bus_name).rings})",
        )
        close_all(other, subscriber)
    assert victim.process.exitcode == -9
    assert len(own) == (0 if point == "before-ring" else 1), own
    assert (report["errors"], report["bus"]["publish_errors"]) == (0, 0), report
    assert report["max_call"] < NEVER_WAITS, report["slow_calls"]
    assert whole(seen, 100) == ([(0, committed)] if committed else [])
    assert whole(seen, 1) == [(0, report["published"])]
    assert_clean(seen)
    assert bus_file_paths(bus_name) == []


@dataclass
class KillTally:
    """Running totals over the random-kill trials."""

    trials: int = 0
    returned: int = 0
    delivered: int = 0
    committed_unreturned: int = 0
    early: int = 0


def run_random_kills(trials: int, seed: int, tmp_path: Path) -> KillTally:
    """*trials* times: a fresh publisher process publishing as fast as it
    can is SIGKILLed at a random moment (every other trial within the first
    5 ms of its publishing, when it creates its ring; the others after a
    random number of events), next to another publisher that publishes
    throughout. Each victim notes in a shared file how many of its publishes
    returned, after each one. Then: every returned event of every victim was
    delivered, plus at most the one it was killed in; the other publisher
    never waited and lost nothing; the victims' ring files are all removed."""
    print(f"random kills: seed {seed}")  # shown if the test fails
    rng = random.Random(seed)
    name = new_bus_name("random-kills")
    progress = fault_agents.Counters(str(tmp_path / "returned"), trials)
    totals = KillTally()
    subscriber = Agent(fault_agents.tally_subscriber, name, bus_kwargs=SUBSCRIBER)
    other = Agent(fault_agents.steady_publisher, name, 1, burst=20, pause=0.001, bus_kwargs=ROOMY)

    def new_victim(trial: int) -> Agent:
        return Agent(
            fault_agents.steady_publisher,
            name,
            1000 + trial,
            burst=1 << 30,
            progress_at=rng.randint(1, 2000) if trial % 2 else None,
            progress=(str(tmp_path / "returned"), trial),
            bus_kwargs=ROOMY,
        )

    victims = [new_victim(trial) for trial in range(trials)]
    try:
        with running(subscriber, other):
            subscriber.expect("ready", FINISH)
            other.expect("ready", FINISH)
            other.send("go")
            victims[0].start()
            for trial, victim in enumerate(victims):
                victim.expect("ready", FINISH)
                if trial + 1 < trials:
                    victims[trial + 1].start()  # boots while this trial runs
                victim.send("go")
                if trial % 2:
                    victim.expect("progress", FINISH)
                    _spin(rng.uniform(0, 0.003))
                else:
                    _spin(rng.uniform(0, 0.005))
                    totals.early += 1
                victim.kill()
                assert victim.process.exitcode == -9
            other.send("stop")
            report = other.recv(FINISH)
            returned = [progress[trial] for trial in range(trials)]
            seen = tally(subscriber, report["published"] + sum(returned))
            wait_until(
                lambda: len(ring_files(name)) == 1, "the killed publishers' ring files to go"
            )
            close_all(other, subscriber)
    finally:
        for victim in victims:
            victim.kill()
            victim.close()
        progress.close()
        cleanup(name)
    assert (report["errors"], report["bus"]["publish_errors"]) == (0, 0), report
    assert report["max_call"] < NEVER_WAITS, report["slow_calls"]
    assert whole(seen, 1) == [(0, report["published"])]
    assert_clean(seen)
    for trial, count in enumerate(returned):
        got = delivered_count(seen, 1000 + trial)
        assert whole(seen, 1000 + trial) == ([(0, got)] if got else []), trial
        assert count <= got <= count + 1, f"trial {trial}: {count} returned, {got} delivered"
        totals.trials += 1
        totals.returned += count
        totals.delivered += got
        totals.committed_unreturned += got - count
    return totals


def _record_kills(test_id: str, totals: KillTally) -> None:
    figures.record(
        test_id,
        {
            "trials": totals.trials,
            "killed_while_starting": totals.early,
            "returned": totals.returned,
            "delivered": totals.delivered,
            "committed_not_returned": totals.committed_unreturned,
        },
    )


def test_publishers_killed_at_random_moments_lose_nothing_that_returned(tmp_path: Path) -> None:
    """Six publisher processes, one per trial, SIGKILLed at random moments
    next to a publisher that keeps publishing (see :func:`run_random_kills`)."""
    totals = run_random_kills(6, random.randrange(1 << 30), tmp_path)
    _record_kills("random-kills[short]", totals)


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="long form: set SHMBUS_LONG=1")
def test_publishers_killed_at_random_moments_lose_nothing_that_returned_long(
    tmp_path: Path,
) -> None:
    """The same with 60 trials (SHMBUS_LONG=1)."""
    totals = run_random_kills(60, random.randrange(1 << 30), tmp_path)
    _record_kills("random-kills[long]", totals)


# ─── Signal storms ─────────────────────────────────────────────────────────

#: A ring that holds everything the storm publishes: no reader is ever
#: lapped, so any loss would be the signals' doing.
STORM_RING = {"capacity": 48 << 20, "max_event_size": 4096}
#: The most the storm's publisher publishes (about 160 bytes a record).
STORM_EVENTS = 250_000


def test_a_noop_signal_handler_hit_at_1khz_costs_no_event(bus_name: str) -> None:
    """A publisher process publishing as fast as it can and a subscriber
    process each have a SIGUSR1 handler that does nothing; the test sends
    both SIGUSR1 about every millisecond for 2 s. No publish raises or
    fails, and the subscriber receives every event, in order, none
    dropped (ring and queue are large enough that nothing else can drop)."""
    publisher = Agent(
        fault_agents.steady_publisher,
        bus_name,
        1,
        count=STORM_EVENTS,
        burst=100,
        noop_signal=signal.SIGUSR1,
        bus_kwargs=STORM_RING,
    )
    subscriber = Agent(
        fault_agents.tally_subscriber,
        bus_name,
        noop_signal=signal.SIGUSR1,
        bus_kwargs={**STORM_RING, **BIG_QUEUE},
    )
    with running(subscriber, publisher):
        subscriber.expect("ready", FINISH)
        publisher.expect("ready", FINISH)
        publisher.send("go")
        sent = 0
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            os.kill(publisher.pid, signal.SIGUSR1)
            os.kill(subscriber.pid, signal.SIGUSR1)
            sent += 1
            time.sleep(0.001)
        publisher.send("stop")
        report = publisher.recv(FINISH)
        seen = tally(subscriber, report["published"])
        close_all(publisher, subscriber)
    figures.record(
        "noop-signal-storm",
        {
            "signals_sent_each": sent,
            "publisher_handled": report["signals"],
            "subscriber_handled": seen["signals"],
            "published": report["published"],
            "delivered": seen["delivered"],
            "dropped": seen["dropped"],
        },
    )
    assert (report["errors"], report["bus"]["publish_errors"]) == (0, 0), report["first_error"]
    assert report["signals"] > sent // 4 and seen["signals"] > sent // 4, (sent, report, seen)
    assert whole(seen, 1) == [(0, report["published"])]
    assert_clean(seen)


#: The alarmed process's rings: small, so that creating one (on an
#: instance's first publish) takes well under the 0.7 ms between alarms,
#: yet big enough for the 3000 events (about 160 bytes a record) each of its
#: instances publishes: no reader is ever lapped in them.
ALARMED_RING = {"capacity": 512 << 10, "max_event_size": 4096}


def test_a_sigalrm_handler_that_raises_wedges_no_process(bus_name: str) -> None:
    """A process uses a SIGALRM timeout helper whose handler raises, every
    0.7 ms for 2 s, while it publishes, subscribes and unsubscribes, closes
    its instance and connects a new one in a loop, catching the exception
    around each call (:func:`fault_agents.alarmed_worker`). Afterwards:

    * it still publishes on its last instance, and subscribes and receives
      on a new one;
    * another process publishes 1000 events at full speed (no call waits)
      and a process that subscribes after the storm receives them all;
    * a subscriber process that was there throughout received every event
      whose publish returned, and of the interrupted ones (which may or may
      not have been committed) nothing else, each once, in order."""
    worker = Agent(
        fault_agents.alarmed_worker,
        bus_name,
        7,
        seconds=2.0,
        per_instance=3000,
        bus_kwargs=ALARMED_RING,
    )
    witness = Agent(fault_agents.tally_subscriber, bus_name, bus_kwargs=SUBSCRIBER)
    late = Agent(fault_agents.tally_subscriber, bus_name, lazy=True, bus_kwargs=SUBSCRIBER)
    bystander = Agent(
        fault_agents.steady_publisher, bus_name, 2, count=1000, burst=1000, bus_kwargs=ROOMY
    )
    host = ShmBus(bus_name, **SMALL_RING)  # keeps the bus while the worker comes and goes
    host.connect_sync()
    try:
        with running(witness, late, bystander, worker):
            witness.expect("ready", FINISH)
            late.expect("connected", FINISH)
            bystander.expect("ready", FINISH)
            worker.expect("ready", FINISH)
            worker.send("go")
            work = worker.recv(FINISH)
            # Its instances are all closed by now; those still attached were
            # left so by a connect or close that was interrupted.
            leaked = sum(1 for s in read_bus(bus_name).live_instances if s.pid == worker.pid)
            late.send("subscribe")
            late.expect("ready", FINISH)
            bystander.send("go")
            report = bystander.recv(FINISH)
            late_seen = tally(late, 1000)
            returned = {
                int(pub): attempts - len(work["maybe"][pub])
                for pub, attempts in work["attempts"].items()
            }
            seen = tally(witness, 1000 + sum(returned.values()))
            worker.send("close")
            worker.expect("closed", FINISH)
            close_all(bystander, late, witness)
    finally:
        host.close_sync()
    figures.record(
        "raising-sigalrm",
        {
            "alarms": work["alarms"],
            "calls": work["calls"],
            "interrupted": work["interrupted"],
            "instances": len(work["attempts"]),
            "instances_left_attached_by_interrupted_calls": leaked,
            "last_instance_still_receives": work["after"]["same_instance_receives"],
        },
    )
    # Whether the last instance's own subscriptions still work is left to
    # the deterministic tests below (a subscribe interrupted at the wrong
    # point breaks them: core bugs); a new instance's must.
    after = work["after"]
    assert (after["published"], after["new_instance_receives"], after["error"]) == (100, True, None)
    assert work["alarms"] > 1000 and work["interrupted"]["publish"] > 0, work
    assert (report["published"], report["errors"]) == (1000, 0), report
    assert report["max_call"] < NEVER_WAITS, report["max_call"]
    assert whole(late_seen, 2) == [(0, 1000)] and set(late_seen["runs"]) == {2}
    assert_clean(late_seen)
    assert whole(seen, 2) == [(0, 1000)]
    assert seen["disorder"] == {} and seen["invalid"] == [] and seen["dropped"] == 0
    for pub, attempts in work["attempts"].items():
        maybe = set(work["maybe"][pub])
        got = {n for first, end in whole(seen, int(pub)) for n in range(first, end)}
        missing = set(range(attempts)) - maybe - got
        assert not missing, f"publisher {pub}: returned but never delivered: {sorted(missing)[:10]}"
        assert got <= set(range(attempts)), f"publisher {pub}: delivered what it never published"




@pytest.mark.parametrize(
    ("call", "where"),
    [
        ("connect", "slot claim"),
        ("connect", "waker setup"),
        ("close", "reader stop"),
        ("close", "ring retirement"),
    ],
)
def test_a_connect_or_close_interrupted_by_a_raising_signal_handler_leaves_nothing_attached(
    bus_name: str, call: str, where: str
) -> None:
    """A process's only instance of a bus (it has published and subscribed)
    has its *call* interrupted by an exception raised at *where* (as a
    raising SIGALRM handler can, at any point), catches it and retries the
    call, then closes. While the process lives on, it holds nothing of the
    bus: no instance of it is attached, and, as it was the bus's last
    instance, the bus's files are gone."""
    child = Agent(fault_agents.interrupted_once, bus_name, call, where, bus_kwargs=SMALL_RING)
    with running(child):
        child.expect("closed", FINISH)
        files = bus_file_paths(bus_name)
        attached = (
            [s.slot for s in read_bus(bus_name).live_instances if s.pid == child.pid]
            if os.path.exists(segment_path(bus_name))
            else []
        )
        child.send("exit")
        assert child.join(FINISH) == 0
    assert attached == []
    assert files == []




@pytest.mark.parametrize(
    "where",
    [
        "following a ring it found",
        "scheduling its next step",
    ],
)
async def test_a_subscribe_interrupted_by_a_raising_signal_handler_leaves_the_reader_working(
    bus_name: str, where: str
) -> None:
    """An instance has a subscription and another publisher has just
    installed its ring when a ``subscribe()`` of the instance is
    interrupted by an exception raised as its reader is *where* (as a
    raising SIGALRM handler can, at any point). The subscription made
    before and one made afterwards both receive what both publishers
    publish from then on (and the one before, the new ring's first event)."""
    bus, first, second = (ShmBus(bus_name, **SMALL_RING) for _ in range(3))
    for instance in (bus, first, second):
        await instance.connect()
    try:
        first.publish_nowait("a.b", {"n": 0})
        before = bus.subscribe(">")
        await asyncio.sleep(0.05)  # the reader follows first's ring, and goes idle
        second.publish_nowait("a.b", {"n": 0})  # a new ring, not followed yet
        loop = asyncio.get_running_loop()
        call_soon = loop.call_soon
        followed = shmbus._core.reader._Followed

        def interrupted_call_soon(callback: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(callback, "__name__", "") == "_step":
                loop.call_soon = call_soon  # type: ignore[method-assign]
                raise fault_agents.Alarm
            return call_soon(callback, *args, **kwargs)

        def interrupted_follow(*args: Any, **kwargs: Any) -> Any:
            shmbus._core.reader._Followed = followed  # type: ignore[misc]
            raise fault_agents.Alarm

        if where == "scheduling its next step":
            loop.call_soon = interrupted_call_soon  # type: ignore[method-assign]
        else:
            shmbus._core.reader._Followed = interrupted_follow  # type: ignore[misc,assignment]
        try:
            with contextlib.suppress(fault_agents.Alarm):
                bus.subscribe("x.>")
        finally:
            loop.call_soon = call_soon  # type: ignore[method-assign]
            shmbus._core.reader._Followed = followed  # type: ignore[misc]
        after = bus.subscribe(">")
        first.publish_nowait("a.b", {"n": 1})
        second.publish_nowait("a.b", {"n": 2})
        # before also gets second's first event: second's ring is younger than it.
        for sub, expected in ((before, [0, 1, 2]), (after, [1, 2])):
            got = [(await asyncio.wait_for(anext(aiter(sub)), 3)).payload["n"] for _ in expected]
            assert sorted(got) == expected
    finally:
        for instance in (first, second, bus):
            await instance.close()


# ─── Event loops next to stopped and killed processes ──────────────────────

#: The most the probe's ticker may be late: generous (a busy 2-core box
#: deschedules a process for tens of ms); a wait for a stopped process
#: would be seconds.
LOOP_LAG_BOUND = 0.1
PROBE_RING = {"capacity": 1 << 20, "max_event_size": 4096}


def test_an_event_loop_never_waits_for_the_buses_stopped_or_killed_processes(
    bus_name: str,
) -> None:
    """A probe process runs a 1 ms ticker on its event loop while it loops
    over ``await bus.publish``, ``subscribe``/``aclose``, ``close`` and
    ``await connect()`` for 3 s; meanwhile the test SIGSTOPs (for 0.1-0.6 s)
    and SIGKILLs (then replaces) the bus's other publisher and subscriber
    processes at random. The ticker is never late by more than
    :data:`LOOP_LAG_BOUND` and no call of the probe holds its loop that
    long."""
    seed = random.randrange(1 << 30)
    print(f"loop lag: seed {seed}")  # shown if the test fails
    rng = random.Random(seed)
    probe = Agent(
        fault_agents.lag_probe, bus_name, 9, seconds=3.0, seed=seed, bus_kwargs=PROBE_RING
    )
    spawned: list[Agent] = []

    def new_other() -> Agent:
        if len(spawned) % 3 == 2:
            agent = Agent(fault_agents.tally_subscriber, bus_name, bus_kwargs=PROBE_RING)
        else:
            agent = Agent(
                fault_agents.steady_publisher,
                bus_name,
                len(spawned),
                burst=20,
                pause=0.002,
                bus_kwargs=PROBE_RING,
            )
        spawned.append(agent)
        return agent.start()

    def ready(agent: Agent) -> Agent:
        agent.expect("ready", FINISH)
        if agent.name == "steady_publisher":
            agent.send("go")
        return agent

    others: list[Agent] = []
    stopped = killed = 0
    try:
        with running(probe):
            others = [ready(agent) for agent in [new_other() for _ in range(3)]]
            probe.expect("ready", FINISH)
            probe.send("go")
            report = None
            deadline = time.monotonic() + FINISH
            while report is None:
                assert time.monotonic() < deadline, "the probe never reported"
                time.sleep(rng.uniform(0.05, 0.2))
                victim = rng.choice(others)
                if rng.random() < 0.7:
                    os.kill(victim.pid, signal.SIGSTOP)
                    stopped += 1
                    time.sleep(rng.uniform(0.1, 0.6))
                    os.kill(victim.pid, signal.SIGCONT)
                else:
                    victim.kill()
                    killed += 1
                    others.remove(victim)
                    others.append(ready(new_other()))
                try:
                    report = probe.recv(0.001)
                except ChildFailed:
                    if not probe.process.is_alive():
                        raise
            for agent in spawned:
                agent.kill()
            probe.send("close")  # the last instance: removes the bus
            probe.expect("closed", FINISH)
    finally:
        for agent in spawned:
            agent.kill()
            agent.close()
    figures.record(
        "loop-lag",
        {
            "max_late_ms": round(report["max_late"] * 1000, 2),
            "ticks": report["ticks"],
            "ops": report["ops"],
            "blocked_ms": {op: round(s * 1000, 2) for op, s in report["blocked"].items()},
            "stops": stopped,
            "kills": killed,
        },
    )
    assert stopped + killed > 0
    assert report["ops"]["publish"] and report["ops"]["subscribe"] and report["ops"]["connect"]
    assert report["max_late"] < LOOP_LAG_BOUND, report
    for op in ("publish", "subscribe", "close"):
        assert report["blocked"][op] < LOOP_LAG_BOUND, report


# ─── A subscriber process dies ─────────────────────────────────────────────


async def test_a_killed_subscriber_process_is_reported_dead_by_read_bus(bus_name: str) -> None:
    """Once a subscriber process is SIGKILLed, read_bus still lists its slot
    (until someone reuses it) but reports the instance dead, and the bus
    itself live (this process is attached)."""
    host = ShmBus(bus_name, **SMALL_RING)
    await host.connect()
    try:
        victim = Agent(agents.subscriber, bus_name, ">", bus_kwargs=SMALL_RING)
        with running(victim):
            victim.expect("ready", FINISH)
            slot = slot_of(bus_name, victim.pid)
            assert {s.slot: s.alive for s in read_bus(bus_name).instances}[slot] is True
            victim.kill()
        info = read_bus(bus_name)
        states = {s.slot: (s.pid, s.alive) for s in info.instances}
        assert states[slot] == (victim.pid, False)
        assert info.live
    finally:
        await host.close()


async def test_publishers_complete_after_a_sleeping_subscriber_is_killed(bus_name: str) -> None:
    """A subscriber process that sleeps on its wake-up FIFO (sleep flag set)
    is SIGKILLed: a publisher process still completes all its publishes
    without an error, and the dead reader's sleep flag is cleared by the
    first publish that finds it."""
    n = 5000
    host = ShmBus(bus_name, **SMALL_RING)
    await host.connect()
    try:
        victim = Agent(agents.subscriber, bus_name, ">", bus_kwargs=SMALL_RING)
        publisher = Agent(agents.publisher, bus_name, 1, ["x.y"], n, bus_kwargs=SMALL_RING)
        with running(victim, publisher):
            victim.expect("ready", FINISH)
            publisher.expect("ready", FINISH)
            flag = OFF_SLEEP_FLAGS + slot_of(bus_name, victim.pid)
            with mapped(segment_path(bus_name)) as mm:
                wait_until(lambda: mm[flag] == 1, "the idle subscriber to go to sleep")
                victim.kill()
                assert mm[flag] == 1
                publisher.send("go")
                report = publisher.recv(FINISH)
                assert mm[flag] == 0
        assert report["published"] == n
        assert report["bus"]["published"] == n
        assert report["bus"]["publish_errors"] == 0
    finally:
        await host.close()


async def test_a_killed_subscriber_is_owed_nothing_a_closing_publisher_removes_its_ring(
    bus_name: str,
) -> None:
    """A subscriber process is killed before a publisher process installs
    its ring: the dead reader never maps that ring, but it is owed nothing,
    so the publisher's close removes its ring file at once (a live reader
    that had not mapped it yet would keep it)."""
    host = ShmBus(bus_name, **SMALL_RING)
    await host.connect()
    try:
        victim = Agent(agents.subscriber, bus_name, ">", bus_kwargs=SMALL_RING)
        publisher = Agent(agents.publisher, bus_name, 1, ["x.y"], 10, bus_kwargs=SMALL_RING)
        with running(victim, publisher):
            victim.expect("ready", FINISH)
            publisher.expect("ready", FINISH)  # attached: it cannot take the dead one's slot
            victim.kill()
            publisher.send("go")
            assert publisher.recv(FINISH)["published"] == 10
            assert publisher.join(FINISH) == 0
        assert ring_files(bus_name) == set()
        assert any(":wake." in path for path in bus_file_paths(bus_name))
    finally:
        await host.close()


async def test_the_last_live_process_removes_the_files_of_a_bus_with_a_killed_subscriber(
    bus_name: str,
) -> None:
    """A killed subscriber leaves its slot and wake-up FIFO behind; when the
    last live process closes, every file of the bus is gone all the same."""
    host = ShmBus(bus_name, **SMALL_RING)
    await host.connect()
    try:
        victim = Agent(agents.subscriber, bus_name, ">", bus_kwargs=SMALL_RING)
        with running(victim):
            victim.expect("ready", FINISH)
            victim.kill()
        assert any(":wake." in path for path in bus_file_paths(bus_name))
    finally:
        await host.close()
    assert bus_file_paths(bus_name) == []


# ─── Every process of a bus dies ───────────────────────────────────────────


@contextlib.contextmanager
def bus_killed_mid_publish(name: str) -> Iterator[list[str]]:
    """A bus whose every process was SIGKILLed: a publisher mid-record (a
    record written past its ring's commit point) and a subscriber (its FIFO
    left). Yields the files left in /dev/shm."""
    subscriber = Agent(agents.subscriber, name, ">", bus_kwargs=SMALL_RING)
    doomed = Agent(
        fault_agents.doomed_publisher, name, 1, "mid-record", before=3, bus_kwargs=SMALL_RING
    )
    with running(subscriber, doomed):
        subscriber.expect("ready", FINISH)
        doomed.expect("ready", FINISH)
        doomed.send("go")
        doomed.expect(("dying", "mid-record"), FINISH)
        subscriber.kill()
        doomed.kill()
    left = bus_file_paths(name)
    assert not read_bus(name).live, "a killed process still holds the bus"
    yield left


async def test_connect_rebuilds_a_bus_whose_processes_all_died_mid_publish(
    bus_name: str,
) -> None:
    """After every process of a bus was killed, a publisher mid-record among
    them, the next connect() rebuilds the bus: the dead publisher's ring and
    the dead subscriber's FIFO are gone, no ring is listed, and pub/sub
    works at once; its close removes every file."""
    with bus_killed_mid_publish(bus_name) as left:
        assert len([path for path in left if ":ring." in path]) == 1, left
        bus = ShmBus(bus_name, **SMALL_RING)
        await bus.connect()
        try:
            info = read_bus(bus_name)
            assert info.rings == ()
            assert [s.pid for s in info.instances] == [os.getpid()]
            assert bus_file_paths(bus_name) == [segment_path(bus_name)]
            async with bus.subscribe("a.>") as sub:
                await bus.publish("a.b", {"n": 1})
                event = await asyncio.wait_for(anext(aiter(sub)), FINISH)
            assert event.payload == {"n": 1}
        finally:
            await bus.close()
        assert bus_file_paths(bus_name) == []


def test_cleanup_removes_and_reports_every_file_of_a_bus_killed_mid_publish(
    bus_name: str,
) -> None:
    """shmbus.cleanup(name) on a bus whose processes were all killed (one
    mid-record) removes the segment, the ring file and the FIFO, and
    returns exactly those paths."""
    with bus_killed_mid_publish(bus_name) as left:
        assert any(":ring." in path for path in left)
        assert any(":wake." in path for path in left)
        assert segment_path(bus_name) in left
        assert sorted(cleanup(bus_name)) == sorted(left)
        assert bus_file_paths(bus_name) == []


def _waits_for_the_attach_lock(pid: int, name: str) -> bool:
    """True once process *pid* has the bus's segment open and one of its
    threads sleeps (connect() attaches in a worker thread, polling the
    attach lock with sleeps: shmbus._core.ofd.wait_lock)."""
    segment = segment_path(name)
    try:
        opened = any(
            os.readlink(f"/proc/{pid}/fd/{fd}") == segment for fd in os.listdir(f"/proc/{pid}/fd")
        )
        numbers = set()
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/syscall") as f:
                numbers.add(f.read().split(" ", 1)[0])
    except OSError:
        return False
    return opened and bool(numbers & {"230", "35", "101", "115"})  # (clock_)nanosleep


def test_a_newcomer_connects_when_the_last_instance_is_killed_while_removing_the_bus(
    bus_name: str,
) -> None:
    """The last instance of a bus is closing and is killed halfway through
    removing the bus's files (a dead subscriber's FIFO gone, the segment
    still there) while a newcomer waits to attach: the newcomer, alone on
    the bus, connects, and its close removes every file."""
    subscriber = Agent(agents.subscriber, bus_name, ">", bus_kwargs=SMALL_RING)
    closer = Agent(fault_agents.stalled_closer, bus_name, bus_kwargs=SMALL_RING)
    newcomer = Agent(agents.holder, bus_name, bus_kwargs=SMALL_RING)
    with running(subscriber, closer):
        subscriber.expect("ready", FINISH)
        closer.expect("attached", FINISH)
        subscriber.kill()
        closer.send("close")
        closer.expect("removing", FINISH)
        assert os.path.exists(segment_path(bus_name))
        with running(newcomer):
            wait_until(
                lambda: _waits_for_the_attach_lock(newcomer.pid, bus_name),
                "the newcomer to wait for the attach lock",
            )
            closer.kill()
            answer = newcomer.recv(FINISH)
            if answer == "attached":
                newcomer.send("close")
                newcomer.expect("closed", FINISH)
    assert answer == "attached"
    assert bus_file_paths(bus_name) == []


# ─── A corrupted bus-segment header ────────────────────────────────────────

#: field: (offset, struct format, corrupt value, error class, text the message must hold)
HEADER_DAMAGE = {
    "magic": (0, "<Q", 0x0123456789ABCDEF, "SegmentCorruptError", "0x0123456789abcdef"),
    "layout_version": (8, "<I", 7, "IncompatibleSegmentError", "version 7"),
    "state": (12, "<I", 0xDEAD, "SegmentCorruptError", "0xdead"),
    "capacity": (16, "<Q", 12345, "SegmentCorruptError", "capacity 12345"),
    "max_event_size": (24, "<Q", 17, "SegmentCorruptError", "max_event_size 17"),
    "mode": (48, "<I", 0o666, "ForeignFileError", "mode 0o666"),
    "gid": (52, "<I", 4242, "ForeignFileError", "gid 4242"),
    "uid": (56, "<I", 4242, "ForeignFileError", "uid 4242"),
}


def damage_header(name: str, field: str) -> None:
    offset, fmt, value, _, _ = HEADER_DAMAGE[field]
    with mapped(segment_path(name)) as mm:
        struct.pack_into(fmt, mm, offset, value)


@pytest.mark.parametrize("field", sorted(HEADER_DAMAGE))
async def test_joining_a_live_bus_with_a_corrupted_header_raises_naming_the_value(
    bus_name: str, field: str
) -> None:
    """While this process holds a bus whose header field *field* was
    overwritten, a process that connects gets a clear error (corrupt,
    another layout version, or a header that does not match the file) whose
    message names the bus and the value it found, rather than crashing or
    hanging; this process's instance keeps working."""
    _, _, _, error, text = HEADER_DAMAGE[field]
    host = ShmBus(bus_name, **SMALL_RING)
    await host.connect()
    try:
        damage_header(bus_name, field)
        child = Agent(agents.holder, bus_name, bus_kwargs=SMALL_RING)
        with running(child):
            answer = child.recv(FINISH)
            assert child.join(FINISH) == 0
        assert answer[:2] == ("refused", error), answer
        assert text in answer[2] and bus_name in answer[2], answer[2]
        if field == "layout_version":
            assert f"layout version {LAYOUT_VERSION}" in answer[2], answer[2]
        async with host.subscribe(">") as sub:
            await host.publish("still.works", {})
            assert (await asyncio.wait_for(anext(aiter(sub)), FINISH)).topic == "still.works"
    finally:
        await host.close()
    assert bus_file_paths(bus_name) == []


@pytest.mark.parametrize("field", sorted(HEADER_DAMAGE))
async def test_connect_rebuilds_a_bus_with_a_corrupted_header_and_no_live_process(
    bus_name: str, field: str
) -> None:
    """A bus whose only process was killed and whose header field *field*
    was then overwritten is rebuilt by the next connect(), which works."""
    holder = Agent(agents.holder, bus_name, bus_kwargs=SMALL_RING)
    with running(holder):
        holder.expect("attached", FINISH)
        holder.kill()
    damage_header(bus_name, field)
    bus = ShmBus(bus_name, **SMALL_RING)
    await bus.connect()
    try:
        info = read_bus(bus_name)
        assert (info.layout_version, info.capacity) == (LAYOUT_VERSION, SMALL_RING["capacity"])
        async with bus.subscribe(">") as sub:
            await bus.publish("rebuilt", {})
            assert (await asyncio.wait_for(anext(aiter(sub)), FINISH)).topic == "rebuilt"
    finally:
        await bus.close()
    assert bus_file_paths(bus_name) == []


# ─── Untrusted memory: scribbling on a ring file ───────────────────────────

#: Small ring, so that scribbles often land on live records and the writer
#: wraps (and reclaims over scribbled records) within a few dozen events.
SCRIBBLE_RING = {"capacity": 16 * 1024, "max_event_size": 1024}
#: Record header fields: name -> (offset in the record, struct format).
RECORD_FIELDS = {
    "length": (0, "<I"),
    "kind": (4, "<H"),
    "topic_len": (6, "<H"),
    "seq": (8, "<Q"),
    "body_len": (16, "<I"),
    "checksum": (20, "<I"),
}
#: Bound on what the reader may allocate while it reads scribbled records
#: (a reader that trusted a length would allocate up to 4 GiB).
ALLOCATION_BOUND = 4 << 20

_ring_write = st.tuples(
    st.just("ring"),
    st.integers(0, SCRIBBLE_RING["capacity"] - 1),
    st.binary(min_size=1, max_size=48),
)
_header_write = st.tuples(
    st.just("header"),
    st.integers(0, 63),  # which published record (modulo how many there are)
    st.sampled_from(sorted(RECORD_FIELDS)),
    st.integers(0, (1 << 64) - 1),
)
_scribbles = st.lists(st.one_of(_ring_write, _header_write), min_size=1, max_size=6)
_pads = st.lists(st.integers(0, 900), min_size=1, max_size=40)


@dataclass
class ScribbleOutcome:
    published: int
    received: list[int]
    dropped: int
    corrupt: int
    loop_errors: list[str]
    publish_errors: int
    peak_alloc: int
    resumed: list[int]
    resume_expected: list[int]


def _record_start(mm: mmap.mmap, wc_before: int, wc_after: int) -> int:
    """Ring offset of the record one publish wrote between the two cursors
    (at the old cursor, or at the next lap if it padded to the wrap)."""
    capacity = SCRIBBLE_RING["capacity"]
    start = wc_before
    (length,) = struct.unpack_from("<I", mm, RING_OFFSET + start % capacity)
    if start + length != wc_after:
        start = (wc_before // capacity + 1) * capacity
    return start % capacity


def _apply(mm: mmap.mmap, starts: list[int], scribble: tuple[Any, ...]) -> None:
    capacity = SCRIBBLE_RING["capacity"]
    if scribble[0] == "ring":
        _, offset, data = scribble
        data = data[: capacity - offset]
        mm[RING_OFFSET + offset : RING_OFFSET + offset + len(data)] = data
        return
    _, index, field, value = scribble
    offset, fmt = RECORD_FIELDS[field]
    size = struct.calcsize(fmt)
    struct.pack_into(
        fmt, mm, RING_OFFSET + starts[index % len(starts)] + offset, value & ((1 << (8 * size)) - 1)
    )


def _own_ring_path(name: str) -> str:
    (ring,) = read_bus(name).rings
    return ring.path


def scribble_scenario(pads: list[int], scribbles: list[Any], read_first: bool) -> ScribbleOutcome:
    """Publish one event per entry of *pads* (payload padded by that many
    bytes) with a catch-all subscription of the same instance open; apply
    *scribbles* to the ring's records through a separate read-write mapping
    of the ring file (the reader maps it read-only), after the reader had a
    go at the records or before; let the reader run; then publish three more
    events once the reader is past the damage."""
    name = new_bus_name("scribble")

    async def main() -> ScribbleOutcome:
        loop = asyncio.get_running_loop()
        loop_errors: list[str] = []
        loop.set_exception_handler(lambda _loop, ctx: loop_errors.append(str(ctx)))
        bus = ShmBus(name, queue_size=4096, **SCRIBBLE_RING)
        await bus.connect()
        received: list[int] = []
        try:
            sub = bus.subscribe(">")
            bus.publish_nowait("s.ev", {"n": 0, "pad": "p" * pads[0]})

            def caught_up() -> bool:
                reader = bus._reader
                return reader is not None and not reader._pending()

            async def settle() -> None:
                deadline = loop.time() + 30
                while not caught_up() or sub.statistics().queued:
                    while sub.statistics().queued:
                        received.append((await anext(aiter(sub))).payload["n"])
                    assert loop.time() < deadline, "the reader hung"
                    await asyncio.sleep(0.001)

            with mapped(_own_ring_path(name)) as mm:
                words = memoryview(mm).cast("Q")
                try:
                    starts = [_record_start(mm, 0, int(words[W_WRITE_CURSOR]))]
                    for n, pad in enumerate(pads[1:], 1):
                        before = int(words[W_WRITE_CURSOR])
                        bus.publish_nowait("s.ev", {"n": n, "pad": "p" * pad})
                        starts.append(_record_start(mm, before, int(words[W_WRITE_CURSOR])))
                finally:
                    words.release()
                if read_first:
                    await asyncio.sleep(0)  # the reader reads some or all of them
                tracemalloc.reset_peak()
                base, _ = tracemalloc.get_traced_memory()
                for scribble in scribbles:
                    _apply(mm, starts, scribble)
                await asyncio.sleep(0)
                _, peak = tracemalloc.get_traced_memory()
                await settle()
                # The reader is past the damage: what comes now must arrive.
                count = len(pads)
                resume_expected = list(range(count, count + 3))
                for n in resume_expected:
                    bus.publish_nowait("s.ev", {"n": n})
                await settle()
            stats = bus.stats()
            return ScribbleOutcome(
                published=count + 3,
                received=received,
                dropped=sub.statistics().dropped,
                corrupt=stats["corrupt"],
                loop_errors=loop_errors,
                publish_errors=stats["publish_errors"],
                peak_alloc=peak - base,
                resumed=[n for n in received if n >= count],
                resume_expected=resume_expected,
            )
        finally:
            await bus.close()

    try:
        return asyncio.run(main())
    finally:
        cleanup(name)


#: A flipped bit in a high byte of an unread record's seq field.
_SEQ_BIT_FLIP = ([10, 10, 10], [("header", 1, "seq", 1 << 40)], False)

_SCRIBBLE_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


_SCRIBBLE_TOTALS = {
    "examples": 0,
    "scribbles": 0,
    "corrupt": 0,
    "examples_with_losses": 0,
    "max_peak_alloc_kib": 0,
}


@_SCRIBBLE_SETTINGS
@given(pads=_pads, scribbles=_scribbles, read_first=st.booleans())
@example(*_SEQ_BIT_FLIP)
def test_a_reader_survives_arbitrary_bytes_in_a_ring_file(
    traced: None, pads: list[int], scribbles: list[Any], read_first: bool
) -> None:
    """Whatever bytes are written over a ring and its records' headers
    while a subscription reads it, the reader never raises out of its step,
    never hangs, never allocates more than a bounded amount, delivers only
    events that were published (each at most once, in order), and counts at
    least every event it did not deliver (over-counting is allowed here);
    the ring's writer never fails."""
    outcome = scribble_scenario(pads, scribbles, read_first)
    _SCRIBBLE_TOTALS["examples"] += 1
    _SCRIBBLE_TOTALS["scribbles"] += len(scribbles)
    _SCRIBBLE_TOTALS["corrupt"] += outcome.corrupt
    _SCRIBBLE_TOTALS["examples_with_losses"] += outcome.dropped > 0
    _SCRIBBLE_TOTALS["max_peak_alloc_kib"] = max(
        _SCRIBBLE_TOTALS["max_peak_alloc_kib"], outcome.peak_alloc // 1024
    )
    figures.record("scribble-property", dict(_SCRIBBLE_TOTALS))
    assert outcome.loop_errors == []
    assert outcome.publish_errors == 0
    assert outcome.peak_alloc < ALLOCATION_BOUND, outcome.peak_alloc
    assert outcome.received == sorted(set(outcome.received))
    assert set(outcome.received) <= set(range(outcome.published))
    assert len(outcome.received) + outcome.dropped >= outcome.published
    if len(outcome.received) < outcome.published:
        assert outcome.dropped > 0


@_SCRIBBLE_SETTINGS
@given(pads=_pads, scribbles=_scribbles, read_first=st.booleans())
@example(*_SEQ_BIT_FLIP)
def test_a_reader_counts_scribbled_records_exactly_and_resumes_after_them(
    traced: None, pads: list[int], scribbles: list[Any], read_first: bool
) -> None:
    """Whatever bytes are written over a ring and its records' headers, the
    catch-all subscription's received + dropped equals the events published,
    exactly (every loss counted, none invented), and events published once
    the reader is past the damage are all delivered."""
    outcome = scribble_scenario(pads, scribbles, read_first)
    assert len(outcome.received) + outcome.dropped == outcome.published
    assert outcome.resumed == outcome.resume_expected


async def test_a_flipped_bit_in_an_unread_records_seq_does_not_stop_later_deliveries(
    bus_name: str,
) -> None:
    """Minimal case: one bit of an unread record's seq field flips. That
    record is lost and counted (1 dropped, 1 corrupt); the events published
    after it are still delivered."""
    bus = ShmBus(bus_name, **SCRIBBLE_RING)
    await bus.connect()
    try:
        sub = bus.subscribe(">")
        bus.publish_nowait("a.b", {"n": 0})  # the ring's first record, at offset 0
        with mapped(_own_ring_path(bus_name)) as mm:
            mm[RING_OFFSET + RECORD_FIELDS["seq"][0] + 5] ^= 0x01  # bit 40 of seq
        bus.publish_nowait("a.b", {"n": 1})
        event = await asyncio.wait_for(anext(aiter(sub)), 3)
        assert event.payload == {"n": 1}
        assert (sub.statistics().dropped, bus.stats()["corrupt"]) == (1, 1)
    finally:
        await bus.close()


async def test_a_reader_keeps_going_while_another_process_scribbles_on_a_ring_file(
    bus_name: str,
) -> None:
    """A helper process writes random bytes all over a publisher process's
    ring file while that publisher publishes and this process's
    subscription reads: nothing raises on the event loop, the publisher
    never fails, every delivered event is one that was published, intact,
    in order and once, the reader counts what it rejected, memory stays
    bounded, and once the scribbling stops a new instance on the bus gets
    what is published."""
    ring = {"capacity": 64 * 1024, "max_event_size": 1024}
    loop = asyncio.get_running_loop()
    loop_errors: list[str] = []
    loop.set_exception_handler(lambda _loop, ctx: loop_errors.append(str(ctx)))
    host = ShmBus(bus_name, queue_size=1 << 16, **ring)
    await host.connect()
    rss_before = psutil.Process().memory_info().rss
    tally_ = fault_agents.Tally()
    try:
        sub = host.subscribe(">")
        publisher = Agent(fault_agents.steady_publisher, bus_name, 1, burst=100, bus_kwargs=ring)
        seed = random.randrange(1 << 30)
        print(f"scribbler seed {seed}")  # shown if the test fails
        with running(publisher):
            publisher.expect("ready", FINISH)
            publisher.send("go")
            deadline = loop.time() + FINISH
            while not rings_of(bus_name, publisher.pid):
                assert loop.time() < deadline, "the publisher never made its ring"
                await asyncio.sleep(0.001)
            (own,) = rings_of(bus_name, publisher.pid)
            scribbler = Agent(
                fault_agents.scribbler,
                own.path,
                start=RING_OFFSET,
                end=RING_OFFSET + ring["capacity"],
                seed=seed,
            )
            with running(scribbler):
                scribbler.expect("ready", FINISH)
                scribbler.send("go")
                while host.stats()["corrupt"] < 50 and loop.time() < deadline:
                    with contextlib.suppress(TimeoutError):
                        event = await asyncio.wait_for(anext(aiter(sub)), 0.05)
                        tally_.add(event.payload)
                scribbler.send("stop")
                writes = scribbler.recv(FINISH)["writes"]
            publisher.send("stop")
            report = publisher.recv(FINISH)
            publisher.send("close")
            publisher.expect("closed", FINISH)
        while sub.statistics().queued:
            tally_.add((await anext(aiter(sub))).payload)
        corrupt = host.stats()["corrupt"]
        rss_growth = psutil.Process().memory_info().rss - rss_before
        async with ShmBus(bus_name, **ring) as fresh:
            async with fresh.subscribe(">") as after:
                for n in range(3):
                    await host.publish("after.scribbling", {"n": n})
                got = [
                    (await asyncio.wait_for(anext(aiter(after)), FINISH)).payload["n"]
                    for _ in range(3)
                ]
    finally:
        await host.close()
    seen = tally_.report()
    figures.record(
        "scribbler-process",
        {
            "scribbles": writes,
            "published": report["published"],
            "delivered": seen["delivered"],
            "corrupt": corrupt,
            "rss_growth_mib": round(rss_growth / 2**20, 1),
        },
    )
    assert loop_errors == []
    assert (report["errors"], report["bus"]["publish_errors"]) == (0, 0), report
    assert corrupt >= 50
    assert seen["disorder"] == {} and seen["invalid"] == [], seen
    assert set(seen["runs"]) <= {1} and all(
        end <= report["published"] for _, end in seen["runs"].get(1, [])
    )
    assert rss_growth < 256 << 20, rss_growth
    assert got == [0, 1, 2]
