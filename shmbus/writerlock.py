"""The writer lock: one publisher at a time, surviving holders that die.

Publishers are serialised by a POSIX semaphore (initial value 1). A holder
records itself in the segment header right after acquiring it (pid, process
start time, its instance slot, and a bumped epoch) and clears the record
before releasing it.

A holder is alive if the kernel still holds its slot's OFD byte lock for it
(the slot's pid and start time still match the record), or if psutil finds a
process with its pid *and* start time. The slot test is immune to pid
namespaces and clock steps; the pid test keeps a recycled pid from passing for
the holder.

Theory of operation
-------------------
A waiter blocks on the semaphore in slices of ``lock_timeout / 4``. After
each slice it inspects the holder record:

=====================================  =======================================
holder record                          waiter does
=====================================  =======================================
a live holder                          keeps waiting: slow is not dead
a dead holder, or a recycled pid       takes the lock over (below)
empty, the epoch unchanged for         takes the lock over: the holder died
``lock_timeout / 2``, and a dead       between acquiring and recording itself,
instance had announced it was          or between clearing and releasing
acquiring
=====================================  =======================================

Every instance sets its slot's *intent* word before it asks for the semaphore
and clears it after it has released it. An empty record with no dead instance
intending is a live holder in one of those two narrow windows (stalled, say,
by SIGSTOP): nobody takes over, however long it takes. A dead instance's slot
may be claimed by a newcomer before a waiter looks; the newcomer then records
the lock's epoch in ``orphan_epoch``, evidence that holds while the epoch does
not move. After a takeover the dead instances' intents and that evidence are
cleared, so one death is never taken over twice.

Takeover is arbitrated by an exclusive OFD lock on byte ``LOCK_TAKEOVER`` of
the segment (released by the kernel if the arbiter dies). Under it, the
waiter re-reads the epoch: if it moved, someone else already took over or
the lock changed hands, and the waiter goes back to waiting. Otherwise it
records itself with a bumped epoch and proceeds as the holder: the
semaphore's count, taken by the dead holder, passes to it, and its release
returns the count to the semaphore. So exactly one waiter takes over, however
many notice the death at once, within about ``lock_timeout`` seconds.

The one remaining hazard needs two faults at once: an instance dies while
*waiting* for the lock (its intent set) at the same time as a live holder
stalls for more than ``lock_timeout / 2`` in one of the empty-record windows.
That holder would be taken over while alive; when it releases, it finds the
epoch is no longer its own and does not post the semaphore.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import posix_ipc

from . import ofd
from .layout import (
    LOCK_SLOT_BASE,
    LOCK_TAKEOVER,
    MAX_SLOTS,
    SLOT_LOCK_INTENT,
    SLOT_PID,
    SLOT_START,
    W_LOCK_EPOCH,
    W_LOCK_PID,
    W_LOCK_RECOVERIES,
    W_LOCK_SLOT,
    W_LOCK_START,
    W_ORPHAN_EPOCH,
    slot_word,
)
from .procs import is_alive

__all__ = ["WriterLock"]

log = logging.getLogger("shmbus.writerlock")


class WriterLock:
    """The writer lock of one attached segment, for one bus instance.

    Not re-entrant, and not for concurrent use by threads of one instance:
    :class:`~shmbus.shm.ShmBus` serialises its threads with a thread lock
    before it calls :meth:`acquire`.
    """

    def __init__(
        self,
        semaphore: posix_ipc.Semaphore,
        words: memoryview,
        fd: int,
        identity: tuple[int, int],
        slot: int,
        lock_timeout: float,
        *,
        on_takeover: Callable[[int, int], None] | None = None,
    ) -> None:
        self._semaphore = semaphore
        self._words = words
        self._fd = fd
        self._pid, self._start = identity
        self._slot = slot
        self._intent = slot_word(slot, SLOT_LOCK_INTENT)
        self._epoch = 0
        self._timeout = lock_timeout
        self._slice = lock_timeout / 4
        self._on_takeover = on_takeover
        #: Takeovers this instance performed.
        self.takeovers = 0

    def acquire(self, give_up_after: float) -> bool:
        """Become the writer; False if that took longer than *give_up_after* s
        because a live holder kept the lock."""
        self._words[self._intent] = 1
        try:
            self._semaphore.acquire(self._slice)
        except posix_ipc.BusyError:
            if self._wait(give_up_after):
                return True
            self._words[self._intent] = 0
            return False
        self._record()
        return True

    def release(self) -> None:
        words = self._words
        if words[W_LOCK_EPOCH] != self._epoch:
            # Taken over while we held it (we stalled past lock_timeout / 2):
            # the taker's release will return the semaphore's count.
            log.error("writer lock was taken over while this process held it; not releasing")
            words[self._intent] = 0
            return
        words[W_LOCK_PID] = 0
        self._semaphore.release()
        words[self._intent] = 0

    # ─── Internals ───

    def _try_semaphore(self) -> bool:
        try:
            self._semaphore.acquire(self._slice)
        except posix_ipc.BusyError:
            return False
        return True

    def _record(self) -> None:
        words = self._words
        words[W_LOCK_START] = self._start
        words[W_LOCK_SLOT] = self._slot
        words[W_LOCK_PID] = self._pid
        epoch = self._epoch = words[W_LOCK_EPOCH] + 1
        words[W_LOCK_EPOCH] = epoch

    def _holder(self) -> tuple[int, int, int]:
        words = self._words
        return words[W_LOCK_PID], words[W_LOCK_START], words[W_LOCK_EPOCH]

    def _dead_intents(self) -> list[int]:
        """Slots whose owner announced it was acquiring the lock and has died
        (the kernel no longer holds their byte lock)."""
        words = self._words
        return [
            slot
            for slot in range(MAX_SLOTS)
            if words[slot_word(slot, SLOT_LOCK_INTENT)]
            and slot != self._slot
            and not ofd.holds_conflicting(self._fd, LOCK_SLOT_BASE + slot)
        ]

    def _holder_alive(self, pid: int, start: int) -> bool:
        slot = self._words[W_LOCK_SLOT]
        if (
            0 <= slot < MAX_SLOTS
            and self._words[slot_word(slot, SLOT_PID)] == pid
            and self._words[slot_word(slot, SLOT_START)] == start
            and ofd.holds_conflicting(self._fd, LOCK_SLOT_BASE + slot)
        ):
            return True
        return is_alive(pid, start)

    def _wait(self, give_up_after: float) -> bool:
        started = time.monotonic()
        empty_since: tuple[int, float] | None = None
        while True:
            pid, start, epoch = self._holder()
            now = time.monotonic()
            if pid:
                empty_since = None
                if not self._holder_alive(pid, start) and self._take_over(epoch, pid):
                    return True
            elif empty_since is None or empty_since[0] != epoch:
                empty_since = (epoch, now)
            elif (
                now - empty_since[1] >= self._timeout / 2
                and (self._dead_intents() or self._words[W_ORPHAN_EPOCH] == epoch + 1)
                and self._take_over(epoch, 0)
            ):
                return True
            if now - started >= give_up_after:
                log.error(
                    "writer lock held by live pid %d for %.1f s; giving up on this publish",
                    pid,
                    now - started,
                )
                return False
            if self._try_semaphore():
                self._record()
                return True

    def _take_over(self, seen_epoch: int, dead_pid: int) -> bool:
        if not ofd.wait_lock(self._fd, LOCK_TAKEOVER, exclusive=True, timeout=self._timeout):
            return False
        try:
            pid, _start, epoch = self._holder()
            if epoch != seen_epoch or pid != dead_pid:
                return False  # the lock moved on, or another waiter took over
            self._record()
            self._words[W_LOCK_RECOVERIES] += 1
            for slot in self._dead_intents():
                self._words[slot_word(slot, SLOT_LOCK_INTENT)] = 0
            self._words[W_ORPHAN_EPOCH] = 0
        finally:
            ofd.unlock(self._fd, LOCK_TAKEOVER)
        self.takeovers += 1
        log.warning("took over the writer lock from dead holder pid %d (epoch %d)", dead_pid, epoch)
        if self._on_takeover is not None:
            self._on_takeover(dead_pid, epoch)
        return True
