"""Waking sleeping readers: one named FIFO per reading instance.

Why a FIFO: the subscriber's event loop can watch its read end directly
(``loop.add_reader``), so a publisher's one-byte write wakes the loop that
runs the subscriptions, with no thread in between and no second wake-up.
``docs/DESIGN.md`` has the measurements behind this choice.

Protocol (the other half lives in :mod:`shmbus._core.reader` and :mod:`shmbus.shm`):

* A reader that finds nothing to read stores 1 in its slot's sleep flag,
  then ``F`` (a full fence, :mod:`shmbus._core.ordering`), and looks at every
  followed ring's ``write_cursor`` and its directory flag once more before it
  sleeps on its FIFO.
* A publisher, after its commit, ``F``, then looks for sleep flags that are
  set; for each it stores 0 and writes one byte to that slot's FIFO. A busy
  reader never sets its flag, so publishers make no system call for it.
* The two ``F`` make a Dekker pair: either the publisher sees the flag or the
  reader sees the commit. Readers also poll on a short timer, so a wake-up
  lost to a publisher that died or was interrupted between its commit and
  the wake-up delays delivery by milliseconds, never stalls it.

Files: the reader creates its FIFO under a name with 64 random bits
(``shmbus.NAME:wake.<16 hex>``, never an existing file: see
:mod:`shmbus._core.shmfiles`), publishes the id in its slot, and removes the FIFO
when it stops. A publisher opens it without following symlinks, checks that
it is a FIFO owned as the bus's files must be, and writes nothing otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets

from ..errors import ForeignFileError
from .layout import SLOT_WAKE_ID, slot_word
from .segment import Segment
from .shmfiles import Access, fifo_path, make_fifo, open_checked

__all__ = ["WakeChannel", "Waker"]

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


class Waker:
    """The writing side: cached descriptors to other readers' FIFOs."""

    def __init__(self, segment: Segment) -> None:
        self._segment = segment
        self._name = segment.name
        self._access = Access(segment.access.mode, segment.access.gid)
        self._fds: dict[int, tuple[int, int]] = {}  # slot -> (wake id, fd)

    def wake(self, slot: int) -> bool:
        """Write one byte to *slot*'s FIFO; False if nobody reads it."""
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

    def _forget(self, slot: int) -> None:
        cached = self._fds.pop(slot, None)
        if cached is not None:
            os.close(cached[1])

    def close(self) -> None:
        for slot in list(self._fds):
            self._forget(slot)
