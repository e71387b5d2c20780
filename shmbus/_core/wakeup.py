"""Waking sleeping readers: a named FIFO per asyncio reader, a doorbell (a
process-shared POSIX semaphore, :mod:`shmbus._core.semaphore`) per blocking
reader.

Why a FIFO for asyncio: the subscriber's event loop can watch its read end
directly (``loop.add_reader``), so a publisher's one-byte write wakes the
loop that runs the subscriptions, with no thread in between and no second
wake-up. Why a semaphore for a blocking reader: the consuming thread itself
sleeps in ``sem_timedwait`` and a ``sem_post`` wakes exactly it, the cheapest
cross-process wake-up there is; but the C library trusts a semaphore's
memory, and whoever may post it may write it, so only on a bus private to
its owner: on a bus shared with a group a blocking reader sleeps in
``poll()`` on a FIFO like an asyncio reader's (``docs/DESIGN.md`` has the
measurements behind these choices). Either way it is a doorbell, never a
lock: nobody waits for the one who rings it, and a ring that never comes
costs a timed re-check.

Protocol (the other half lives in :mod:`shmbus._core.reader` and :mod:`shmbus.shm`):

* A reader that finds nothing to read empties its FIFO or doorbell, stores 1
  in its slot's sleep flag, then ``F`` (a full fence,
  :mod:`shmbus._core.ordering`), and looks at every followed ring's
  ``write_cursor`` and its directory flag once more before it sleeps on its
  FIFO or doorbell; if it sees something, it clears its flag and reads.
* A publisher, after its commit, ``F``, then looks for sleep flags that are
  set; for each it stores 0 and rings that slot: one ``sem_post`` to its
  doorbell if the slot has one, else one byte to its FIFO. A busy reader
  never sets its flag, so publishers make no system call for it.
* The two ``F`` make a Dekker pair: either the publisher sees the flag or the
  reader sees the commit. A FIFO keeps its bytes and a semaphore its count,
  so a ring between the reader's re-check and its sleep is not lost.
* Readers also re-check on a short timer (the asyncio reader's timers, the
  blocking reader's timed wait), so a wake-up lost to a publisher that died,
  was stopped or was interrupted between its commit and the ring delays
  delivery by milliseconds, never stalls it.

Files: the reader creates its FIFO (``shmbus.NAME:wake.<16 hex>``) or its
doorbell (the semaphore ``/shmbus.NAME:bell.<16 hex>``, file
``sem.shmbus.NAME:bell.<16 hex>``) under a name with 64 random bits, never
an existing file (see :mod:`shmbus._core.shmfiles` and
:mod:`shmbus._core.semaphore`); it publishes the id in its slot
(``SLOT_WAKE_ID``) or in its bell word (``OFF_BELL_IDS``), and withdraws the
id before it removes the file. A publisher opens either without following
symlinks, checks that it is a FIFO, or a regular file big enough for a
semaphore, owned as the bus's files must be, and writes or posts nothing
otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import select
import threading

from ..errors import ForeignFileError, SegmentCorruptError
from .layout import SLOT_WAKE_ID, bell_word, slot_word
from .segment import Segment
from .semaphore import Semaphore
from .shmfiles import Access, bell_name, bell_path, fifo_path, make_fifo, open_checked

__all__ = ["Doorbell", "FifoBell", "WakeChannel", "Waker"]

log = logging.getLogger("shmbus._core.wakeup")

_DRAIN_SIZE = 4096


class WakeChannel:
    """The reading end of one reader's FIFO, published in its slot."""

    def __init__(self, segment: Segment) -> None:
        self._segment = segment
        self._slot = segment.slot
        for _attempt in range(8):
            wake_id = secrets.randbits(64) or 1
            path = fifo_path(segment.name, wake_id)
            try:
                self.fd = make_fifo(path, segment.access)
            except FileExistsError:
                continue  # a squatter guessed the name: draw another
            break
        else:
            raise FileExistsError(f"could not create a wake-up FIFO for bus {segment.name!r}")
        self.path = path
        self.wake_id = wake_id
        segment.words[slot_word(self._slot, SLOT_WAKE_ID)] = wake_id

    def fileno(self) -> int:
        return self.fd

    def drain(self) -> None:
        """Discard pending wake-up bytes."""
        try:
            while len(os.read(self.fd, _DRAIN_SIZE)) == _DRAIN_SIZE:
                pass
        except BlockingIOError:
            pass

    def close(self, *, unlink: bool = True) -> None:
        """Stop being wakeable: withdraw the id, close and remove the FIFO."""
        if self.fd < 0:
            return
        if unlink:
            with contextlib.suppress(Exception):
                self._segment.words[slot_word(self._slot, SLOT_WAKE_ID)] = 0
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = -1


