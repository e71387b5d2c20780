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
empty, and the epoch unchanged for     takes the lock over: the holder died
``lock_timeout / 2``                   between acquiring and recording itself,
                                       or between clearing and releasing
=====================================  =======================================

Takeover is arbitrated by an exclusive OFD lock on byte ``LOCK_TAKEOVER`` of
the segment (released by the kernel if the arbiter dies). Under it, the
waiter re-reads the epoch: if it moved, someone else already took over or
the lock changed hands, and the waiter goes back to waiting. Otherwise it
records itself with a bumped epoch and proceeds as the holder: the
semaphore's count, taken by the dead holder, passes to it, and its release
returns the count to the semaphore. So exactly one waiter takes over, however
many notice the death at once, within about ``lock_timeout`` seconds.

The one hazard: a live holder stalled for more than ``lock_timeout / 2``
in the few instructions between acquiring the semaphore and recording
itself (or clearing and releasing) would be taken over while alive. Readers
then see damaged records, which fail their checks and are counted as
corrupt; nothing crashes or hangs. When that holder releases, it finds the
epoch is no longer its own and does not post the semaphore, so the count never
exceeds one and the lock is whole again from then on.
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
    SLOT_PID,
    SLOT_START,
    W_LOCK_EPOCH,
    W_LOCK_PID,
    W_LOCK_RECOVERIES,
    W_LOCK_SLOT,
    W_LOCK_START,
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
        self._epoch = 0
        self._timeout = lock_timeout
        self._slice = lock_timeout / 4
        self._on_takeover = on_takeover
        #: Takeovers this instance performed.
        self.takeovers = 0

    def acquire(self, give_up_after: float) -> bool:
        """Become the writer; False if that took longer than *give_up_after* s
        because a live holder kept the lock."""
        try:
            self._semaphore.acquire(self._slice)
        except posix_ipc.BusyError:
            return self._wait(give_up_after)
        self._record()
        return True

    def release(self) -> None:
        words = self._words
        if words[W_LOCK_EPOCH] != self._epoch:
            # Taken over while we held it (we stalled past lock_timeout / 2):
            # the taker's release will return the semaphore's count.
            log.error("writer lock was taken over while this process held it; not releasing")
            return
        words[W_LOCK_PID] = 0
        self._semaphore.release()

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
            elif now - empty_since[1] >= self._timeout / 2 and self._take_over(epoch, 0):
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
        finally:
            ofd.unlock(self._fd, LOCK_TAKEOVER)
        self.takeovers += 1
        log.warning("took over the writer lock from dead holder pid %d (epoch %d)", dead_pid, epoch)
        if self._on_takeover is not None:
            self._on_takeover(dead_pid, epoch)
        return True
