"""Readers: following every publisher's ring for one slot and routing
records to that slot's subscriptions, driven either by an event loop or by
the consuming thread itself.

Owns
----
:class:`RingFollower`, the part of a reader that knows no event loop: the
slot's followed rings (a :class:`~shmbus._core.ring.RingReader` each, with
the per-subscription start points), the topic-to-subscriptions route cache,
its row of the directory's seen table, the slot's sleep flag and its reader
counters in shared memory (what ``shmbus stat`` shows). It never waits: a
step reads what is there and returns.

:class:`BusReader`, the asyncio driver: one per bus instance with asyncio
subscriptions, on that instance's slot, stepping its follower from the event
loop and sleeping on the instance's wake-up FIFO. (The blocking driver is
:class:`~shmbus._core.sync_reader.SyncReader`, on a slot of its own.)

Invariants
----------
* A follower is stepped by one thread at a time (its lock), and subscriptions
  may be added or removed from any thread meanwhile. The asyncio driver runs
  only on its home event loop (the loop that was running when the first
  subscription was made); it never blocks it and never waits for another
  process: each step reads at most ``BATCH`` records in all and yields, so a
  step never hands a subscription more than its consumer can take between
  two steps, however many publishers there are.
* Rings are found through the directory (:mod:`shmbus._core.directory`, whose
  reader rules this module follows): one flag byte checked per step, a scan
  only when it is set. A ring is followed until its writer is gone and it is
  drained, then its mapping is dropped.
* A subscription receives, from each ring, exactly the records whose
  sequence number is at or after its start point in that ring: the ring's
  next sequence number when the subscription was made, or 0 for a ring found
  after it was made. So it sees everything published after ``subscribe()``
  returned and nothing from before.
* Order: the records of one ring (one publishing instance) are delivered in
  the order they were published. A step reads the rings one after the other,
  up to ``BATCH`` records in all, starting with the ring after the one the
  previous step started with: events of different publishers interleave in
  batches, with no order promised between them.
* Every record a subscription should have had but did not get is counted on
  it: sequence gaps (lapped reader, corrupt run) counted whole for every
  subscription open across them, and corrupt records it matched.
* Skipping to now (:meth:`RingFollower.skip_to_newest`) is the one way a
  cursor moves without reading, and it counts nothing: only the thread that
  may step the follower calls it, and only for a follower whose every
  subscription has declined its backlog (the blocking inbox between
  requests; never a queue-group member, whose assigned records must be
  counted). It scans the directory first, so a ring installed meanwhile is
  followed from now too, then puts every followed ring's cursor at the
  (position, next sequence) pair after its newest committed record (ring
  reader rule 5), never behind where it was. From then on every record is
  at or after every subscription's start point, so the start points are
  dropped: a record committed after the skip is read and routed as usual,
  and a gap after it is counted as usual.
* Queue-group members (:mod:`shmbus._core.groups`) get only the group
  records assigned to them, and count their losses by their ordinals; the
  routing decision is made in one place, :meth:`RingFollower._route`, by
  :class:`~shmbus._core.groups.MemberRouting`. The heartbeat counts assigned
  records lapped at a ring's tail and, with the dead writers' rings, settles
  dead members.
* Polling before sleep (asyncio driver): the reader keeps polling the
  rings from the event loop (one poll per loop iteration, so other tasks
  still run) for an adaptive window before it sleeps: twice the recent idle
  gap between records, between ``SPIN_MIN`` and ``SPIN_MAX``, and only
  ``SPIN_MIN`` when gaps are longer than ``SPIN_MAX``. Always in the opt-in
  low-latency mode; otherwise only while a *spin hold* is taken
  (:meth:`BusReader.hold_spin`: a request of the instance awaits its
  reply). Taking a hold while the reader sleeps starts a window at once, so
  a reply that comes within it is found by a poll rather than by the
  wake-up. Holds only ever shorten a sleep; a window always ends, after
  which the reader sleeps as usual even if a hold is still taken, and it
  ends early once the last hold is given back (outside low-latency mode).
* Sleep: only when no ring holds anything unread, by the protocol in
  :mod:`shmbus._core.wakeup` (:meth:`RingFollower.announce_sleep`). Two timers
  insure against a lost wake-up (a publisher killed between its commit and
  its wake-up): a one-shot re-check ``IDLE_RECHECK`` after going idle and a
  ``HEARTBEAT`` poll, which also notices rings whose writer died
  (:meth:`RingFollower.heartbeat`) and, every ``RECLAIM_EVERY`` beats,
  reclaims dead writers' rings nobody is owed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Final, Protocol

from ..codec import EnvelopeDecodeError, decode_envelope
from ..contract import Event, TopicMatcher, validate_topic
from . import directory, groups
from .layout import (
    OFF_SLEEP_FLAGS,
    RING_OFFSET,
    SLOT_BACKLOG,
    SLOT_CORRUPT,
    SLOT_DELIVERED,
    SLOT_DROPPED,
    SLOT_LAPPED,
    W_NEXT_SEQ,
    slot_word,
)
from .ordering import full_fence
from .ring import UNKNOWN_SEQ, RingBatch, RingReader
from .segment import Segment
from .wakeup import WakeChannel

__all__ = ["BATCH", "HEARTBEAT", "IDLE_RECHECK", "BusReader", "RingFollower", "Target"]

log = logging.getLogger("shmbus._core.reader")

#: Records read per step, over all rings, before the loop gets control back.
BATCH: Final = 256
#: Re-check this long after going idle, in seconds: bounds the delay a lost
#: wake-up could cause.
IDLE_RECHECK: Final = 0.002
#: Poll this often regardless, in seconds (about 4 wake-ups/s per idle reader).
HEARTBEAT: Final = 0.25
#: Heartbeats between two sweeps for dead writers' rings (about 2 s).
RECLAIM_EVERY: Final = 8
#: Low-latency mode: bounds of the adaptive spin before sleeping, in seconds.
SPIN_MIN: Final = 50e-6
SPIN_MAX: Final = 2e-3
_ROUTE_CACHE_LIMIT: Final = 4096


class _BadTopic:
    """Route marker for a record whose topic bytes are not a valid topic."""


class Target(Protocol):
    """What a follower routes records to: a subscription, asyncio
    (:class:`~shmbus.delivery.QueueSubscription`) or blocking
    (:class:`~shmbus.delivery.BlockingSubscription`)."""

    @property
    def matcher(self) -> TopicMatcher: ...

    @property
    def dropped(self) -> int: ...

    def deliver(self, events: list[Event]) -> None: ...

    def count_lost(self, count: int) -> None: ...


_BAD_TOPIC: Final = _BadTopic()
_Route = tuple[str, tuple[Target, ...]] | _BadTopic
#: (entry, generation): one ring, for as long as it exists.
RingKey = tuple[int, int]


class _Followed:
    """One ring this reader follows."""

    __slots__ = ("key", "mapping", "ring", "starts", "newest_start")

    def __init__(self, mapping: directory.RingMapping, cursor: int, next_seq: int) -> None:
        self.key: RingKey = (mapping.entry, mapping.gen)
        self.mapping = mapping
        self.ring: RingReader[_Route] = RingReader(
            mapping.mm,
            mapping.words,
            RING_OFFSET,
            mapping.capacity,
            mapping.max_event_size,
            cursor,
            next_seq,
        )
        #: Start point of each subscription made while this ring was followed;
        #: the others started before the ring was found, at 0.
        self.starts: dict[Target, int] = {}
        self.newest_start = 0

    def start_point(self) -> int:
        """The sequence number a subscription made now starts at."""
        _, seq = self.ring.snapshot()
        if seq == UNKNOWN_SEQ:
            seq = int(self.mapping.words[W_NEXT_SEQ])
        return seq


class RingFollower:
    """Follows every ring of the bus for one slot and routes records to the
    slot's subscriptions; knows no event loop and never waits (see the
    module's invariants). A driver steps it and puts it to sleep.

    Parameters
    ----------
    segment:
        The slot's attachment (gives the mapping and the slot).
    own_ring:
        Returns the (entry, generation) of the ring the attachment writes
        while it writes one, else None: that ring's writer is alive by
        definition (its lock byte is held through the same descriptor).
    """

    def __init__(self, segment: Segment, own_ring: Callable[[], RingKey | None]) -> None:
        self._segment = segment
        self._mm = segment.mm
        self._words = segment.words
        self._own_ring = own_ring
        self._rings: dict[RingKey, _Followed] = {}
        self._order: list[_Followed] = []
        self._first = 0
        self._subs: set[Target] = set()
        self._members = groups.MemberRouting()
        self._routes: dict[bytes, _Route | None] = {}
        self._slot = segment.slot
        self._flag = OFF_SLEEP_FLAGS + segment.slot
        self._finder = directory.RingFinder(segment)
        self._closed = False
        # Subscriptions may be added or removed from other threads; a step
        # and those changes exclude each other.
        self._lock = threading.Lock()
        #: Records rejected as unreadable.
        self.corrupt = 0
        #: Sequence numbers skipped (lapped reader, corrupt run).
        self.lapped = 0
        #: Events handed to subscription queues.
        self.routed = 0
        self._retired_dropped = 0
        self._beats = 0

    # ─── Subscriptions ───

    def add(self, sub: Target) -> None:
        """Route records published from now on to *sub*; from any thread."""
        with self._lock:
            first = not self._subs
            self._subs.add(sub)
            self._members.add(sub)
            self._routes.clear()
            self._finder.announce(len(self._subs))
            # Know every ring that exists now, so that each gets a start point
            # and none of its history reaches the new subscription.
            self._scan(first=first)
            for followed in self._order:
                start = followed.start_point()
                followed.starts[sub] = start
                followed.newest_start = max(followed.newest_start, start)
            self._write_counters()

    def remove(self, sub: Target) -> None:
        """Stop routing to *sub*; from any thread."""
        with self._lock:
            if sub in self._subs:
                self._subs.discard(sub)
                self._members.remove(sub)
                self._retired_dropped += sub.dropped
                self._routes.clear()
                for followed in self._order:
                    followed.starts.pop(sub, None)
                if not self._closed:
                    self._finder.announce(len(self._subs))

    @property
    def subscriptions(self) -> list[Target]:
        with self._lock:
            return list(self._subs)

    def close(self) -> None:
        """Stop following the rings: no more wake-ups for this slot, counters
        written, mappings dropped. Every step runs even if one raised (a
        signal handler can raise anywhere)."""
        if self._closed:
            return
        self._closed = True
        self._mm[self._flag] = 0
        with self._lock:
            try:
                self._write_counters()
            finally:
                self._finder.announce(0)
                for followed in self._order:
                    followed.mapping.close()
                self._rings.clear()
                self._order.clear()

    def skip_to_newest(self) -> None:
        """Move every followed ring's cursor to its newest committed record,
        reading nothing and counting nothing: the backlog of every
        subscription of this follower is given up (see the module's
        invariants). A ring the directory names that is not followed yet is
        followed from now too. Called only by the thread that may step the
        follower. Never raises for what shared memory holds.

        Raises
        ------
        RuntimeError
            A queue-group member routes through this follower: its assigned
            records may not be skipped uncounted.
        """
        if self._closed:
            return
        with self._lock:
            if self._members:
                raise RuntimeError(
                    "a follower with queue-group members cannot skip its backlog: "
                    "their assigned records must be read or counted"
                )
            try:
                self._check_directory()
            except Exception:
                log.exception("reader failed to scan the ring directory")
                self.corrupt += 1
            for followed in self._order:
                ring = followed.ring
                position, seq = ring.snapshot()
                if position < ring.cursor:
                    continue  # nothing newer (or a damaged ring): never move back
                ring.cursor, ring.expected_seq = position, seq
                # Every record from here on is at or after every start point.
                followed.starts.clear()
                followed.newest_start = 0
            self._write_counters()

    # ─── The directory ───

    def _scan(self, *, first: bool) -> None:
        """Follow the rings the directory names that this reader is owed
        (:class:`~shmbus._core.directory.RingFinder`). The caller holds ``_lock``.

        A ring is marked seen only once it is followed, and an interrupted
        scan (a signal handler that raises) asks for another: no ring is
        ever lost between the two.
        """
        unusable = self._finder.unusable
        found = self._finder.scan(set(self._rings), first=first)
        try:
            for ring in found:
                mapping = ring.mapping
                key = (mapping.entry, mapping.gen)
                if key not in self._rings:
                    followed = _Followed(mapping, 0, 0)
                    if not ring.from_start:
                        followed.ring.cursor, followed.ring.expected_seq = followed.ring.snapshot()
                    self._rings[key] = followed
                    self._order.append(followed)
                self._finder.adopted(ring)
        except BaseException:
            self._finder.scan_again()
            raise
        self.corrupt += self._finder.unusable - unusable

    def _check_directory(self) -> None:
        if self._finder.changed():
            self._scan(first=False)

    def heartbeat(self) -> None:
        """The periodic chores: let go of rings whose writer is gone and that
        are drained (directory reader rule 5) and, now and then, reclaim dead
        writers' rings. Never raises: bad shared memory is logged."""
        with self._lock:
            try:
                self._drop_finished()
            except Exception:
                log.exception("reader failed to check its rings' writers")

    def _drop_finished(self) -> None:
        """Let go of rings whose writer is gone and that are drained (rule 5)."""
        own = self._own_ring()
        if self._members:
            self._members.heartbeat(
                (followed.key, followed.mapping.words, followed.ring.caught_up)
                for followed in self._order
            )
        finished = []
        for followed in self._order:
            entry, gen = followed.key
            if followed.key == own:
                continue
            if directory.writer_alive(self._segment, entry, gen):
                continue
            if not followed.ring.pending():
                finished.append(followed)
        for followed in finished:
            del self._rings[followed.key]
            self._order.remove(followed)
            self._members.forget(followed.key)
            followed.mapping.close()
        self._beats += 1
        if finished or self._beats % RECLAIM_EVERY == 0:
            # Also now and then: rings of writers that died installing them,
            # or that this reader was never owed, have no reader to finish them.
            directory.reclaim_dead(self._segment, own[0] if own else -1)
        if self._beats % RECLAIM_EVERY == 0:
            groups.settle_dead(self._segment, self._members.held(), own[0] if own else -1)

    # ─── Reading ───

    def pending(self) -> bool:
        """True if a step would find something: a directory change, or a
        committed record not read yet."""
        if self._finder.changed():
            return True
        return any(followed.ring.pending() for followed in self._order)

    def step(self, *, counters: bool = True) -> int:
        """Read up to ``BATCH`` records over all rings, starting one ring
        further than the previous step, and route them; return how many
        events were handed to subscriptions. Never raises for what shared
        memory holds. *counters*: write the slot's counters now (a driver
        that passes False calls :meth:`write_counters` when it goes idle)."""
        if self._closed:
            return 0
        with self._lock:
            routed = self.routed
            try:
                if self._finder.changed():
                    self._scan(first=False)
            except Exception:
                log.exception("reader failed to scan the ring directory")
                self.corrupt += 1
            order = self._order
            count = len(order)
            if count == 1:
                self._read_ring(order[0], BATCH)
            elif count:
                self._first = (self._first + 1) % count
                budget = BATCH
                for index in range(count):
                    budget -= self._read_ring(order[(self._first + index) % count], budget)
                    if budget <= 0:
                        break
            if counters:
                self._write_counters()
            return self.routed - routed

    def _read_ring(self, followed: _Followed, limit: int) -> int:
        """Read up to *limit* records of one ring; return how many were read."""
        ring = followed.ring
        if not ring.pending():
            return 0
        expected = ring.expected_seq
        try:
            batch = ring.read(limit, self._select)
            self._route(batch, followed)
            return batch.examined or 1
        except Exception:  # never let bad shared memory kill the driver
            log.exception("reader failed on a batch; resynchronising at the write cursor")
            self.corrupt += 1
            # Whatever this batch held was not delivered: with the old
            # expected sequence number, the next record counts it as a gap.
            ring.expected_seq = expected
            ring.cursor = ring.cursor + ring.backlog()
            return limit

    # ─── Sleep ───

    def announce_sleep(self) -> bool:
        """Going idle (shmbus._core.wakeup): set the slot's sleep flag, ``F``,
        and look once more. True if the driver may sleep now; False if
        something came meanwhile (the flag is cleared again: step)."""
        self._mm[self._flag] = 1
        full_fence()
        if self.pending():
            self._mm[self._flag] = 0
            return False
        return True

    def clear_sleep_flag(self) -> None:
        """Awake again: publishers need not ring this slot."""
        self._mm[self._flag] = 0

    # ─── Routing ───

    def _select(self, topic: bytes) -> _Route | None:
        try:
            return self._routes[topic]
        except KeyError:
            pass
        route = self._compute_route(topic)
        if len(self._routes) >= _ROUTE_CACHE_LIMIT:
            self._routes.clear()
        self._routes[topic] = route
        return route

    def _compute_route(self, raw: bytes) -> _Route | None:
        try:
            topic = validate_topic(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return _BAD_TOPIC
        targets = tuple(sub for sub in self._subs if sub.matcher(topic))
        return (topic, targets) if targets else None

    def _route(self, batch: RingBatch[_Route], followed: _Followed) -> None:
        starts = followed.starts
        if batch.gaps:
            for first, end in batch.gaps:
                self.lapped += end - first
                for sub in self._subs:
                    missed = end - max(first, starts.get(sub, 0))
                    if missed > 0:
                        sub.count_lost(missed)
        if batch.corrupt:
            self.corrupt += batch.corrupt
        if not batch.records:
            return
        newest_start = followed.newest_start
        max_size = followed.mapping.max_event_size
        decode = decode_envelope
        # None unless a member routes here: one test per batch, not per record.
        members = self._members if self._members else None
        assignments = batch.assignments
        key = followed.key
        outbox: dict[Target, list[Event]] = {}
        # Most batches go to one subscription: remember its list.
        last_sub: Target | None = None
        last_box: list[Event] = []
        for seq, route, _raw, body, checksum_ok in batch.records:
            if route.__class__ is not tuple:
                self._reject(seq, tuple(self._subs), starts)
                continue
            topic, targets = route
            if not checksum_ok:
                self._reject(seq, targets, starts)
                continue
            if members is not None:
                # Members take only the group records assigned to them.
                targets = members.assigned(targets, assignments.get(seq), key)
                if not targets:
                    continue
            try:
                event = decode(topic, body, max_size)
            except EnvelopeDecodeError as exc:
                log.debug("corrupt record %d: %s", seq, exc)
                self._reject(seq, targets, starts)
                if members is not None:
                    members.undecodable(targets)
                continue
            shared = False
            for sub in targets:
                if seq < newest_start and seq < starts.get(sub, 0):
                    continue  # published before this subscription existed
                if shared:
                    # Each subscription gets its own copy, as over NATS: a
                    # consumer that edits its payload must not change what
                    # another one sees.
                    event = decode(topic, body, max_size)
                shared = True
                if sub is last_sub:
                    last_box.append(event)
                    continue
                box = outbox.get(sub)
                if box is None:
                    box = outbox[sub] = []
                box.append(event)
                last_sub, last_box = sub, box
        for sub, events in outbox.items():
            self.routed += len(events)
            sub.deliver(events)

    def _reject(self, seq: int, targets: tuple[Target, ...], starts: dict[Target, int]) -> None:
        self.corrupt += 1
        for sub in targets:
            if seq >= starts.get(sub, 0):
                sub.count_lost(1)

    # ─── Counters in shared memory ───

    def write_counters(self) -> None:
        """Publish this reader's counters in its slot (``shmbus stat``)."""
        if self._closed:
            return
        with self._lock:
            self._write_counters()

    def dropped(self) -> int:
        """Events lost or evicted for this reader's subscriptions, ever."""
        return self._retired_dropped + sum(sub.dropped for sub in self._subs)

    def backlog(self) -> int:
        """Committed bytes in followed rings not read yet."""
        return sum(followed.ring.backlog() for followed in self._order)

    def _write_counters(self) -> None:
        words = self._words
        slot = self._slot
        words[slot_word(slot, SLOT_BACKLOG)] = self.backlog()
        words[slot_word(slot, SLOT_DELIVERED)] = self.routed
        words[slot_word(slot, SLOT_DROPPED)] = self.dropped()
        words[slot_word(slot, SLOT_CORRUPT)] = self.corrupt
        words[slot_word(slot, SLOT_LAPPED)] = self.lapped


class BusReader:
    """The asyncio driver: steps the instance's :class:`RingFollower` on its
    home loop and sleeps on the instance's wake-up FIFO.

    Parameters
    ----------
    segment:
        The instance's attachment (gives the mapping and the slot).
    loop:
        The home event loop.
    own_ring:
        Returns the (entry, generation) of the instance's own ring while it
        writes one, else None: that ring's writer is alive by definition.
    """

    def __init__(
        self,
        segment: Segment,
        loop: asyncio.AbstractEventLoop,
        own_ring: Callable[[], RingKey | None],
        *,
        low_latency: bool = False,
    ) -> None:
        self.loop = loop
        self.follower = RingFollower(segment, own_ring)
        self._channel = WakeChannel(segment)
        self._scheduled = False
        self._stopped = False
        self._low_latency = low_latency
        #: Spin holds taken (requests awaiting replies): poll while idle.
        self._spin_holds = 0
        self._spin_until = 0.0
        #: Polls (not wake-ups) that found events for this reader's
        #: subscriptions.
        self.found_polling = 0
        self._asleep = False
        self._idle_since = 0.0
        self._idle_gap = SPIN_MAX
        loop.add_reader(self._channel.fd, self._on_wake)
        self._heartbeat = loop.call_later(HEARTBEAT, self._on_heartbeat)
        self._recheck: asyncio.TimerHandle | None = None

    # ─── Subscriptions ───

    def add(self, sub: Target) -> None:
        """Route records published from now on to *sub*; from any thread."""
        self.follower.add(sub)
        self._schedule()

    def remove(self, sub: Target) -> None:
        """Stop routing to *sub*; from any thread."""
        self.follower.remove(sub)

    @property
    def subscriptions(self) -> list[Target]:
        return self.follower.subscriptions

    @property
    def corrupt(self) -> int:
        return self.follower.corrupt

    @property
    def lapped(self) -> int:
        return self.follower.lapped

    def stop(self) -> None:
        """Stop following the rings (no more wake-ups for this slot). Every
        step runs even if one raised (a signal handler can raise anywhere)."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self.follower.close()
        finally:
            try:
                self._heartbeat.cancel()
                if self._recheck is not None:
                    self._recheck.cancel()
                if not self.loop.is_closed():
                    self.loop.remove_reader(self._channel.fd)
            finally:
                self._channel.close()

    def abandon(self) -> None:
        """In a fork child: close our descriptor, touch nothing shared."""
        self._stopped = True
        self._channel.close(unlink=False)

    @property
    def sleeping(self) -> bool:
        """True while the reader sleeps (its sleep flag announced, no poll
        or step queued)."""
        return self._asleep and not self._scheduled

    @property
    def spin_holds(self) -> int:
        """Holds taken by :meth:`hold_spin` and not given back yet."""
        return self._spin_holds

    def hold_spin(self) -> None:
        """Poll rather than sleep while idle until :meth:`release_spin` (see
        the module's invariants); on the home loop. A sleeping reader starts
        a polling window now."""
        self._spin_holds += 1
        if self._asleep and not self._scheduled and not self._stopped:
            self._asleep = False
            self.follower.clear_sleep_flag()
            if self._recheck is not None:
                self._recheck.cancel()
                self._recheck = None
            self._spin_or_sleep()

    def release_spin(self) -> None:
        """Give back a hold taken by :meth:`hold_spin`; on the home loop."""
        if self._spin_holds > 0:
            self._spin_holds -= 1

    # ─── Scheduling ───

    def _schedule(self) -> None:
        # The flag only once the callback is queued: were call_soon
        # interrupted (a signal handler that raises), a flag set first would
        # make every wake-up and heartbeat skip a reader with no step queued.
        # A step queued twice is harmless.
        if not self._scheduled and not self._stopped:
            self.loop.call_soon(self._step)
            self._scheduled = True

    def _pending(self) -> bool:
        return self.follower.pending()

    def _on_wake(self) -> None:
        # The FIFO is drained when the reader next goes idle, not here: the
        # read() system call would sit on the latency path. Until then the
        # loop reports it readable on every iteration; ignore that while busy.
        if self._scheduled or not self._asleep:
            return
        self._asleep = False
        if self._low_latency or self._spin_holds:
            self._idle_gap += (time.perf_counter() - self._idle_since - self._idle_gap) / 8
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        if not self._scheduled:
            self._step()

    def _on_recheck(self) -> None:
        self._recheck = None
        if not self._scheduled and not self._stopped and self._pending():
            self._asleep = False
            self._step()

    def _on_heartbeat(self) -> None:
        if self._stopped:
            return
        self._heartbeat = self.loop.call_later(HEARTBEAT, self._on_heartbeat)
        self.follower.heartbeat()
        if not self._scheduled and self._pending():
            self._asleep = False
            self._step()

    def _step(self) -> None:
        self._scheduled = False
        if self._stopped:
            return
        routed = self.follower.step(counters=False)
        if routed:
            # Let the consumers just woken run first: the slot's counters, the
            # next look at the rings and going idle (a read() of the FIFO, a
            # fence, a timer) are not on their latency path.
            self.loop.call_soon(self._go_idle)
            self._scheduled = True
            return
        self.follower.write_counters()
        if self._pending():
            self._schedule()
            return
        self._go_idle()

    def _go_idle(self) -> None:
        self._scheduled = False
        if self._stopped:
            return
        self.follower.write_counters()
        if self._pending():
            self._step()
        elif self._low_latency or self._spin_holds:
            self._spin_or_sleep()
        else:
            self._sleep()

    def _spin_or_sleep(self) -> None:
        now = time.perf_counter()
        if not self._scheduled:
            # Just went idle: size this spin from the recent gaps.
            self._idle_since = now
            window = min(SPIN_MAX, max(SPIN_MIN, 2 * self._idle_gap))
            if self._idle_gap > SPIN_MAX:
                window = SPIN_MIN
            self._spin_until = now + window
        # A window ends early once the last hold is given back: polling is
        # only for the low-latency mode and for requests still waiting.
        if now < self._spin_until and (self._low_latency or self._spin_holds):
            self.loop.call_soon(self._spin_poll)
            self._scheduled = True
        else:
            self._scheduled = False
            self._sleep()

    def _spin_poll(self) -> None:
        if self._stopped:
            return
        if self._pending():
            gap = time.perf_counter() - self._idle_since
            self._idle_gap += (gap - self._idle_gap) / 8
            routed = self.follower.routed
            self._step()
            if self.follower.routed != routed:
                self.found_polling += 1
        else:
            self._spin_or_sleep()

    def _sleep(self) -> None:
        """Going idle: announce it, then look once more (see shmbus._core.wakeup)."""
        self._asleep = True
        self._channel.drain()
        if not self.follower.announce_sleep():
            self._schedule()
        elif self._recheck is None:
            self._recheck = self.loop.call_later(IDLE_RECHECK, self._on_recheck)
