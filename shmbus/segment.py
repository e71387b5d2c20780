"""A bus's shared resources: the segment, its writer semaphore and the
wake-up FIFOs; how they are created, attached, validated and removed.

Resources of bus ``NAME`` (all in ``/dev/shm``)::

    shmbus.NAME              the segment (header, slots, ring)
    sem.shmbus.NAME:lock     the writer semaphore
    shmbus.NAME:wake.NNN     the wake-up FIFO of slot NNN

Attach protocol
---------------
Every attached instance holds a *shared* OFD lock on byte ``LOCK_ATTACH`` of
the segment for as long as it is attached, and an *exclusive* one on its slot
byte. The kernel drops both when the process dies, so:

* whoever takes ``LOCK_ATTACH`` *exclusively* is alone on the bus. Only then
  is the segment initialised, or reset if it was left by crashed processes
  or with other options; the semaphore is recreated too, since a dead
  holder may have left it taken. Then the lock is downgraded to shared.
* whoever gets only a *shared* lock joins a live bus and validates the
  header: magic, layout version, state, capacity and event size, with a
  clear error for each mismatch.
* on detach, an instance that can upgrade its shared lock to exclusive is
  the last one out and removes every resource of the bus.

A process that opened the segment just before the last one removed it finds,
once it holds the lock, that the name no longer leads to its inode, and
starts over; so nobody ever attaches to a removed segment.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import mmap
import os
import re
import time
from dataclasses import dataclass

import posix_ipc

from . import ofd
from .errors import (
    IncompatibleSegmentError,
    NoFreeSlotError,
    SegmentCorruptError,
    SegmentError,
    SegmentSpaceError,
)
from .layout import (
    HEADER_SIZE,
    IDENTITY,
    LAYOUT_VERSION,
    LOCK_ATTACH,
    LOCK_SLOT_BASE,
    MAGIC,
    MAX_CAPACITY,
    MAX_MAX_EVENT_SIZE,
    MAX_SLOTS,
    MIN_MAX_EVENT_SIZE,
    NO_GROUP,
    OFF_SLEEP_FLAGS,
    RING_OFFSET,
    SEGMENT_READY,
    SLOT_COMMAND,
    SLOT_COMMAND_SIZE,
    SLOT_LOCK_INTENT,
    SLOT_PID,
    SLOT_SIZE,
    SLOT_START,
    W_LOCK_EPOCH,
    W_ORPHAN_EPOCH,
    min_capacity,
    read_identity,
    segment_size,
    slot_offset,
    slot_word,
)
from .procs import self_identity
from .wakeup import fifo_path

__all__ = [
    "Segment",
    "SegmentOptions",
    "lock_semaphore_name",
    "remove_resources",
    "resource_paths",
    "still_linked",
    "segment_name",
    "validate_bus_name",
]

log = logging.getLogger("shmbus.segment")

SHM_DIR = "/dev/shm"
_NAME_MAX = 255  # longest file name on Linux file systems
_BUS_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# The longest derived file name is the FIFO's, "shmbus.NAME:wake.NNN".
MAX_BUS_NAME_LENGTH = _NAME_MAX - len("shmbus.:wake.000")
_ATTACH_TIMEOUT = 10.0


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


def segment_name(bus_name: str) -> str:
    """The POSIX shared-memory name of the segment (``/shmbus.NAME``)."""
    return f"/shmbus.{bus_name}"


def lock_semaphore_name(bus_name: str) -> str:
    """The POSIX semaphore name of the writer lock (``/shmbus.NAME:lock``)."""
    return f"/shmbus.{bus_name}:lock"


def resource_paths(bus_name: str) -> list[str]:
    """Every file in ``/dev/shm`` that belongs to bus *bus_name*, existing now."""
    candidates = [
        f"{SHM_DIR}/shmbus.{bus_name}",
        f"{SHM_DIR}/sem.shmbus.{bus_name}:lock",
        *_fifo_paths(bus_name),
    ]
    return [path for path in candidates if os.path.lexists(path)]


@dataclass(frozen=True, slots=True)
class SegmentOptions:
    """What a bus instance asks of its segment."""

    name: str
    capacity: int
    max_event_size: int
    mode: int
    gid: int | None

    def __post_init__(self) -> None:
        validate_bus_name(self.name)
        for label, value in (("capacity", self.capacity), ("max_event_size", self.max_event_size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{label} must be an int, not {type(value).__name__}")
        if self.max_event_size > MAX_MAX_EVENT_SIZE:
            raise ValueError(
                f"max_event_size {self.max_event_size} exceeds the limit of "
                f"{MAX_MAX_EVENT_SIZE} bytes (record lengths are 32-bit)"
            )
        if self.max_event_size < MIN_MAX_EVENT_SIZE:
            raise ValueError(
                f"max_event_size {self.max_event_size} is below the minimum of "
                f"{MIN_MAX_EVENT_SIZE} bytes"
            )
        needed = min_capacity(self.max_event_size)
        if self.capacity < needed:
            raise ValueError(
                f"capacity {self.capacity} is too small for max_event_size {self.max_event_size}: "
                f"the ring must hold two of the largest records, at least {needed} bytes"
            )
        if self.capacity > MAX_CAPACITY:
            raise ValueError(f"capacity {self.capacity} exceeds the limit of {MAX_CAPACITY} bytes")
        if self.capacity % 8:
            raise ValueError(f"capacity {self.capacity} must be a multiple of 8 bytes")
        if not isinstance(self.mode, int) or not 0 <= self.mode <= 0o777:
            raise ValueError(f"mode {self.mode!r} must be permission bits between 0o000 and 0o777")
        if self.mode & 0o600 != 0o600:
            raise ValueError(f"mode {oct(self.mode)} must give the owner read and write (0o600)")


class Segment:
    """One bus instance's attachment to its bus's shared resources.

    Holds the descriptor (with its OFD locks), the mapping, the writer
    semaphore and the instance's slot. :meth:`attach` and :meth:`detach` are
    the only ways in and out.
    """

    def __init__(
        self,
        options: SegmentOptions,
        fd: int,
        mm: mmap.mmap,
        semaphore: posix_ipc.Semaphore,
        capacity: int,
        max_event_size: int,
    ) -> None:
        self.options = options
        self.name = options.name
        self.fd = fd
        self.mm = mm
        #: The whole segment as 8-byte words (see layout: shared words are
        #: written only through this view).
        self.words = memoryview(mm).cast("Q")
        self.semaphore = semaphore
        self.capacity = capacity
        self.max_event_size = max_event_size
        self.ring_offset = RING_OFFSET
        self.slot = -1
        self.created = False
        #: Permission bits and group of the bus's files, as its creator set
        #: them (the FIFOs that joiners create follow them).
        self.mode = options.mode
        self.gid = options.gid

    # ─── Attach ───

    @classmethod
    def attach(cls, options: SegmentOptions, timeout: float = _ATTACH_TIMEOUT) -> Segment:
        """Create or join the bus described by *options*.

        Raises
        ------
        PermissionError
            The bus exists and its mode does not let this user in.
        SegmentCorruptError, IncompatibleSegmentError
            A live bus's header is damaged, or was made by another layout
            version or with other sizes.
        SegmentSpaceError
            ``/dev/shm`` has no room for the segment.
        NoFreeSlotError
            All slots are taken by live instances.
        SegmentError
            The bus stayed busy (being created or removed) for *timeout* s.
        """
        deadline = time.monotonic() + timeout
        while True:
            segment = cls._attach_once(options, deadline)
            if segment is not None:
                return segment
            if time.monotonic() > deadline:
                raise SegmentError(
                    f"bus {options.name!r} stayed busy (being created or removed) "
                    f"for {timeout:.0f} s"
                )
            time.sleep(0.001)

    @classmethod
    def _attach_once(cls, options: SegmentOptions, deadline: float) -> Segment | None:
        name = options.name
        try:
            shm = posix_ipc.SharedMemory(segment_name(name), posix_ipc.O_CREAT, mode=options.mode)
        except posix_ipc.PermissionsError:
            raise PermissionError(
                errno.EACCES,
                f"no permission to open bus {name!r} ({SHM_DIR}/shmbus.{name}); "
                "it was created with a mode or group that excludes this user",
            ) from None
        fd = shm.fd
        try:
            if ofd.try_lock(fd, LOCK_ATTACH, exclusive=True):
                if not still_linked(fd, name):
                    os.close(fd)
                    return None
                segment: Segment | None = cls._initialise(options, fd)
            else:
                remaining = max(0.0, deadline - time.monotonic())
                if not ofd.wait_lock(fd, LOCK_ATTACH, exclusive=False, timeout=remaining):
                    os.close(fd)
                    return None
                if not still_linked(fd, name):
                    os.close(fd)
                    return None
                segment = cls._join(options, fd)
                if segment is None:
                    os.close(fd)
                    return None
            assert segment is not None
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        try:
            segment._claim_slot()
        except BaseException:
            segment.detach()
            raise
        return segment

    @classmethod
    def _initialise(cls, options: SegmentOptions, fd: int) -> Segment:
        """Alone on the bus (exclusive attach lock): build it from scratch.

        The files may belong to another user of the bus's group (``/dev/shm``
        is sticky: only their owner may remove them), so they are reused, not
        recreated, and only their owner changes their mode and group.
        """
        name = options.name
        size = segment_size(options.capacity)
        stat = os.fstat(fd)
        if stat.st_size:
            log.info("bus %r: resetting a segment left with no live process", name)
        if _may_change_owner_bits(stat.st_uid):
            os.fchmod(fd, options.mode)
            if options.gid is not None:
                os.fchown(fd, -1, options.gid)
            stat = os.fstat(fd)
        try:
            os.ftruncate(fd, size)
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                remove_resources(name)
                free = os.statvfs(SHM_DIR)
                available = free.f_bavail * free.f_frsize
                raise SegmentSpaceError(
                    errno.ENOSPC,
                    f"bus {name!r} needs {size} bytes in {SHM_DIR} but only {available} are free; "
                    "lower capacity or enlarge /dev/shm",
                ) from None
            raise
        mode = stat.st_mode & 0o777
        gid = stat.st_gid if options.gid is not None else NO_GROUP
        mm = mmap.mmap(fd, size)
        try:
            # posix_fallocate reserved the pages; zero the header (the ring
            # is never read before it is written).
            mm[:HEADER_SIZE] = bytes(HEADER_SIZE)
            pid, _ = self_identity()
            IDENTITY.pack_into(
                mm,
                0,
                MAGIC,
                LAYOUT_VERSION,
                0,
                options.capacity,
                options.max_event_size,
                RING_OFFSET,
                pid,
                time.time_ns(),
                mode,
                gid,
            )
            semaphore = _reset_writer_semaphore(name, mode, None if gid == NO_GROUP else gid)
            # The header is complete: only now may others trust it.
            mm[12:16] = SEGMENT_READY.to_bytes(4, "little")
            if not ofd.try_lock(fd, LOCK_ATTACH, exclusive=False):  # downgrade
                raise SegmentError(f"bus {name!r}: could not downgrade the attach lock")
        except BaseException:
            mm.close()
            # Alone and half-built: leave nothing behind (the caller closes fd).
            remove_resources(name)
            raise
        segment = cls(options, fd, mm, semaphore, options.capacity, options.max_event_size)
        segment.created = True
        segment.mode = mode
        segment.gid = None if gid == NO_GROUP else gid
        return segment

    @classmethod
    def _join(cls, options: SegmentOptions, fd: int) -> Segment | None:
        """Others are attached (shared attach lock): validate and map."""
        name = options.name
        size = os.fstat(fd).st_size
        if size < HEADER_SIZE:
            _retry_if_alone(fd, name, f"segment is {size} bytes, smaller than its header")
            return None
        with mmap.mmap(fd, HEADER_SIZE) as header:
            identity = read_identity(header)
        magic, version, state = identity.magic, identity.layout_version, identity.state
        capacity, max_event_size = identity.capacity, identity.max_event_size
        ring_offset, mode, gid = identity.ring_offset, identity.mode, identity.gid
        if magic != MAGIC:
            _retry_if_alone(fd, name, f"magic number is {magic:#018x}, expected {MAGIC:#018x}")
            return None
        if version != LAYOUT_VERSION:
            raise IncompatibleSegmentError(
                f"bus {name!r} uses segment layout version {version}; "
                f"this shmbus uses layout version {LAYOUT_VERSION}"
            )
        if state != SEGMENT_READY:
            _retry_if_alone(fd, name, f"state word is {state:#x}, not READY")
            return None
        if ring_offset != RING_OFFSET or size != segment_size(capacity) or capacity > MAX_CAPACITY:
            raise SegmentCorruptError(
                f"bus {name!r} has a corrupted header: capacity {capacity}, ring offset "
                f"{ring_offset} and file size {size} do not agree"
            )
        if capacity != options.capacity:
            raise IncompatibleSegmentError(
                f"bus {name!r} exists with capacity {capacity} bytes; this instance asked for "
                f"{options.capacity} bytes (use the same capacity or another bus name)"
            )
        if max_event_size != options.max_event_size:
            raise IncompatibleSegmentError(
                f"bus {name!r} exists with max_event_size {max_event_size} bytes; this instance "
                f"asked for {options.max_event_size} bytes"
            )
        try:
            semaphore = posix_ipc.Semaphore(lock_semaphore_name(name))
        except posix_ipc.ExistentialError:
            # The last instance died while removing the bus; if everyone has
            # gone, start over, else the live bus really lost its semaphore.
            _retry_if_alone(
                fd,
                name,
                f"its writer semaphore {SHM_DIR}/sem.shmbus.{name}:lock is missing "
                "(removed by hand?)",
            )
            return None
        except posix_ipc.PermissionsError:
            raise PermissionError(
                errno.EACCES, f"no permission to open the writer semaphore of bus {name!r}"
            ) from None
        try:
            mm = mmap.mmap(fd, size)
        except BaseException:
            semaphore.close()
            raise
        segment = cls(options, fd, mm, semaphore, capacity, max_event_size)
        segment.mode = mode & 0o777
        segment.gid = None if gid == NO_GROUP else gid
        return segment

    # ─── Slots ───

    def _claim_slot(self) -> None:
        pid, start = self_identity()
        for slot in range(MAX_SLOTS):
            if ofd.try_lock(self.fd, LOCK_SLOT_BASE + slot, exclusive=True):
                if self.words[slot_word(slot, SLOT_LOCK_INTENT)]:
                    # The previous owner died acquiring or holding the writer
                    # lock: keep that evidence for the lock's waiters, valid
                    # while the lock's epoch does not move (shmbus.writerlock).
                    self.words[W_ORPHAN_EPOCH] = self.words[W_LOCK_EPOCH] + 1
                base = slot_offset(slot)
                self.mm[base : base + SLOT_SIZE] = bytes(SLOT_SIZE)
                self.mm[OFF_SLEEP_FLAGS + slot] = 0
                command = _own_command().encode("utf-8", "replace")[:SLOT_COMMAND_SIZE]
                self.mm[base + SLOT_COMMAND : base + SLOT_COMMAND + len(command)] = command
                self.words[slot_word(slot, SLOT_START)] = start
                # pid last: a non-zero pid marks the slot as described.
                self.words[slot_word(slot, SLOT_PID)] = pid
                self.slot = slot
                return
        raise NoFreeSlotError(
            f"bus {self.name!r} has all {MAX_SLOTS} instance slots in use by live processes"
        )

    # ─── Detach ───

    def detach(self) -> bool:
        """Leave the bus; remove its resources if this was the last instance.

        Returns True if the resources were removed.
        """
        removed = False
        try:
            if self.slot >= 0:
                self.words[slot_word(self.slot, SLOT_PID)] = 0
                self.mm[OFF_SLEEP_FLAGS + self.slot] = 0
                ofd.unlock(self.fd, LOCK_SLOT_BASE + self.slot)
                self.slot = -1
            # Let go of our shared lock before trying for the exclusive one:
            # two last instances closing at once would otherwise each see the
            # other's shared lock and neither would remove the bus. Only
            # remove what is still ours: if the files were removed by hand (or
            # a forced cleanup) and a new bus took the name, leave it be.
            ofd.unlock(self.fd, LOCK_ATTACH)
            if ofd.try_lock(self.fd, LOCK_ATTACH, exclusive=True) and still_linked(
                self.fd, self.name
            ):
                remove_resources(self.name)
                removed = True
                log.debug("bus %r: last instance left; resources removed", self.name)
        finally:
            # Whatever happened above, closing the descriptor releases every
            # lock this instance held.
            self.semaphore.close()
            self.words.release()
            self.mm.close()
            os.close(self.fd)
        return removed

    def abandon(self) -> None:
        """Drop this process's references without touching shared state.

        For a fork child: the parent still owns the attachment, and the
        child's copies of the descriptors must not keep its locks alive.
        """
        with contextlib.suppress(Exception):
            self.words.release()
            self.mm.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)
        with contextlib.suppress(Exception):
            self.semaphore.close()

    def fifo_path(self, slot: int) -> str:
        return fifo_path(self.name, slot)


def _fifo_paths(bus_name: str) -> list[str]:
    return glob.glob(f"{SHM_DIR}/shmbus.{glob.escape(bus_name)}:wake.[0-9][0-9][0-9]")


def _may_change_owner_bits(owner: int) -> bool:
    return os.geteuid() in (0, owner)


def _reset_writer_semaphore(name: str, mode: int, gid: int | None) -> posix_ipc.Semaphore:
    """Open or create the writer semaphore with the value 1. Only for someone
    alone on the bus: nobody else can be holding or waiting on it."""
    sem_name = lock_semaphore_name(name)
    sem_path = f"{SHM_DIR}/sem.shmbus.{name}:lock"
    try:
        semaphore = posix_ipc.Semaphore(sem_name, posix_ipc.O_CREX, mode=mode, initial_value=1)
    except posix_ipc.ExistentialError:
        try:
            semaphore = posix_ipc.Semaphore(sem_name)
        except posix_ipc.PermissionsError:
            raise PermissionError(
                errno.EACCES, f"no permission to open the writer semaphore of bus {name!r}"
            ) from None
        # A writer that died holding it left it at 0.
        while semaphore.value > 1:
            semaphore.acquire(0)
        if semaphore.value == 0:
            semaphore.release()
        return semaphore
    os.chmod(sem_path, mode)  # sem_open applies the umask
    if gid is not None:
        os.chown(sem_path, -1, gid)
    return semaphore


def still_linked(fd: int, name: str) -> bool:
    """True if ``/dev/shm/shmbus.NAME`` still names the inode *fd* refers to."""
    try:
        return os.stat(f"{SHM_DIR}/shmbus.{name}").st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _retry_if_alone(fd: int, name: str, problem: str) -> None:  # raises unless alone
    """A joiner found a header it cannot use. If every other instance has
    gone meanwhile (an initialiser that died, say), start over; otherwise the
    live bus's header is damaged."""
    if ofd.try_lock(fd, LOCK_ATTACH, exclusive=True):
        ofd.unlock(fd, LOCK_ATTACH)
        return None
    raise SegmentCorruptError(f"bus {name!r} has a corrupted segment header: {problem}")


def remove_resources(name: str) -> None:
    """Unlink every resource of bus *name* that exists. The caller must know
    that no live instance is attached (it holds ``LOCK_ATTACH`` exclusively).
    """
    # Semaphore and FIFOs first, the segment name last: a newcomer that finds
    # no segment name may create fresh resources at once, and must not lose
    # them to us. /dev/shm is sticky: a file another user of a group bus
    # created is theirs to remove; it stays, and the next instance reuses it.
    paths = [f"{SHM_DIR}/sem.shmbus.{name}:lock", *_fifo_paths(name), f"{SHM_DIR}/shmbus.{name}"]
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except PermissionError:
            log.info("bus %r: %s belongs to another user; left for reuse", name, path)


def _own_command() -> str:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""
