"""Waking sleeping readers: one named FIFO per instance slot.

Why a FIFO: the subscriber's event loop can watch its read end directly
(``loop.add_reader``), so a publisher's one-byte write wakes the loop that
runs the subscriptions, with no thread in between and no second wake-up.
``docs/DESIGN.md`` has the measurements behind this choice.

Protocol (the other half lives in :mod:`shmbus.reader` and :mod:`shmbus.shm`):

* A reader that finds nothing to read stores 1 in its slot's sleep flag,
  executes a full memory barrier, and looks at ``write_cursor`` once more
  before it sleeps on its FIFO.
* A publisher, after committing and releasing the writer lock (a barrier),
  looks for sleep flags that are set; for each it stores 0 and writes one byte
  to that slot's FIFO. A busy reader never sets its flag, so publishers make
  no system call for it.
* Readers also poll on a short timer, so even a lost wake-up (which the
  barriers rule out) could delay delivery by milliseconds, never stall it.

A FIFO outlives its owners: the next owner of the slot reuses it, and the
last process to leave the bus removes it with the segment.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading

__all__ = ["WakeChannel", "Waker", "fifo_path", "full_barrier"]

log = logging.getLogger("shmbus.wakeup")

_DRAIN_SIZE = 4096


_barrier_lock = threading.Lock()


def _new_barrier_lock() -> None:
    global _barrier_lock
    _barrier_lock = threading.Lock()  # another thread may have held it at fork


os.register_at_fork(after_in_child=_new_barrier_lock)


def full_barrier() -> None:
    """Order this thread's earlier stores before its later loads.

    Python has no fence instruction; acquiring and releasing a lock runs an
    atomic read-modify-write (a locked instruction on x86-64, acquire/release
    atomics on arm64), which orders a store before it against loads after it.
    """
    _barrier_lock.acquire()
    _barrier_lock.release()


def fifo_path(bus_name: str, slot: int) -> str:
    """Path of the wake-up FIFO of *slot* of bus *bus_name*."""
    return f"/dev/shm/shmbus.{bus_name}:wake.{slot:03d}"


class WakeChannel:
    """The reading end of one slot's FIFO, for the slot's owner."""

    def __init__(self, path: str, mode: int, gid: int | None) -> None:
        self.path = path
        try:
            os.mkfifo(path, mode)
        except FileExistsError:
            pass
        else:
            os.chmod(path, mode)  # mkfifo is subject to the umask
            if gid is not None:
                os.chown(path, -1, gid)
        # O_RDWR: the FIFO then always has a writer (us), so it never reads
        # as end-of-file, and publishers' opens never fail while we live.
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        if not stat.S_ISFIFO(os.fstat(self.fd).st_mode):
            os.close(self.fd)
            raise FileExistsError(
                f"{path} exists and is not a FIFO; remove it or pick another bus name"
            )
        self.drain()

    def fileno(self) -> int:
        return self.fd

    def drain(self) -> None:
        """Discard pending wake-up bytes."""
        try:
            while len(os.read(self.fd, _DRAIN_SIZE)) == _DRAIN_SIZE:
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Waker:
    """The writing side: cached descriptors to other slots' FIFOs."""

    def __init__(self, bus_name: str) -> None:
        self._bus_name = bus_name
        self._fds: dict[int, int] = {}

    def wake(self, slot: int) -> bool:
        """Write one byte to *slot*'s FIFO; False if nobody reads it."""
        fd = self._fds.get(slot)
        if fd is None:
            try:
                fd = os.open(
                    fifo_path(self._bus_name, slot), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC
                )
            except OSError as exc:
                # ENXIO: no reader has it open (its owner died); ENOENT: gone.
                if exc.errno not in (errno.ENXIO, errno.ENOENT):
                    log.warning("cannot open wake-up FIFO of slot %d: %s", slot, exc)
                return False
            self._fds[slot] = fd
        try:
            os.write(fd, b"\x01")
        except BlockingIOError:
            return True  # full of unread wake-ups: the reader is awake anyway
        except OSError:
            # EPIPE: the reader went away. Reopen next time; a new owner of
            # the slot opens the same FIFO.
            self._forget(slot)
            return False
        return True

    def _forget(self, slot: int) -> None:
        fd = self._fds.pop(slot, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for slot in list(self._fds):
            self._forget(slot)
