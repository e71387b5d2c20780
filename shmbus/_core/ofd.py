"""Open-file-description byte locks: mutual exclusion the kernel cleans up.

Linux OFD locks (``F_OFD_SETLK``) belong to an open file description, not to
a process: two descriptors opened separately conflict even inside one
process, a lock is released when its last descriptor closes, and the kernel
releases it when the holder dies, however it dies. shmbus locks single bytes
of a segment's descriptor (see :mod:`shmbus._core.layout` for which byte means
what); the bytes need not lie inside the file.

Every function here is non-blocking or polls with a deadline, so no caller
can hang on a lock forever.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time

__all__ = ["holds_conflicting", "try_lock", "unlock", "wait_lock"]

# Values from <fcntl.h>; Python exposes them from 3.9 on Linux.
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)

# struct flock: short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid, padded to 8 bytes (l_pid must be 0 for OFD locks).
_FLOCK = struct.Struct("@hhqqi0q")


def _request(kind: int, byte: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0)


def try_lock(fd: int, byte: int, *, exclusive: bool) -> bool:
    """Take (or convert to) a lock on *byte*; False if another holder conflicts."""
    kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    try:
        fcntl.fcntl(fd, F_OFD_SETLK, _request(kind, byte))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def unlock(fd: int, byte: int) -> None:
    """Release whatever lock this descriptor holds on *byte*."""
    fcntl.fcntl(fd, F_OFD_SETLK, _request(fcntl.F_UNLCK, byte))


def wait_lock(fd: int, byte: int, *, exclusive: bool, timeout: float) -> bool:
    """Poll for the lock on *byte* until *timeout* seconds pass; True if taken."""
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        if try_lock(fd, byte, exclusive=exclusive):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def holds_conflicting(fd: int, byte: int, *, exclusive: bool = True) -> bool:
    """True if another open file description holds a lock on *byte* that
    would conflict with taking it (exclusively by default)."""
    kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    answer = fcntl.fcntl(fd, F_OFD_GETLK, _request(kind, byte))
    return bool(_FLOCK.unpack(answer)[0] != fcntl.F_UNLCK)
