"""A read-only view of the buses on this host, for operators and tools.

Owns
----
How a bus's header and instance slots are read from outside the bus: the
scan of ``/dev/shm`` for segments (:func:`list_buses`), the decoding of one
segment into a :class:`BusInfo` (:func:`read_bus`), and the rule that says
whether a bus or an instance is alive.

Invariants
----------
* Inspecting never changes a bus. The segment is opened ``O_RDONLY`` and only
  its header (identity, writer state, sleep flags and slots:
  :data:`~shmbus.layout.HEADER_SIZE` bytes) is mapped ``PROT_READ``, after
  ``fstat`` showed the file is at least that long.
* Inspecting takes no lock. In particular it never takes ``LOCK_ATTACH``: a
  shared attach lock held by an inspector would make the last real instance
  believe others are attached, and it would then leave the bus's files
  behind. Locks are only *queried* (``F_OFD_GETLK``), which works on a
  read-only descriptor.
* A bus is *live* iff some open file description holds ``LOCK_ATTACH``. An
  instance is *alive* iff its slot byte (``LOCK_SLOT_BASE + slot``) is held
  by some open file description **and** the process recorded in the slot
  (pid and start time) still runs. Locks die with their holder, so a
  crashed process is never reported alive.
* What is read is a snapshot taken without the writer lock: counters can be
  a few events apart from each other, never invented. ``lag_bytes`` is
  clamped at 0 for that reason.
* A segment that no shmbus process could have written (wrong magic, size or
  geometry) raises :class:`~shmbus.errors.SegmentCorruptError`; one made by
  another layout version raises
  :class:`~shmbus.errors.IncompatibleSegmentError`. Both messages name the
  bus and the bad value. A bus that is being created or reset right now is
  waited for, briefly.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import ofd, procs
from .errors import IncompatibleSegmentError, SegmentCorruptError, SegmentError
from .layout import (
    HEADER_SIZE,
    LAYOUT_VERSION,
    LOCK_ATTACH,
    LOCK_SLOT_BASE,
    MAGIC,
    MAX_SLOTS,
    OFF_HEAD,
    OFF_LOCK_RECOVERIES,
    OFF_NEXT_SEQ,
    OFF_PUBLISHED,
    OFF_RECLAIM_CORRUPT,
    OFF_TORN_RECORDS,
    OFF_WRITE_CURSOR,
    RING_OFFSET,
    SEGMENT_READY,
    SLOT_COMMAND,
    SLOT_COMMAND_SIZE,
    SLOT_CORRUPT,
    SLOT_DELIVERED,
    SLOT_DROPPED,
    SLOT_LAPPED,
    SLOT_PID,
    SLOT_PUBLISHED,
    SLOT_READ_CURSOR,
    SLOT_START,
    SLOT_SUBSCRIPTIONS,
    read_identity,
    segment_size,
    slot_offset,
)
from .segment import SHM_DIR, validate_bus_name

__all__ = ["BusInfo", "SlotInfo", "bus_names", "list_buses", "read_bus", "segment_path"]

log = logging.getLogger("shmbus.inspect")

#: How long :func:`read_bus` waits for a bus that is being created or reset.
BUSY_TIMEOUT = 1.0

_SEGMENT_PREFIX = "shmbus."


@dataclass(frozen=True, slots=True)
class SlotInfo:
    """One bus instance, as recorded in its slot of the segment."""

    #: Slot number (0 .. MAX_SLOTS-1).
    slot: int
    #: Owner's pid and process start time (ms since the epoch).
    pid: int
    start_ms: int
    #: Owner's command line: read from ``/proc`` while the owner is alive,
    #: else the (truncated) copy kept in the slot.
    command: str
    #: Where the instance's reader is in the ring (a byte position).
    read_cursor: int
    #: ``write_cursor - read_cursor`` for an instance with subscriptions,
    #: clamped at 0; 0 for an instance that does not read (its cursor is stale).
    lag_bytes: int
    #: Reader counters: events handed to subscriptions, events lost for them,
    #: unreadable records, sequence numbers skipped.
    delivered: int
    dropped: int
    corrupt: int
    lapped: int
    #: Events this instance published.
    published: int
    #: Subscriptions open now (0: the instance does not read).
    subscriptions: int
    #: Slot byte locked by someone and the recorded process still runs.
    alive: bool

    @property
    def reader(self) -> bool:
        """True if the instance has subscriptions, i.e. reads the ring."""
        return self.subscriptions > 0


@dataclass(frozen=True, slots=True)
class BusInfo:
    """A snapshot of one bus: its segment header and its instances."""

    name: str
    #: ``/dev/shm/shmbus.NAME``.
    path: str
    #: Bytes of the segment file (header + ring).
    segment_size: int
    #: Bytes of the ring.
    capacity: int
    max_event_size: int
    layout_version: int
    creator_pid: int
    created_ns: int
    #: Ring positions (byte counts that only grow) and the next sequence number.
    write_cursor: int
    head: int
    next_seq: int
    #: Events committed to the ring since the segment was created.
    published: int
    #: ``(write_cursor - head) / capacity``: the share of the ring holding records.
    fill: float
    #: Writer locks taken over from dead holders.
    lock_recoveries: int
    #: Sequence numbers reserved by writers that died before committing.
    torn_records: int
    #: Times a writer found an unreadable record while reclaiming space.
    reclaim_corrupt: int
    #: Someone holds ``LOCK_ATTACH``: at least one process is attached.
    live: bool
    #: Every slot with a recorded owner, alive or not (a crashed instance
    #: keeps its slot described until another instance claims it).
    instances: tuple[SlotInfo, ...]

    @property
    def live_instances(self) -> tuple[SlotInfo, ...]:
        return tuple(slot for slot in self.instances if slot.alive)

    @property
    def readers(self) -> int:
        """Live instances that have subscriptions."""
        return sum(1 for slot in self.instances if slot.alive and slot.reader)


def segment_path(name: str) -> str:
    """``/dev/shm/shmbus.NAME``, the segment file of bus *name*."""
    return f"{SHM_DIR}/{_SEGMENT_PREFIX}{validate_bus_name(name)}"


def bus_names() -> list[str]:
    """Names of the buses whose segment file exists in ``/dev/shm``, sorted.

    Only regular files named ``shmbus.NAME`` with a valid bus name count: the
    wake-up FIFOs (``shmbus.NAME:wake.NNN``) and semaphores
    (``sem.shmbus.NAME:lock``) do not.
    """
    names = []
    try:
        entries = list(os.scandir(SHM_DIR))
    except FileNotFoundError:
        return []
    for entry in entries:
        if not entry.name.startswith(_SEGMENT_PREFIX):
            continue
        name = entry.name[len(_SEGMENT_PREFIX) :]
        try:
            validate_bus_name(name)
            if not entry.is_file(follow_symlinks=False):
                continue
        except (ValueError, OSError):
            continue
        names.append(name)
    return sorted(names)


def list_buses(
    on_error: Callable[[str, Exception], None] | None = None,
) -> list[BusInfo]:
    """Every bus on this host, sorted by name.

    A bus that vanishes during the scan is left out. A bus that cannot be
    read (corrupt, foreign version, no permission) is left out too and
    reported to *on_error* with its name and the exception; without
    *on_error* it is logged as a warning.
    """
    buses = []
    for name in bus_names():
        try:
            buses.append(read_bus(name))
        except FileNotFoundError:
            continue  # removed by its last instance meanwhile
        except (SegmentError, OSError) as exc:
            if on_error is None:
                log.warning("cannot read bus %r: %s", name, exc)
            else:
                on_error(name, exc)
    return buses


def read_bus(name: str, *, timeout: float = BUSY_TIMEOUT) -> BusInfo:
    """A snapshot of bus *name*.

    Raises
    ------
    ValueError, TypeError
        *name* cannot name a bus.
    FileNotFoundError
        The bus has no segment in ``/dev/shm``.
    PermissionError
        The segment's mode does not let this user read it.
    SegmentCorruptError
        The file is not a shmbus segment, or its header is damaged.
    IncompatibleSegmentError
        The segment was made by another layout version.
    SegmentError
        The bus stayed busy (being created or reset) for *timeout* seconds.
    """
    path = segment_path(name)
    deadline = time.monotonic() + timeout
    attempt = 0
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FileNotFoundError(
                errno.ENOENT, f"no bus {name!r} on this host ({path} does not exist)"
            ) from None
        except PermissionError:
            raise PermissionError(
                errno.EACCES, f"no permission to read bus {name!r} ({path})"
            ) from None
        try:
            info = _read_open_segment(name, path, fd, attempt)
        finally:
            os.close(fd)
        if info is not None:
            return info
        if time.monotonic() >= deadline:
            raise SegmentError(
                f"bus {name!r} stayed busy (being created or reset) for {timeout:g} s; try again"
            )
        attempt += 1
        time.sleep(0.01)


def _read_open_segment(name: str, path: str, fd: int, attempt: int) -> BusInfo | None:
    """Decode the segment open on *fd*; None if it may be being created or reset.

    An initialiser (or a remover) holds ``LOCK_ATTACH`` exclusively while it
    sizes the file and writes the header, READY last: that is waited for. A
    newcomer creates the file a moment before it takes the lock, so an
    unlocked file that is too short or blank gets one more look (*attempt* 0)
    before it is called damaged.
    """
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise SegmentCorruptError(f"bus {name!r}: {path} is not a regular file")
    # A shared request conflicts only with an exclusive holder.
    if ofd.holds_conflicting(fd, LOCK_ATTACH, exclusive=False):
        return None
    size = st.st_size
    if size < HEADER_SIZE:
        _check_version_prefix(name, fd, size)
        if attempt == 0:
            return None
        raise SegmentCorruptError(
            f"bus {name!r} has a truncated segment: {path} is {size} bytes, smaller than "
            f"its {HEADER_SIZE}-byte header (left by a process that died while creating it?)"
        )
    with mmap.mmap(fd, HEADER_SIZE, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
        identity = read_identity(mm)
        magic, version, state = identity.magic, identity.layout_version, identity.state
        capacity, max_event_size = identity.capacity, identity.max_event_size
        ring_offset, creator_pid, created_ns = (
            identity.ring_offset,
            identity.creator_pid,
            identity.created_ns,
        )
        if magic == MAGIC and version != LAYOUT_VERSION:
            raise IncompatibleSegmentError(
                f"bus {name!r} uses segment layout version {version}; this shmbus reads "
                f"layout version {LAYOUT_VERSION}"
            )
        if magic != MAGIC or state != SEGMENT_READY:
            if attempt == 0 and magic == 0:
                return None
            if magic != MAGIC:
                raise SegmentCorruptError(
                    f"bus {name!r}: {path} is not a shmbus segment "
                    f"(magic number {magic:#018x}, expected {MAGIC:#018x})"
                )
            raise SegmentCorruptError(
                f"bus {name!r} has an unfinished segment header (state word {state:#x}, "
                f"expected {SEGMENT_READY:#x}); its creator died while initialising it"
            )
        if ring_offset != RING_OFFSET or capacity <= 0 or size != segment_size(capacity):
            raise SegmentCorruptError(
                f"bus {name!r} has a corrupted header: capacity {capacity}, ring offset "
                f"{ring_offset} (expected {RING_OFFSET}) and file size {size} do not agree"
            )
        words = memoryview(mm).cast("Q")  # aligned 8-byte loads, as the writers store
        try:
            write_cursor = int(words[OFF_WRITE_CURSOR // 8])
            head = int(words[OFF_HEAD // 8])
            next_seq = int(words[OFF_NEXT_SEQ // 8])
            published = int(words[OFF_PUBLISHED // 8])
            lock_recoveries = int(words[OFF_LOCK_RECOVERIES // 8])
            torn_records = int(words[OFF_TORN_RECORDS // 8])
            reclaim_corrupt = int(words[OFF_RECLAIM_CORRUPT // 8])
            # An exclusive request conflicts with any holder, shared or not.
            live = ofd.holds_conflicting(fd, LOCK_ATTACH, exclusive=True)
            instances = tuple(
                slot
                for index in range(MAX_SLOTS)
                if (slot := _read_slot(mm, words, fd, index, write_cursor)) is not None
            )
        finally:
            words.release()  # before the mapping closes
    used = max(0, write_cursor - head)
    return BusInfo(
        name=name,
        path=path,
        segment_size=size,
        capacity=capacity,
        max_event_size=max_event_size,
        layout_version=version,
        creator_pid=creator_pid,
        created_ns=created_ns,
        write_cursor=write_cursor,
        head=head,
        next_seq=next_seq,
        published=published,
        fill=min(1.0, used / capacity),
        lock_recoveries=lock_recoveries,
        torn_records=torn_records,
        reclaim_corrupt=reclaim_corrupt,
        live=live,
        instances=instances,
    )


def _check_version_prefix(name: str, fd: int, size: int) -> None:
    """Tell a short segment of another layout version from a truncated one."""
    if size < 12:
        return
    prefix = os.pread(fd, 12, 0)
    if len(prefix) < 12:
        return
    magic = int.from_bytes(prefix[:8], "little")
    version = int.from_bytes(prefix[8:12], "little")
    if magic == MAGIC and version != LAYOUT_VERSION:
        raise IncompatibleSegmentError(
            f"bus {name!r} uses segment layout version {version}; this shmbus reads "
            f"layout version {LAYOUT_VERSION}"
        )


def _read_slot(
    mm: mmap.mmap, words: memoryview, fd: int, index: int, write_cursor: int
) -> SlotInfo | None:
    base = slot_offset(index)

    def word(field: int) -> int:
        return int(words[(base + field) // 8])

    pid = word(SLOT_PID)
    if pid == 0:
        return None  # free, or being claimed (the pid is written last)
    start_ms = word(SLOT_START)
    read_cursor = word(SLOT_READ_CURSOR)
    subscriptions = word(SLOT_SUBSCRIPTIONS)
    locked = ofd.holds_conflicting(fd, LOCK_SLOT_BASE + index, exclusive=True)
    alive = locked and procs.is_alive(pid, start_ms)
    command = mm[base + SLOT_COMMAND : base + SLOT_COMMAND + SLOT_COMMAND_SIZE]
    text = command.split(b"\0", 1)[0].decode("utf-8", "replace")
    if alive:
        text = procs.command_line(pid) or text
    lag = max(0, write_cursor - read_cursor) if subscriptions else 0
    return SlotInfo(
        slot=index,
        pid=pid,
        start_ms=start_ms,
        command=text,
        read_cursor=read_cursor,
        lag_bytes=lag,
        delivered=word(SLOT_DELIVERED),
        dropped=word(SLOT_DROPPED),
        corrupt=word(SLOT_CORRUPT),
        lapped=word(SLOT_LAPPED),
        published=word(SLOT_PUBLISHED),
        subscriptions=subscriptions,
        alive=alive,
    )
