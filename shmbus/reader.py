"""The reader: one per bus instance with subscriptions, following the ring
on that instance's event loop and routing records to its subscriptions.

Owns
----
The instance's position in the ring, the topic-to-subscriptions route cache,
the wake-up FIFO of the instance's slot, and the per-slot reader counters in
shared memory (what ``shmbus stat`` shows).

Invariants
----------
* Runs only on its home event loop (the loop that was running when the first
  subscription was made); it never blocks it: each step reads at most
  ``BATCH`` records and then yields.
* A topic is checked against the subscriptions before the body is even
  copied, and decoded once per process however many subscriptions match.
* A subscription receives exactly the records whose sequence number is at or
  after its ``start_seq`` (the ring's next sequence number when it was made),
  so it sees everything published after ``subscribe()`` returned and nothing
  from before.
* Every record a subscription should have had but did not get is counted on
  it: sequence gaps (lapped reader, dead writer, corrupt run) counted whole
  for every subscription open across them, and corrupt records it matched.
* Low-latency mode (opt-in): before sleeping, the reader keeps polling the
  ring from the event loop (one poll per loop iteration, so other tasks still
  run) for an adaptive window: twice the recent idle gap between records,
  between ``SPIN_MIN`` and ``SPIN_MAX``, and only ``SPIN_MIN`` when gaps are
  longer than ``SPIN_MAX`` (spinning would not catch them). An idle reader
  stops spinning after the window, so its idle cost is that of default mode.
* Sleep: only when the ring holds nothing unread, by the protocol in
  :mod:`shmbus.wakeup`. Two timers insure against a lost wake-up, which the
  protocol's barriers rule out: a one-shot re-check ``IDLE_RECHECK`` after
  going idle (the only moment a wake-up could race with falling asleep) and
  a ``HEARTBEAT`` poll, cheap enough to leave running on idle readers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Final

from .codec import EnvelopeDecodeError, decode_envelope
from .contract import Event, validate_topic
from .delivery import QueueSubscription
from .layout import (
    OFF_SLEEP_FLAGS,
    SLOT_CORRUPT,
    SLOT_DELIVERED,
    SLOT_DROPPED,
    SLOT_LAPPED,
    SLOT_READ_CURSOR,
    SLOT_SUBSCRIPTIONS,
    W_WRITE_CURSOR,
    slot_word,
)
from .ring import RingBatch, RingReader
from .segment import Segment
from .wakeup import WakeChannel, full_barrier

__all__ = ["BusReader"]

log = logging.getLogger("shmbus.reader")

#: Records read per step before the loop gets control back.
BATCH: Final = 256
#: Re-check this long after going idle, in seconds: bounds the delay a wake-up
#: lost in the race with falling asleep could cause.
IDLE_RECHECK: Final = 0.002
#: Poll this often regardless, in seconds (about 4 wake-ups/s per idle reader).
HEARTBEAT: Final = 0.25
#: Low-latency mode: bounds of the adaptive spin before sleeping, in seconds.
SPIN_MIN: Final = 50e-6
SPIN_MAX: Final = 2e-3
_ROUTE_CACHE_LIMIT: Final = 4096


class _BadTopic:
    """Route marker for a record whose topic bytes are not a valid topic."""


_BAD_TOPIC: Final = _BadTopic()
_Route = tuple[str, tuple[QueueSubscription, ...]] | _BadTopic


class BusReader:
    """Follows the ring for one bus instance on its home event loop.

    Parameters
    ----------
    segment:
        The instance's attachment (gives the mapping and the slot).
    loop:
        The home event loop.
    cursor, next_seq:
        Starting point, read under the writer lock (see
        :class:`~shmbus.ring.RingReader`).
    """

    def __init__(
        self,
        segment: Segment,
        loop: asyncio.AbstractEventLoop,
        cursor: int,
        next_seq: int,
        *,
        low_latency: bool = False,
    ) -> None:
        self.loop = loop
        self._mm = segment.mm
        self._max_event_size = segment.max_event_size
        self._words = segment.words
        self._ring: RingReader[_Route] = RingReader(
            segment.mm,
            segment.words,
            segment.ring_offset,
            segment.capacity,
            segment.max_event_size,
            cursor,
            next_seq,
        )
        self._subs: dict[QueueSubscription, int] = {}
        self._newest_start = 0
        self._routes: dict[bytes, _Route | None] = {}
        self._flag = OFF_SLEEP_FLAGS + segment.slot
        self._slot = segment.slot
        self._channel = WakeChannel(segment.fifo_path(segment.slot), segment.mode, segment.gid)
        self._scheduled = False
        self._stopped = False
        # Subscriptions may be added or removed from other threads (other
        # event loops); a step and those changes exclude each other.
        self._lock = threading.Lock()
        # Low-latency mode: when the current spin started (None: not spinning
        # or mode off), and the smoothed idle gap between records.
        self._spin_until: float | None = 0.0 if low_latency else None
        self._asleep = False
        self._idle_since = 0.0
        self._idle_gap = SPIN_MAX
        #: Records rejected as unreadable.
        self.corrupt = 0
        #: Sequence numbers skipped (lapped reader, dead writer, corrupt run).
        self.lapped = 0
        #: Events handed to subscription queues.
        self.routed = 0
        self._retired_dropped = 0
        loop.add_reader(self._channel.fd, self._on_wake)
        self._heartbeat = loop.call_later(HEARTBEAT, self._on_heartbeat)
        self._recheck: asyncio.TimerHandle | None = None
        self._write_counters()
        self._schedule()

    # ─── Subscriptions ───

    def add(self, sub: QueueSubscription, start_seq: int) -> None:
        """Route records with sequence number >= *start_seq* to *sub*; from any thread."""
        with self._lock:
            self._subs[sub] = start_seq
            self._newest_start = max(self._newest_start, start_seq)
            self._routes.clear()
            self._words[slot_word(self._slot, SLOT_SUBSCRIPTIONS)] = len(self._subs)

    def remove(self, sub: QueueSubscription) -> None:
        """Stop routing to *sub*; from any thread."""
        with self._lock:
            if self._subs.pop(sub, None) is not None:
                self._retired_dropped += sub.dropped
                self._routes.clear()
                if not self._stopped:
                    self._words[slot_word(self._slot, SLOT_SUBSCRIPTIONS)] = len(self._subs)

    @property
    def subscriptions(self) -> list[QueueSubscription]:
        with self._lock:
            return list(self._subs)

    def stop(self) -> None:
        """Stop following the ring (no more wake-ups for this slot)."""
        if self._stopped:
            return
        self._stopped = True
        self._mm[self._flag] = 0
        with self._lock:
            self._write_counters()
        self._words[slot_word(self._slot, SLOT_SUBSCRIPTIONS)] = 0
        self._heartbeat.cancel()
        if self._recheck is not None:
            self._recheck.cancel()
        if not self.loop.is_closed():
            self.loop.remove_reader(self._channel.fd)
        self._channel.close()

    def abandon(self) -> None:
        """In a fork child: close our descriptor, touch nothing shared."""
        self._stopped = True
        self._channel.close()

    # ─── Scheduling ───

    def _schedule(self) -> None:
        if not self._scheduled and not self._stopped:
            self._scheduled = True
            self.loop.call_soon(self._step)

    def _on_wake(self) -> None:
        # The FIFO is drained when the reader next goes idle, not here: the
        # read() system call would sit on the latency path. Until then the
        # loop reports it readable on every iteration; ignore that while busy.
        if self._scheduled or not self._asleep:
            return
        self._asleep = False
        if self._spin_until is not None:
            self._idle_gap += (time.perf_counter() - self._idle_since - self._idle_gap) / 8
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        if not self._scheduled:
            self._step()

    def _on_recheck(self) -> None:
        self._recheck = None
        if not self._scheduled and not self._stopped and self._ring.pending():
            self._asleep = False
            self._step()

    def _on_heartbeat(self) -> None:
        if self._stopped:
            return
        self._heartbeat = self.loop.call_later(HEARTBEAT, self._on_heartbeat)
        if not self._scheduled and self._ring.pending():
            self._asleep = False
            self._step()

    def _step(self) -> None:
        self._scheduled = False
        if self._stopped:
            return
        with self._lock:
            expected = self._ring.expected_seq
            routed = self.routed
            try:
                batch = self._ring.read(BATCH, self._select)
                self._route(batch)
            except Exception:  # never let bad shared memory kill the loop's callback
                log.exception("reader failed on a batch; resynchronising at the write cursor")
                self.corrupt += 1
                # Whatever this batch held was not delivered: with the old
                # expected sequence number, the next record counts it as a gap.
                self._ring.expected_seq = expected
                self._ring.cursor = self._ring_write_cursor()
            self._write_counters()
        if self._ring.pending():
            self._schedule()
            return
        if self.routed != routed:
            # Let the consumers just woken run first: going idle (a read()
            # of the FIFO, a barrier, a timer) is not on their latency path.
            self._scheduled = True
            self.loop.call_soon(self._go_idle)
            return
        self._go_idle()

    def _go_idle(self) -> None:
        self._scheduled = False
        if self._stopped:
            return
        if self._ring.pending():
            self._step()
        elif self._spin_until is not None:
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
        if now < (self._spin_until or 0.0):
            self._scheduled = True
            self.loop.call_soon(self._spin_poll)
        else:
            self._scheduled = False
            self._sleep()

    def _spin_poll(self) -> None:
        if self._stopped:
            return
        if self._ring.pending():
            gap = time.perf_counter() - self._idle_since
            self._idle_gap += (gap - self._idle_gap) / 8
            self._step()
        else:
            self._spin_or_sleep()

    def _sleep(self) -> None:
        """Going idle: announce it, then look once more (see shmbus.wakeup)."""
        self._asleep = True
        self._channel.drain()
        self._mm[self._flag] = 1
        full_barrier()
        if self._ring.pending():
            self._mm[self._flag] = 0
            self._schedule()
        elif self._recheck is None:
            self._recheck = self.loop.call_later(IDLE_RECHECK, self._on_recheck)

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

    def _route(self, batch: RingBatch[_Route]) -> None:
        subs = self._subs
        for first, end in batch.gaps:
            self.lapped += end - first
            for sub, start in subs.items():
                missed = end - max(first, start)
                if missed > 0:
                    sub.count_lost(missed)
        self.corrupt += batch.corrupt
        if not batch.records:
            return
        newest_start = self._newest_start
        max_size = self._max_event_size
        decode = decode_envelope
        outbox: dict[QueueSubscription, list[Event]] = {}
        # Most batches go to one subscription: remember its list.
        last_sub: QueueSubscription | None = None
        last_box: list[Event] = []
        for seq, route, _raw, body, checksum_ok in batch.records:
            if route.__class__ is not tuple:
                self._reject(seq, tuple(subs))
                continue
            topic, targets = route
            if not checksum_ok:
                self._reject(seq, targets)
                continue
            try:
                event = decode(topic, body, max_size)
            except EnvelopeDecodeError as exc:
                log.debug("corrupt record %d: %s", seq, exc)
                self._reject(seq, targets)
                continue
            shared = False
            for sub in targets:
                if seq < newest_start and seq < subs.get(sub, seq + 1):
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

    def _reject(self, seq: int, targets: tuple[QueueSubscription, ...]) -> None:
        self.corrupt += 1
        for sub in targets:
            if seq >= self._subs.get(sub, seq + 1):
                sub.count_lost(1)

    # ─── Counters in shared memory ───

    def _ring_write_cursor(self) -> int:
        return int(self._words[W_WRITE_CURSOR])

    def dropped(self) -> int:
        """Events lost or evicted for this reader's subscriptions, ever."""
        return self._retired_dropped + sum(sub.dropped for sub in self._subs)

    def _write_counters(self) -> None:
        words = self._words
        slot = self._slot
        words[slot_word(slot, SLOT_READ_CURSOR)] = self._ring.cursor
        words[slot_word(slot, SLOT_DELIVERED)] = self.routed
        words[slot_word(slot, SLOT_DROPPED)] = self.dropped()
        words[slot_word(slot, SLOT_CORRUPT)] = self.corrupt
        words[slot_word(slot, SLOT_LAPPED)] = self.lapped
