"""The files of a bus in ``/dev/shm``: their names, and how they are created
and opened so that nobody else's file is ever used by mistake.

Files of bus ``NAME`` (``:`` cannot occur in a bus name, so no bus's files can
be mistaken for another's)::

    shmbus.NAME                  the bus segment (identity, slots, directory)
    shmbus.NAME:ring.<16 hex>    one ring per publishing instance
    shmbus.NAME:wake.<16 hex>    one wake-up FIFO per asyncio reader (and per
                                 blocking reader of a bus shared with a group)
    sem.shmbus.NAME:bell.<16 hex>  one doorbell per blocking reader of a private
                                 bus: the file of the named POSIX semaphore
                                 /shmbus.NAME:bell.<16 hex>

Rules (``/dev/shm`` is world-writable: assume another local user is waiting
to squat any name a bus may use):

1. A file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (FIFOs with
   ``mkfifo``, which fails on an existing name): creating never reuses a file.
   Ring, FIFO and doorbell names carry 64 random bits, so they cannot be
   guessed ahead.
2. A file is opened with ``O_NOFOLLOW`` (a symlink is refused) and checked on
   the open descriptor with ``fstat`` before any byte of it is trusted or
   written: its type (regular file or FIFO), its owner, and its mode.
3. A file's owner must be this process's effective uid, unless the bus is
   shared with a group (``group=``) and the file belongs to that group:
   anything else is a :class:`~shmbus.errors.ForeignFileError`, a
   ``PermissionError``, naming the file and its owner.
4. No file of a bus has permission bits beyond the bus's ``mode``: files are
   created with it and forced to it with ``fchmod`` (past the umask), and a
   file found with broader bits is refused.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import pwd
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import ForeignFileError, SegmentSpaceError

__all__ = [
    "MAX_BUS_NAME_LENGTH",
    "SHM_DIR",
    "Access",
    "bus_file_paths",
    "create_file",
    "bell_name",
    "bell_path",
    "fifo_path",
    "make_fifo",
    "open_checked",
    "ring_path",
    "segment_path",
    "validate_bus_name",
]

SHM_DIR = "/dev/shm"
_NAME_MAX = 255  # longest file name on Linux file systems
_BUS_NAME = re.compile(r"[A-Za-z0-9_.-]+")
#: The longest derived file name is a doorbell's, "sem.shmbus.NAME:bell.<16 hex>".
MAX_BUS_NAME_LENGTH = _NAME_MAX - len("sem.shmbus.:bell.") - 16


def validate_bus_name(name: object) -> str:
    """Return *name* if it can name a bus, else raise TypeError/ValueError."""
    if not isinstance(name, str):
        raise TypeError(f"bus name must be a str, not {type(name).__name__} ({name!r})")
    if not name:
        raise ValueError("bus name must not be empty")
    if len(name) > MAX_BUS_NAME_LENGTH:
        raise ValueError(
            f"bus name {name[:32]!r}... is {len(name)} characters; the limit is "
            f"{MAX_BUS_NAME_LENGTH} (file names in {SHM_DIR} are at most {_NAME_MAX})"
        )
    if _BUS_NAME.fullmatch(name) is None or name in (".", ".."):
        bad = sorted({ch for ch in name if _BUS_NAME.fullmatch(ch) is None})
        raise ValueError(
            f"bus name {name!r} may only contain letters, digits, '_', '-' and '.'"
            + (f"; found {''.join(bad)!r}" if bad else "")
        )
    return name


def segment_path(bus_name: str) -> str:
    """Path of the bus segment of bus *bus_name*."""
    return f"{SHM_DIR}/shmbus.{bus_name}"


def ring_path(bus_name: str, ring_id: int) -> str:
    """Path of the ring file with id *ring_id* of bus *bus_name*."""
    return f"{SHM_DIR}/shmbus.{bus_name}:ring.{ring_id:016x}"


def fifo_path(bus_name: str, wake_id: int) -> str:
    """Path of the wake-up FIFO with id *wake_id* of bus *bus_name*."""
    return f"{SHM_DIR}/shmbus.{bus_name}:wake.{wake_id:016x}"


def bell_name(bus_name: str, bell_id: int) -> str:
    """POSIX semaphore name of the doorbell with id *bell_id* of bus *bus_name*."""
    return f"/shmbus.{bus_name}:bell.{bell_id:016x}"


def bell_path(bus_name: str, bell_id: int) -> str:
    """Path of the file that holds the doorbell with id *bell_id* of bus
    *bus_name* (the C library's name for semaphore :func:`bell_name`)."""
    return f"{SHM_DIR}/sem.shmbus.{bus_name}:bell.{bell_id:016x}"


def bus_file_paths(bus_name: str) -> list[str]:
    """Every file in ``/dev/shm`` named as a file of bus *bus_name*, now;
    the segment last, so that removing them in this order leaves a newcomer
    that finds no segment free to create everything afresh."""
    pattern = f"{SHM_DIR}/shmbus.{glob.escape(bus_name)}:"
    others = sorted(
        glob.glob(pattern + "ring.[0-9a-f]*")
        + glob.glob(pattern + "wake.[0-9a-f]*")
        + glob.glob(f"{SHM_DIR}/sem.shmbus.{glob.escape(bus_name)}:bell.[0-9a-f]*")
    )
    segment = segment_path(bus_name)
    return [*others, segment] if os.path.lexists(segment) else others


@dataclass(frozen=True, slots=True)
class Access:
    """Who may own a bus's files and which permission bits they may have."""

    #: Permission bits of every file of the bus (never broader).
    mode: int
    #: The group the bus is shared with, or None for a private bus.
    gid: int | None


def _owner_name(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def owned_by(path: str) -> str:
    """' owned by uid N (name)' for the file at *path* (not following a
    symlink), or '' if it cannot be looked at: for error messages."""
    try:
        return f" owned by {_owner_name(os.lstat(path).st_uid)}"
    except OSError:
        return ""


def check_file(path: str, st: os.stat_result, access: Access, *, fifo: bool = False) -> None:
    """Raise :class:`ForeignFileError` unless *st* (an ``fstat`` of an open
    descriptor of *path*) is a file the bus may use (rules 2-4)."""
    kind_ok = stat.S_ISFIFO(st.st_mode) if fifo else stat.S_ISREG(st.st_mode)
    if not kind_ok:
        expected = "a FIFO" if fifo else "a regular file"
        raise ForeignFileError(
            errno.EPERM, f"{path} is not {expected} (mode {stat.filemode(st.st_mode)}); refusing it"
        )
    if st.st_uid != os.geteuid() and (access.gid is None or st.st_gid != access.gid):
        shared = (
            f"the bus is shared with gid {access.gid} but the file's group is {st.st_gid}"
            if access.gid is not None
            else "the bus is private to this user"
        )
        raise ForeignFileError(
            errno.EPERM,
            f"{path} is owned by {_owner_name(st.st_uid)}, not by this process "
            f"({_owner_name(os.geteuid())}), and {shared}; refusing it "
            f"(remove it, or use another bus name)",
        )
    if access.gid is not None and st.st_gid != access.gid:
        raise ForeignFileError(
            errno.EPERM, f"{path} belongs to gid {st.st_gid}, not to the bus's gid {access.gid}"
        )
    extra = st.st_mode & 0o777 & ~access.mode
    if extra:
        raise ForeignFileError(
            errno.EPERM,
            f"{path} has mode {st.st_mode & 0o777:#o}, broader than the bus's mode "
            f"{access.mode:#o}; refusing it",
        )


def open_checked(path: str, flags: int, access: Access, *, fifo: bool = False) -> int:
    """Open an existing file of the bus without following symlinks and check
    it (rules 2-4); return the descriptor.

    Raises FileNotFoundError if it does not exist, :class:`ForeignFileError`
    if it must not be used, and OSError for anything else.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ForeignFileError(
                errno.ELOOP, f"{path} is a symbolic link{owned_by(path)}; refusing it"
            ) from None
        raise
    try:
        check_file(path, os.fstat(fd), access, fifo=fifo)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _force_access(fd: int, access: Access) -> None:
    os.fchmod(fd, access.mode)  # creation applied the umask
    if access.gid is not None:
        os.fchown(fd, -1, access.gid)


def create_file(path: str, access: Access, size: int) -> int:
    """Create *path* (it must not exist), give it the bus's mode and group,
    and reserve *size* bytes of memory for it; return an O_RDWR descriptor.

    Raises FileExistsError if the name is taken, and
    :class:`~shmbus.errors.SegmentSpaceError` (naming both sizes) if
    ``/dev/shm`` cannot hold *size* bytes; nothing is left behind on failure.
    """
    fd = os.open(
        path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, access.mode
    )
    with _removed_on_failure(fd, path):
        _force_access(fd, access)
        if size:
            reserve(fd, path, size)
    return fd


@contextlib.contextmanager
def _removed_on_failure(fd: int, path: str) -> Iterator[None]:
    """Close *fd* and unlink *path* (a file just made) if the block raises."""
    try:
        yield
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def reserve(fd: int, path: str, size: int) -> None:
    """Size the file to *size* bytes with every page reserved, so that a full
    ``/dev/shm`` is an error now and never a SIGBUS later."""
    try:
        os.ftruncate(fd, size)
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            free = os.statvfs(SHM_DIR)
            available = free.f_bavail * free.f_frsize
            raise SegmentSpaceError(
                errno.ENOSPC,
                f"{path} needs {size} bytes in {SHM_DIR} but only {available} bytes are free; "
                "lower capacity or enlarge /dev/shm",
            ) from None
        raise


def make_fifo(path: str, access: Access) -> int:
    """Create the FIFO *path* (it must not exist) with the bus's mode and
    group; return a non-blocking O_RDWR descriptor of it (so it always has a
    writer: reads never see end-of-file and writers' opens never fail while
    it is open). Raises FileExistsError if the name is taken."""
    os.mkfifo(path, access.mode)
    with _removed_on_failure(-1, path):
        # Ours, just made: its group and mode are set below.
        fd = open_checked(path, os.O_RDWR | os.O_NONBLOCK, Access(0o777, None), fifo=True)
    with _removed_on_failure(fd, path):
        _force_access(fd, access)
    return fd