class FifoBell(WakeChannel):
    """A blocking reader's FIFO: what it sleeps on when its bus is shared
    with a group (see :class:`Doorbell` for why). Only the slot's reader
    waits on it; :meth:`ring` may be called from any thread of the process."""

    def __init__(self, segment: Segment) -> None:
        super().__init__(segment)
        # ring() and close() exclude each other: a byte must never go to a
        # descriptor number that was closed and reused.
        self._lock = threading.Lock()
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)

    def wait(self, timeout: float) -> bool:
        """Sleep until a byte comes, up to *timeout* seconds (a signal whose
        handler raises ends it early); True if one came."""
        return bool(self._poll.poll(max(0.0, timeout) * 1000.0))

    def ring(self) -> None:
        """Wake the reader sleeping on this FIFO, from any thread of this
        process (a signal handler too: it never waits)."""
        if self._lock.acquire(blocking=False):
            try:
                if self.fd >= 0:
                    with contextlib.suppress(BlockingIOError):
                        os.write(self.fd, b"\x01")
            finally:
                self._lock.release()

    def close(self, *, unlink: bool = True) -> None:
        with self._lock:
            super().close(unlink=unlink)

    def abandon(self) -> None:
        """In a fork child: close this process's descriptor, touch nothing
        shared (the lock may have been held by a thread that did not survive
        fork)."""
        super().close(unlink=False)


class Doorbell:
    """The waiting end of one blocking reader's doorbell, a POSIX semaphore
    published in its slot's bell word. Only the slot's reader waits on it;
    :meth:`ring` may be called from any thread of the process (to wake that
    reader early).

    Only on a bus private to its owner (no group): the C library trusts a
    semaphore's memory (a scribbled one makes ``sem_post`` and
    ``sem_timedwait`` abort the process), and everyone who may post a
    semaphore may also write it. On a private bus those are the owner's own
    processes; on a bus shared with a group they would be other users', so
    there a blocking reader sleeps on a :class:`FifoBell` instead.
    """

    def __init__(self, segment: Segment) -> None:
        self._segment = segment
        self._slot = segment.slot
        # ring() and close() exclude each other: a post must never reach an
        # unmapped semaphore.
        self._lock = threading.Lock()
        for _attempt in range(8):
            bell_id = secrets.randbits(64) or 1
            path = bell_path(segment.name, bell_id)
            try:
                self._semaphore = Semaphore.create(
                    bell_name(segment.name, bell_id), path, segment.access
                )
            except FileExistsError:
                continue  # a squatter guessed the name: draw another
            break
        else:
            raise FileExistsError(f"could not create a doorbell for bus {segment.name!r}")
        self.path = path
        self.bell_id = bell_id
        segment.words[bell_word(self._slot)] = bell_id

    def drain(self) -> None:
        """Discard pending rings (before announcing sleep)."""
        self._semaphore.drain()

    def wait(self, timeout: float) -> bool:
        """Sleep until rung, up to *timeout* seconds (less on a signal); True
        if it was rung."""
        return self._semaphore.wait(timeout)

    def ring(self) -> None:
        """Wake the reader sleeping on this doorbell, from any thread of this
        process (a signal handler too: it never waits). Does nothing while
        the doorbell is being closed: its reader is not sleeping then."""
        if self._lock.acquire(blocking=False):
            try:
                self._semaphore.post()
            finally:
                self._lock.release()

    def close(self, *, unlink: bool = True) -> None:
        """Stop being wakeable: withdraw the id, remove the file, unmap it.
        No thread may be inside :meth:`wait` or :meth:`ring` (see
        :mod:`shmbus._core.semaphore`, rule 5)."""
        with self._lock:
            if self._semaphore.closed:
                return
            if unlink:
                with contextlib.suppress(Exception):
                    self._segment.words[bell_word(self._slot)] = 0
                self._semaphore.unlink()
            self._semaphore.close()


    def abandon(self) -> None:
        """In a fork child: drop this process's mapping, touch nothing shared
        (the lock may have been held by a thread that did not survive fork)."""
        self._semaphore.close()


