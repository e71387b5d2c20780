"""Named POSIX semaphores of a bus: the doorbells that wake blocking readers
(:mod:`shmbus._core.wakeup` says when they are rung).

A doorbell is a named POSIX semaphore (``posix_ipc``, which wraps
``sem_open``): its name is ``/shmbus.NAME:bell.<16 hex>``, which the C
library keeps as the file ``/dev/shm/sem.shmbus.NAME:bell.<16 hex>``
(:func:`~shmbus._core.shmfiles.bell_path`). ``sem_open`` opens files by name
itself, so the rules of :mod:`shmbus._core.shmfiles` are applied around it:

Rules
-----
1. Creating: ``sem_open(O_CREAT | O_EXCL)``, which makes the file under a
   temporary name and links it to the bell's name only if that name is free
   (never an existing file, never through a symlink). Then the file is
   opened with ``O_NOFOLLOW``, checked with ``fstat`` (a regular file of ours)
   and given the bus's mode and group with ``fchmod``/``fchown``, past the
   umask. In the sticky ``/dev/shm`` nobody else can unlink or replace it.
2. Opening someone's: the file is opened with ``O_NOFOLLOW`` and checked on
   the descriptor (regular file, owner, mode, and exactly ``BELL_SEM_SIZE``
   bytes, what ``sem_open`` writes: the mapping it makes cannot fault, and
   no other file of the bus's owner passes for a doorbell); then ``sem_open``
   (which also refuses symlinks); then the name is looked at again: it must
   still be the very file checked (same device and inode), else the
   semaphore is closed unused. The name could only have changed if its owner
   removed it meanwhile and someone else made a new file there; inode
   numbers of a tmpfs are not reused, so the same inode before and after
   means ``sem_open`` opened the file that was checked.
3. Waiting (only the creator waits): ``sem_timedwait`` with a timeout,
   without the GIL. A wait ends on a post, at its timeout, on a signal
   (Python runs the handler when the call returns) or on an error; the
   caller always re-checks what it waits for and never trusts the count. The
   timeout runs on the wall clock (``sem_timedwait``): a wall clock stepped
   back lengthens one wait by the step, no more (a post still ends it).
4. The count is untrusted (anyone who may post may post in a loop):
   :meth:`Semaphore.drain` takes at most ``DRAIN_LIMIT`` posts at a time.
5. A semaphore is closed only when no thread of the process can be inside a
   call on it (the caller's duty: the C library would touch unmapped memory).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

import posix_ipc

from ..errors import ForeignFileError, SegmentCorruptError
from .layout import BELL_SEM_SIZE
from .shmfiles import Access, check_file, open_checked

__all__ = ["DRAIN_LIMIT", "Semaphore"]

#: Posts :meth:`Semaphore.drain` takes at most, each time it is called.
DRAIN_LIMIT = 64

_BusyError = posix_ipc.BusyError
_SignalError = posix_ipc.SignalError


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class Semaphore:
    """One doorbell, open: :meth:`create` it to wait on it, :meth:`open`
    someone else's to post it.

    *name* is its POSIX name, *path* its file in ``/dev/shm``.
    """

    __slots__ = ("name", "path", "_semaphore", "_post", "_acquire")

    def __init__(self, name: str, path: str, semaphore: posix_ipc.Semaphore) -> None:
        self.name = name
        self.path = path
        self._semaphore: posix_ipc.Semaphore | None = semaphore
        self._post = semaphore.release
        self._acquire = semaphore.acquire

    @classmethod
    def create(cls, name: str, path: str, access: Access) -> Semaphore:
        """Create the doorbell *name* (it must not exist) with the bus's access,
        its count at 0 (rule 1). Raises FileExistsError if the name is taken;
        leaves nothing behind on failure."""
        try:
            semaphore = posix_ipc.Semaphore(
                name, posix_ipc.O_CREX, mode=access.mode, initial_value=0
            )
        except posix_ipc.ExistentialError:
            raise FileExistsError(errno.EEXIST, f"{path} exists") from None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                # Ours, just linked under this name: checked as ours, then
                # given the bus's bits and group.
                check_file(path, os.fstat(fd), Access(0o777, None))
                os.fchmod(fd, access.mode)
                if access.gid is not None:
                    os.fchown(fd, -1, access.gid)
            finally:
                os.close(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            semaphore.close()
            raise
        return cls(name, path, semaphore)

    @classmethod
    def open(cls, name: str, path: str, access: Access) -> Semaphore:
        """Open someone's doorbell *name* to post it, checked by rule 2.

        Raises FileNotFoundError if it is gone,
        :class:`~shmbus.errors.ForeignFileError` if it must not be used, and
        :class:`~shmbus.errors.SegmentCorruptError` if it has not a
        semaphore's size."""
        fd = open_checked(path, os.O_RDONLY, access)
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if st.st_size != BELL_SEM_SIZE:
            raise SegmentCorruptError(
                f"{path} is {st.st_size} bytes, not a semaphore's {BELL_SEM_SIZE}; refusing it"
            )
        try:
            semaphore = posix_ipc.Semaphore(name)
        except posix_ipc.ExistentialError:
            raise FileNotFoundError(errno.ENOENT, f"{path} is gone") from None
        try:
            now = os.stat(path, follow_symlinks=False)
            if not stat.S_ISREG(now.st_mode) or _identity(now) != _identity(st):
                raise ForeignFileError(
                    errno.EPERM, f"{path} was replaced while it was being opened; refusing it"
                )
        except BaseException:
            semaphore.close()
            raise
        return cls(name, path, semaphore)

    @property
    def closed(self) -> bool:
        return self._semaphore is None

    def post(self) -> bool:
        """Add one to the count, waking the waiter; False if that failed."""
        if self._semaphore is None:
            return False
        try:
            self._post()
        except (posix_ipc.Error, OSError, ValueError):
            return False  # a count at its maximum: the waiter is woken anyway
        return True

    def wait(self, timeout: float) -> bool:
        """Take one from the count, waiting up to *timeout* seconds for a post;
        True if one was taken. False at the timeout, early on a signal or an
        error (rule 3)."""
        if self._semaphore is None:
            return False
        try:
            self._acquire(max(0.0, timeout))
        except (_BusyError, _SignalError):
            return False
        except (posix_ipc.Error, OSError, ValueError):
            return False
        return True

    def drain(self) -> int:
        """Take the pending posts, at most ``DRAIN_LIMIT`` (rule 4); return how
        many were taken."""
        taken = 0
        while taken < DRAIN_LIMIT and self.wait(0):
            taken += 1
        return taken

    def close(self) -> None:
        """Close this process's handle (rule 5: no thread may be inside a
        call on it). The file stays: see :meth:`unlink`."""
        semaphore, self._semaphore = self._semaphore, None
        if semaphore is None:
            return
        with contextlib.suppress(posix_ipc.Error, OSError):
            semaphore.close()

    def unlink(self) -> None:
        """Remove the doorbell's name (handles stay usable until closed)."""
        with contextlib.suppress(OSError):
            os.unlink(self.path)
