"""The bus segment: how a bus instance creates, joins and leaves a bus, and
claims its instance slot.

The bus segment ``shmbus.NAME`` holds the bus's identity, one slot per
attached instance and the ring directory (:mod:`shmbus._core.directory`); the rings
themselves are files of their own. Files are created and opened by the rules
of :mod:`shmbus._core.shmfiles`.

Attach protocol
---------------
Every attached instance holds a *shared* OFD lock on byte ``LOCK_ATTACH`` of
the segment for as long as it is attached, and an *exclusive* one on its slot
byte. The kernel drops both when the process dies, so:

* whoever takes ``LOCK_ATTACH`` *exclusively* is alone on the bus. Only then
  is the segment initialised, or reset if it was left by crashed processes
  (the rings and FIFOs they left are removed). Then the lock is downgraded
  to shared.
* whoever gets only a *shared* lock joins a live bus and validates the
  header: magic, layout version, state, size, and the header's owner, mode
  and group against the real file, with a clear error for each mismatch.
* on detach, an instance that can upgrade its shared lock to exclusive is
  the last one out and removes every file of the bus.

A process that opened the segment just before the last one removed it finds,
once it holds the lock, that the name no longer leads to its inode, and
starts over; so nobody ever attaches to a removed segment. Waiting for the
attach lock is the only wait here (while someone initialises or removes the
bus): :class:`~shmbus.shm.ShmBus` never does it on an event loop.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import time
from dataclasses import dataclass

from .._checks import check_int
from ..errors import (
    ForeignFileError,
    IncompatibleSegmentError,
    NoFreeSlotError,
    SegmentCorruptError,
    SegmentError,
)
from . import ofd
from .layout import (
    BUS_SEGMENT_SIZE,
    DEFAULT_CAPACITY,
    DEFAULT_MAX_EVENT_SIZE,
    IDENTITY,
    LAYOUT_VERSION,
    LOCK_ATTACH,
    LOCK_SLOT_BASE,
    MAGIC,
    MAX_CAPACITY,
    MAX_MAX_EVENT_SIZE,
    MAX_RINGS,
    MAX_SLOTS,
    MIN_MAX_EVENT_SIZE,
    NO_GROUP,
    OFF_DIRECTORY_FLAGS,
    OFF_SLEEP_FLAGS,
    SEGMENT_READY,
    SLOT_COMMAND,
    SLOT_COMMAND_SIZE,
    SLOT_PID,
    SLOT_SIZE,
    SLOT_START,
    SLOT_WAKE_ID,
    bell_word,
    min_capacity,
    read_identity,
    read_layout_version,
    seen_word,
    slot_offset,
    slot_word,
)
from .procs import self_identity
from .shmfiles import (
    SHM_DIR,
    Access,
    bell_path,
    bus_file_paths,
    check_file,
    create_file,
    fifo_path,
    open_checked,
    owned_by,
    reserve,
    segment_path,
    validate_bus_name,
)

__all__ = [
    "SHM_DIR",
    "Segment",
    "SegmentOptions",
    "check_geometry",
    "remove_bus_files",
    "still_linked",
]

log = logging.getLogger("shmbus._core.segment")

_ATTACH_TIMEOUT = 10.0
_MAGIC_PREFIX = MAGIC & 0x00FFFFFFFFFFFFFF  # "SHMBUS\0": any layout version


@dataclass(frozen=True, slots=True)
class SegmentOptions:
    """What a bus instance asks of the bus: ring geometry for its own ring
    (None: adopt the bus's) and the access of the bus's files if it creates
    them."""

    name: str
    capacity: int | None
    max_event_size: int | None
    mode: int
    gid: int | None

    def __post_init__(self) -> None:
        validate_bus_name(self.name)
        if self.max_event_size is not None:
            # The upper limit: record lengths are 32-bit.
            check_int(
                "max_event_size",
                self.max_event_size,
                minimum=MIN_MAX_EVENT_SIZE,
                maximum=MAX_MAX_EVENT_SIZE,
            )
        if self.capacity is not None:
            check_int("capacity", self.capacity, minimum=8, maximum=MAX_CAPACITY)
            if self.max_event_size is not None:
                check_geometry(self.capacity, self.max_event_size)
            if self.capacity % 8:
                raise ValueError(f"capacity {self.capacity} must be a multiple of 8 bytes")
        check_int("mode", self.mode, minimum=0)
        if self.mode > 0o777:
            raise ValueError(f"mode {self.mode!r} must be permission bits between 0o000 and 0o777")
        if self.mode & 0o600 != 0o600:
            raise ValueError(f"mode {oct(self.mode)} must give the owner read and write (0o600)")

    @property
    def access(self) -> Access:
        return Access(self.mode, self.gid)


def check_geometry(capacity: int, max_event_size: int) -> None:
    """Raise ValueError unless a ring of *capacity* bytes holds two records of
    *max_event_size* bytes."""
    needed = min_capacity(max_event_size)
    if capacity < needed:
        raise ValueError(
            f"capacity {capacity} is too small for max_event_size {max_event_size}: "
            f"the ring must hold two of the largest records, at least {needed} bytes"
        )


class Segment:
    """One bus instance's attachment to its bus segment.

    Holds the descriptor (with its OFD locks), the mapping and the instance's
    slot. :meth:`attach` and :meth:`detach` are the only ways in and out.
    """

    def __init__(self, options: SegmentOptions, fd: int, mm: mmap.mmap, access: Access) -> None:
        self.options = options
        self.name = options.name
        self.fd = fd
        self.mm = mm
        #: The whole segment as 8-byte words (see layout: shared words are
        #: written only through this view).
        self.words = memoryview(mm).cast("Q")
        #: Mode and group of every file of the bus, as its creator set them.
        self.access = access
        identity = read_identity(mm)
        #: Ring geometry the bus's creator chose (instances may choose theirs).
        self.capacity = int(identity.capacity)
        self.max_event_size = int(identity.max_event_size)
        self.slot = -1
        self._detached = False

    @property
    def mode(self) -> int:
        return self.access.mode

    @property
    def gid(self) -> int | None:
        return self.access.gid

    # ─── Attach ───

    @classmethod
    def attach(cls, options: SegmentOptions, timeout: float = _ATTACH_TIMEOUT) -> Segment:
        """Create or join the bus described by *options*; may wait up to
        *timeout* s while another process creates or removes the bus.

        Raises
        ------
        PermissionError
            The bus exists and its mode does not let this user in; or
            :class:`~shmbus.errors.ForeignFileError`: its segment file is
            owned by another user (and not shared with this bus's group), is
            a symlink, or has permission bits broader than its mode.
        SegmentCorruptError, IncompatibleSegmentError
            A live bus's header is damaged, or was made by another layout.
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
    def _open(cls, options: SegmentOptions) -> int:
        path = segment_path(options.name)
        access = options.access
        try:
            return create_file(path, access, 0)
        except FileExistsError:
            pass
        try:
            # The mode is checked against the header once it is readable.
            return open_checked(path, os.O_RDWR, Access(0o777, access.gid))
        except FileNotFoundError:
            return -1  # removed meanwhile: start over
        except PermissionError as exc:
            if isinstance(exc, ForeignFileError):
                raise
            raise PermissionError(
                errno.EACCES,
                f"no permission to open bus {options.name!r} ({path}{owned_by(path)}); "
                "it was created with a mode or group that excludes this user",
            ) from None

    @classmethod
    def _attach_once(cls, options: SegmentOptions, deadline: float) -> Segment | None:
        name = options.name
        fd = cls._open(options)
        if fd < 0:
            return None
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
        """Alone on the bus (exclusive attach lock): build it from scratch."""
        name = options.name
        path = segment_path(name)
        stat = os.fstat(fd)
        if stat.st_size:
            log.info("bus %r: resetting a segment left with no live process", name)
        if stat.st_uid == os.geteuid():
            os.fchmod(fd, options.mode)
            if options.gid is not None:
                os.fchown(fd, -1, options.gid)
            stat = os.fstat(fd)
        # A group member's file: usable only as it is (rules of shmfiles).
        check_file(path, stat, options.access)
        # Whatever the dead left (rings, FIFOs) goes: nobody can be reading it.
        _remove_files(name, keep_segment=True)
        try:
            reserve(fd, path, BUS_SEGMENT_SIZE)
        except BaseException:
            remove_bus_files(name)
            raise
        mode = stat.st_mode & 0o777
        gid = stat.st_gid if options.gid is not None else NO_GROUP
        capacity = options.capacity
        max_event_size = options.max_event_size
        if max_event_size is None:
            max_event_size = DEFAULT_MAX_EVENT_SIZE
        if capacity is None:
            capacity = max(DEFAULT_CAPACITY, min_capacity(max_event_size))
        mm = mmap.mmap(fd, BUS_SEGMENT_SIZE)
        try:
            mm[:BUS_SEGMENT_SIZE] = bytes(BUS_SEGMENT_SIZE)
            pid, _ = self_identity()
            IDENTITY.pack_into(
                mm,
                0,
                MAGIC,
                LAYOUT_VERSION,
                0,
                capacity,
                max_event_size,
                pid,
                time.time_ns(),
                mode,
                gid,
                stat.st_uid,
            )
            # The header is complete: only now may others trust it.
            mm[12:16] = SEGMENT_READY.to_bytes(4, "little")
            if not ofd.try_lock(fd, LOCK_ATTACH, exclusive=False):  # downgrade
                raise SegmentError(f"bus {name!r}: could not downgrade the attach lock")
        except BaseException:
            mm.close()
            # Alone and half-built: leave nothing behind (the caller closes fd).
            remove_bus_files(name)
            raise
        return cls(options, fd, mm, Access(mode, None if gid == NO_GROUP else gid))

    @classmethod
    def _join(cls, options: SegmentOptions, fd: int) -> Segment | None:
        """Others are attached (shared attach lock): validate and map."""
        name = options.name
        path = segment_path(name)
        stat = os.fstat(fd)
        size = stat.st_size
        if size < 64:
            _retry_if_alone(fd, name, f"segment is {size} bytes, smaller than its header")
            return None
        with mmap.mmap(fd, 64) as header:
            magic, version = read_layout_version(header)
            identity = read_identity(header)
        if magic & 0x00FFFFFFFFFFFFFF != _MAGIC_PREFIX:
            _retry_if_alone(fd, name, f"magic number is {magic:#018x}, expected {MAGIC:#018x}")
            return None
        if version != LAYOUT_VERSION:
            raise IncompatibleSegmentError(
                f"bus {name!r} uses segment layout version {version}; "
                f"this shmbus uses layout version {LAYOUT_VERSION} (close the processes of "
                "the older version, or use another bus name)"
            )
        if identity.state != SEGMENT_READY:
            _retry_if_alone(fd, name, f"state word is {identity.state:#x}, not READY")
            return None
        if size != BUS_SEGMENT_SIZE:
            raise SegmentCorruptError(
                f"bus {name!r} has a corrupted segment: {size} bytes, expected {BUS_SEGMENT_SIZE}"
            )
        capacity, max_event_size = identity.capacity, identity.max_event_size
        if (
            not MIN_MAX_EVENT_SIZE <= max_event_size <= MAX_MAX_EVENT_SIZE
            or not min_capacity(max_event_size) <= capacity <= MAX_CAPACITY
            or capacity % 8
        ):
            raise SegmentCorruptError(
                f"bus {name!r} has a corrupted header: capacity {capacity} and "
                f"max_event_size {max_event_size} are not a ring geometry shmbus writes"
            )
        header_gid = None if identity.gid == NO_GROUP else identity.gid
        if (
            identity.uid != stat.st_uid
            or identity.mode != stat.st_mode & 0o777
            or (header_gid is not None and header_gid != stat.st_gid)
        ):
            raise ForeignFileError(
                errno.EPERM,
                f"{path}: its header says owner uid {identity.uid}, mode {identity.mode:#o}"
                + (f", gid {header_gid}" if header_gid is not None else "")
                + f", but the file has owner uid {stat.st_uid}, mode "
                f"{stat.st_mode & 0o777:#o}, gid {stat.st_gid}; refusing it",
            )
        access = Access(identity.mode, header_gid)
        if stat.st_uid != os.geteuid():
            # Another member's bus: it must be shared with the group this
            # instance asked for, with no bits beyond the mode it asked for.
            check_file(path, stat, options.access)
        mm = mmap.mmap(fd, BUS_SEGMENT_SIZE)
        return cls(options, fd, mm, access)

    # ─── Slots ───

    def _claim_slot(self) -> None:
        pid, start = self_identity()
        words = self.words
        for slot in range(MAX_SLOTS):
            if ofd.try_lock(self.fd, LOCK_SLOT_BASE + slot, exclusive=True):
                base = slot_offset(slot)
                self._remove_dead_owners_files(slot)
                self.mm[base : base + SLOT_SIZE] = bytes(SLOT_SIZE)
                for entry in range(MAX_RINGS):
                    words[seen_word(slot, entry)] = 0
                self.mm[OFF_SLEEP_FLAGS + slot] = 0
                self.mm[OFF_DIRECTORY_FLAGS + slot] = 0
                words[bell_word(slot)] = 0
                command = _own_command().encode("utf-8", "replace")[:SLOT_COMMAND_SIZE]
                self.mm[base + SLOT_COMMAND : base + SLOT_COMMAND + len(command)] = command
                words[slot_word(slot, SLOT_START)] = start
                # pid last: a non-zero pid marks the slot as described.
                words[slot_word(slot, SLOT_PID)] = pid
                self.slot = slot
                return
        raise NoFreeSlotError(
            f"bus {self.name!r} has all {MAX_SLOTS} instance slots in use by live processes"
        )

    def _remove_dead_owners_files(self, slot: int) -> None:
        """With *slot*'s byte just locked: its previous owner is gone, and one
        that died without closing left its wake-up FIFO or doorbell named in
        the slot (a clean close withdraws the id first). Remove them now,
        rather than when the whole bus goes."""
        words = self.words
        wake_id = int(words[slot_word(slot, SLOT_WAKE_ID)])
        bell_id = int(words[bell_word(slot)])
        paths = [fifo_path(self.name, wake_id)] if wake_id else []
        paths += [bell_path(self.name, bell_id)] if bell_id else []
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:  # another user's, in the sticky /dev/shm
                log.info("bus %r: %s left by a dead reader stays: %s", self.name, path, exc)
            else:
                log.debug("bus %r: removed %s, left by a dead reader", self.name, path)

    # ─── Detach ───

    def detach(self) -> bool:
        """Leave the bus; remove its files if this was the last instance.

        Returns True if the files were removed. Never waits for anyone;
        a second call does nothing.
        """
        if self._detached:
            return False
        self._detached = True
        removed = False
        try:
            if self.slot >= 0:
                self.words[slot_word(self.slot, SLOT_PID)] = 0
                self.mm[OFF_SLEEP_FLAGS + self.slot] = 0
                self.words[bell_word(self.slot)] = 0
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
                remove_bus_files(self.name)
                removed = True
                log.debug("bus %r: last instance left; files removed", self.name)
        finally:
            # Whatever happened above, closing the descriptor releases every
            # lock this instance held.
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


def still_linked(fd: int, name: str) -> bool:
    """True if ``/dev/shm/shmbus.NAME`` still names the inode *fd* refers to."""
    try:
        return os.stat(segment_path(name), follow_symlinks=False).st_ino == os.fstat(fd).st_ino
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


def _remove_files(name: str, *, keep_segment: bool) -> list[str]:
    removed = []
    segment = segment_path(name)
    for path in bus_file_paths(name):
        if keep_segment and path == segment:
            continue
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        except PermissionError:
            # /dev/shm is sticky: another user's file stays. Ring and FIFO
            # names are random, so it is never mistaken for a new one.
            log.info("bus %r: %s belongs to another user; left in place", name, path)
            continue
        removed.append(path)
    return removed


def remove_bus_files(name: str) -> list[str]:
    """Unlink every file of bus *name* that exists, the segment last; return
    the paths removed. The caller must know that no live instance is attached
    (it holds ``LOCK_ATTACH`` exclusively)."""
    return _remove_files(name, keep_segment=False)


def _own_command() -> str:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""