class Waker:
    """The writing side: cached descriptors to other readers' FIFOs, and
    mappings of their doorbells."""

    def __init__(self, segment: Segment) -> None:
        self._segment = segment
        self._name = segment.name
        self._access = Access(segment.access.mode, segment.access.gid)
        self._fds: dict[int, tuple[int, int]] = {}  # slot -> (wake id, fd)
        self._bells: dict[int, tuple[int, Semaphore]] = {}  # slot -> (bell id, doorbell)

    def wake(self, slot: int) -> bool:
        """Ring *slot*'s doorbell if it has one, else write one byte to its
        FIFO; False if nobody could be woken."""
        bell_id = int(self._segment.words[bell_word(slot)])
        if bell_id:
            return self._ring(slot, bell_id)
        wake_id = int(self._segment.words[slot_word(slot, SLOT_WAKE_ID)])
        cached = self._fds.get(slot)
        if cached is not None and cached[0] != wake_id:
            self._forget(slot)
            cached = None
        if wake_id == 0:
            return False
        if cached is None:
            path = fifo_path(self._name, wake_id)
            try:
                fd = open_checked(path, os.O_WRONLY | os.O_NONBLOCK, self._access, fifo=True)
            except ForeignFileError as exc:
                log.warning("not waking slot %d: %s", slot, exc)
                return False
            except OSError as exc:
                # ENXIO: no reader has it open (its owner died); ENOENT: gone.
                if exc.errno not in (errno.ENXIO, errno.ENOENT):
                    log.warning("cannot open wake-up FIFO of slot %d: %s", slot, exc)
                return False
            self._fds[slot] = (wake_id, fd)
        else:
            fd = cached[1]
        try:
            os.write(fd, b"\x01")
        except BlockingIOError:
            return True  # full of unread wake-ups: the reader is awake anyway
        except OSError:
            # EPIPE: the reader went away. A new reader has a new FIFO.
            self._forget(slot)
            return False
        return True

    def _ring(self, slot: int, bell_id: int) -> bool:
        cached = self._bells.get(slot)
        if cached is not None and cached[0] != bell_id:
            self._forget_bell(slot)
            cached = None
        if cached is None:
            try:
                bell = Semaphore.open(
                    bell_name(self._name, bell_id), bell_path(self._name, bell_id), self._access
                )
            except (ForeignFileError, SegmentCorruptError) as exc:
                log.warning("not ringing slot %d: %s", slot, exc)
                return False
            except OSError as exc:
                # ENOENT: its reader closed or died and the file was removed.
                if exc.errno != errno.ENOENT:
                    log.warning("cannot open the doorbell of slot %d: %s", slot, exc)
                return False
            self._bells[slot] = (bell_id, bell)
        else:
            bell = cached[1]
        return bell.post()

    def _forget(self, slot: int) -> None:
        cached = self._fds.pop(slot, None)
        if cached is not None:
            os.close(cached[1])

    def _forget_bell(self, slot: int) -> None:
        cached = self._bells.pop(slot, None)
        if cached is not None:
            cached[1].close()

    def close(self) -> None:
        for slot in list(self._fds):
            self._forget(slot)
        for slot in list(self._bells):
            self._forget_bell(slot)
