"""The blocking reader: a ring follower on a slot of its own, stepped by the
thread that consumes its subscription, which sleeps on the slot's doorbell.

Owns
----
One :class:`SyncReader` per blocking subscription: its own attachment to the
bus (a second descriptor of the segment, with its own shared attach lock and
its own slot), the :class:`~shmbus._core.reader.RingFollower` of that slot,
and the slot's doorbell (:class:`~shmbus._core.wakeup.Doorbell`, a POSIX
semaphore; :class:`~shmbus._core.wakeup.FifoBell`, a FIFO, on a bus shared
with a group).

Why one per subscription (not one per bus instance): the thread that waits
for an event is the one that reads the rings, so nothing is handed from
thread to thread, and threads that each consume a subscription of their own
never wait for one another. A slot per subscription costs one of the bus's
128 slots, a 4 KiB doorbell file, and the copy of each matching record that
a reader in another process would make.

Invariants
----------
* The reader is a :class:`~shmbus.delivery.Pump`: only the thread holding
  it (inside ``get()`` or ``skip_backlog()``) steps it, moves its cursors to
  now (:meth:`SyncReader.skip_backlog`, which counts nothing: its one
  subscription gave up what it has not read), puts it to sleep or closes
  it; any thread may :meth:`SyncReader.interrupt` it.
* It is attached like a bus instance (a shared ``LOCK_ATTACH`` and a slot
  byte on a descriptor of its own), so the segment is never reset under it,
  other readers see its slot as live, and whichever of the instance and its
  readers detaches last removes the bus's files.
* Its descriptor is not the instance's: the instance's own ring's lock byte
  is held by another open file description, so to this reader that writer
  is alive like any other, and the instance's reclaims see this slot's lock
  as held by someone else. No code has to tell the two apart.
* Sleep follows :mod:`shmbus._core.wakeup`: empty the doorbell, announce
  (flag, ``F``, look again), then wait on it with a timeout: at most
  ``IDLE_RECHECK`` the first time after reading something, ``HEARTBEAT``
  afterwards, never past the caller's deadline. So a wake-up lost to a
  publisher killed or stopped between its commit and its ring costs
  milliseconds, and nothing any other process does can keep it asleep.
* ``HEARTBEAT`` also paces the follower's chores (finished rings, reclaims),
  done in the steps of the thread that consumes. The slot's counters (what
  ``shmbus stat`` shows) are written before each sleep and on the heartbeat,
  not at every step: off the path from a wake-up to the event in hand.
"""

from __future__ import annotations

import logging
import os
import time

from ..errors import SegmentError
from .reader import HEARTBEAT, IDLE_RECHECK, RingFollower, RingKey, Target
from .segment import Segment, SegmentOptions
from .wakeup import Doorbell, FifoBell

__all__ = ["SyncReader"]

log = logging.getLogger("shmbus._core.sync_reader")

#: A reader that does not sleep looks at the clock every this many steps + 1
#: (a mask), for its chores.
_BUSY_BEAT_STEPS = 63
#: How long attaching the reader's slot may wait for the attach lock, in
#: seconds. Its instance holds the lock shared, so nobody can hold it
#: exclusively and this is never waited for; it bounds the unforeseen.
_ATTACH_TIMEOUT = 2.0


def _no_own_ring() -> RingKey | None:
    return None


class SyncReader:
    """The blocking driver of one subscription's :class:`RingFollower`.

    Parameters
    ----------
    options:
        The instance's options (the bus to attach).
    segment_id:
        ``(st_dev, st_ino)`` of the instance's segment: the reader must be on
        the same bus, not on one made afresh after the files were removed.
    """

    def __init__(self, options: SegmentOptions, segment_id: tuple[int, int]) -> None:
        segment = Segment.attach(options, _ATTACH_TIMEOUT)
        try:
            st = os.fstat(segment.fd)
            if (st.st_dev, st.st_ino) != segment_id:
                raise SegmentError(
                    f"bus {options.name!r}: its files were removed and made anew since this "
                    "instance connected (shmbus clean --force?); connect a new ShmBus"
                )
            # A semaphore only where nobody else may write it (wakeup's rules).
            bell: Doorbell | FifoBell = (
                Doorbell(segment) if segment.access.gid is None else FifoBell(segment)
            )
        except BaseException:
            segment.detach()
            raise
        self._segment = segment
        self._bell = bell
        self.follower = RingFollower(segment, _no_own_ring)
        self._idle = False
        self._next_beat = time.monotonic() + HEARTBEAT
        self._steps = 0
        self._closed = False

    @property
    def slot(self) -> int:
        return self._segment.slot

    def add(self, sub: Target) -> None:
        """Route records published from now on to *sub*."""
        self.follower.add(sub)

    # ─── The pump ───

    def step(self) -> None:
        if self._closed:
            return
        # Counters are written when the reader goes idle, off the latency path.
        if self.follower.step(counters=False):
            self._idle = False
        # A reader that never sleeps looks at the clock for its chores now
        # and then; one that sleeps does before it sleeps.
        self._steps += 1
        if not self._steps & _BUSY_BEAT_STEPS and time.monotonic() >= self._next_beat:
            self._beat(time.monotonic())

    def skip_backlog(self) -> None:
        """Give up what the subscription has not read: every followed ring's
        cursor moves to its newest committed record, nothing counted
        (:meth:`~shmbus._core.reader.RingFollower.skip_to_newest`)."""
        if self._closed:
            return
        self.follower.skip_to_newest()

    def _beat(self, now: float) -> None:
        self._next_beat = now + HEARTBEAT
        self.follower.heartbeat()

    def sleep(self, deadline: float | None) -> None:
        if self._closed:
            return
        bell = self._bell
        follower = self.follower
        now = time.monotonic()
        if now >= self._next_beat:
            self._beat(now)
        follower.write_counters()
        bell.drain()
        if not follower.announce_sleep():
            return  # something came: the caller steps again
        timeout = min(HEARTBEAT if self._idle else IDLE_RECHECK, self._next_beat - now)
        self._idle = True
        if deadline is not None:
            timeout = min(timeout, deadline - now)
        if not bell.wait(timeout):
            # Not rung (a timeout, a signal): take the flag down, so that a
            # busy reader costs publishers nothing. A publisher that rang
            # took it down already.
            follower.clear_sleep_flag()

    def interrupt(self) -> None:
        self._bell.ring()

    def close(self) -> None:
        """Leave the bus: the slot, the doorbell, the attachment (the last
        attachment out removes the bus's files). Every step runs even if one
        raised."""
        if self._closed:
            return
        self._closed = True
        try:
            self.follower.close()
        finally:
            try:
                self._bell.close()
            finally:
                self._segment.detach()

    def abandon(self) -> None:
        """In a fork child: drop this process's copies, touch nothing shared."""
        self._closed = True
        self._bell.abandon()
        self._segment.abandon()
