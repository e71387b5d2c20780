"""A read-only view of the buses on this host, for operators and tools.

Owns
----
How a bus's segment, its instance slots, its rings and its queue groups are
read from outside the bus: the scan of ``/dev/shm`` for segments
(:func:`list_buses`), the decoding of one bus into a :class:`BusInfo`
(:func:`read_bus`), and the rule that says whether a bus, an instance, a
ring's writer or a queue-group member is alive.

Invariants
----------
* Inspecting never changes a bus. Files are opened ``O_RDONLY | O_NOFOLLOW``
  and mapped ``PROT_READ``, after ``fstat`` showed the segment has its full
  size and each ring file is a regular file.
* Inspecting takes no lock. In particular it never takes ``LOCK_ATTACH``: a
  shared attach lock held by an inspector would make the last real instance
  believe others are attached, and it would then leave the bus's files
  behind. Locks are only *queried* (``F_OFD_GETLK``), which works on a
  read-only descriptor.
* A bus is *live* iff some open file description holds ``LOCK_ATTACH``. An
  instance is *alive* iff its slot byte (``LOCK_SLOT_BASE + slot``) is held
  by some open file description **and** the process recorded in the slot
  (pid and start time) still runs. A ring's writer is alive iff its entry is
  LIVE and its ring lock byte is held. A queue-group member is alive iff
  its member lock byte is held (its groups are read by
  :func:`shmbus._core.groups.group_statistics`, which counts a dead,
  unsettled member's undelivered events as dropped). Locks die with their
  holder, so a crashed process is never reported alive.
* What is read is a snapshot taken without any lock: counters can be a few
  events apart from each other, never invented.
* A segment that no shmbus process could have written (wrong magic, size or
  geometry) raises :class:`~shmbus.errors.SegmentCorruptError`; one made by
  another layout version raises
  :class:`~shmbus.errors.IncompatibleSegmentError`. Both messages name the
  bus and the bad value. A bus that is being created or reset right now is
  waited for, briefly. A ring file that cannot be read is reported with its
  error in :attr:`RingInfo.problem`, not raised.
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

from ..errors import IncompatibleSegmentError, SegmentCorruptError, SegmentError
from ..stats import GroupStatistics
from . import groups, ofd, procs
from .layout import (
    BUS_SEGMENT_SIZE,
    ENTRY_CAPACITY,
    ENTRY_FREE,
    ENTRY_GEN,
    ENTRY_INSTALLING,
    ENTRY_LIVE,
    ENTRY_RECLAIMING,
    ENTRY_RETIRED,
    ENTRY_RING_ID,
    ENTRY_STATE,
    ENTRY_WRITER_PID,
    ENTRY_WRITER_SLOT,
    LAYOUT_VERSION,
    LOCK_ATTACH,
    LOCK_RING_BASE,
    LOCK_SLOT_BASE,
    MAGIC,
    MAX_RINGS,
    MAX_SLOTS,
    NO_RECORD,
    RING_MAGIC,
    RING_OFFSET,
    SEGMENT_READY,
    SLOT_BACKLOG,
    SLOT_COMMAND,
    SLOT_COMMAND_SIZE,
    SLOT_CORRUPT,
    SLOT_DELIVERED,
    SLOT_DROPPED,
    SLOT_LAPPED,
    SLOT_PID,
    SLOT_PUBLISHED,
    SLOT_RING,
    SLOT_START,
    SLOT_SUBSCRIPTIONS,
    W_HEAD,
    W_LAST_RECORD,
    W_NEXT_SEQ,
    W_RECLAIM_CORRUPT,
    W_WRITE_CURSOR,
    bell_word,
    entry_word,
    read_identity,
    read_layout_version,
    read_ring_identity,
    ring_file_size,
    slot_offset,
)
from .ring import event_at
from .shmfiles import SHM_DIR, bell_path, ring_path, validate_bus_name

__all__ = [
    "BusInfo",
    "RingInfo",
    "SlotInfo",
    "bus_names",
    "list_buses",
    "read_bus",
    "segment_path",
]

log = logging.getLogger("shmbus._core.inspection")

#: How long :func:`read_bus` waits for a bus that is being created or reset.
BUSY_TIMEOUT = 1.0

_SEGMENT_PREFIX = "shmbus."
_STATE_NAMES = {
    ENTRY_INSTALLING: "installing",
    ENTRY_LIVE: "live",
    ENTRY_RETIRED: "retired",
    ENTRY_RECLAIMING: "reclaiming",
}
_MAGIC_PREFIX = MAGIC & 0x00FFFFFFFFFFFFFF


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
    #: Bytes committed in the rings the instance's reader follows that it has
    #: not read yet (0 for an instance that does not read).
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
    #: Directory entry of the instance's own ring, or None if it has not published.
    ring: int | None
    #: Slot byte locked by someone and the recorded process still runs.
    alive: bool
    #: The slot is a blocking subscription's reader (it has a doorbell).
    blocking: bool = False
    #: Bytes of memory its doorbell's file takes (0 without one).
    doorbell_bytes: int = 0

    @property
    def reader(self) -> bool:
        """True if the instance has subscriptions, i.e. reads the rings."""
        return self.subscriptions > 0


@dataclass(frozen=True, slots=True)
class RingInfo:
    """One publisher's ring, as its directory entry and its file describe it."""

    #: Directory entry and generation.
    entry: int
    gen: int
    #: "live", "dead" (writer gone without closing), "retired" (writer closed,
    #: the ring drains), "reclaiming" or "installing".
    state: str
    #: ``/dev/shm/shmbus.NAME:ring.<id>``.
    path: str
    #: Bytes of the ring and of its file.
    capacity: int
    file_size: int
    #: The writing instance's slot and pid.
    writer_slot: int
    writer_pid: int
    #: Events committed to the ring (= its next sequence number), and its
    #: positions (byte counts that only grow).
    published: int
    write_cursor: int
    head: int
    #: ``(write_cursor - head) / capacity``: the share of the ring holding records.
    fill: float
    #: Times its writer found an unreadable record while reclaiming space.
    reclaim_corrupt: int
    #: Why the ring file could not be read ('' if it could).
    problem: str = ""


@dataclass(frozen=True, slots=True)
class BusInfo:
    """A snapshot of one bus: its segment, its instances and its rings."""

    name: str
    #: ``/dev/shm/shmbus.NAME``.
    path: str
    #: Bytes of the segment file, of every ring file and of the doorbells of
    #: the slots that name one: the bus's memory.
    segment_size: int
    #: Ring geometry instances adopt unless they choose their own.
    capacity: int
    max_event_size: int
    layout_version: int
    creator_pid: int
    created_ns: int
    #: Events committed to the rings that exist now.
    published: int
    #: The fullest ring's fill (0.0 with no ring).
    fill: float
    #: Times a writer found an unreadable record while reclaiming space.
    reclaim_corrupt: int
    #: Someone holds ``LOCK_ATTACH``: at least one process is attached.
    live: bool
    #: Every slot with a recorded owner, alive or not (a crashed instance
    #: keeps its slot described until another instance claims it).
    instances: tuple[SlotInfo, ...]
    #: Every ring the directory names.
    rings: tuple[RingInfo, ...] = ()
    #: Every queue group the member table records, by queue and pattern.
    groups: tuple[GroupStatistics, ...] = ()

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
    ring files and wake-up FIFOs (``shmbus.NAME:...``) and the doorbells
    (``sem.shmbus.NAME:...``) do not.
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
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise SegmentCorruptError(f"bus {name!r}: {path} is a symbolic link") from None
            raise
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
    if size >= 12:
        magic, version = read_layout_version(os.pread(fd, 12, 0))
        if magic & 0x00FFFFFFFFFFFFFF == _MAGIC_PREFIX and version != LAYOUT_VERSION:
            raise IncompatibleSegmentError(
                f"bus {name!r} uses segment layout version {version}; this shmbus reads "
                f"layout version {LAYOUT_VERSION}"
            )
    if size != BUS_SEGMENT_SIZE:
        if size < BUS_SEGMENT_SIZE and attempt == 0:
            return None
        raise SegmentCorruptError(
            f"bus {name!r} has a damaged segment: {path} is {size} bytes, not "
            f"{BUS_SEGMENT_SIZE} (left by a process that died while creating it?)"
        )
    with mmap.mmap(fd, BUS_SEGMENT_SIZE, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
        identity = read_identity(mm)
        magic, state = identity.magic, identity.state
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
        words = memoryview(mm).cast("Q")  # aligned 8-byte loads, as the writers store
        try:
            live = ofd.holds_conflicting(fd, LOCK_ATTACH, exclusive=True)
            instances = tuple(
                slot
                for index in range(MAX_SLOTS)
                if (slot := _read_slot(name, mm, words, fd, index)) is not None
            )
            rings = tuple(
                ring
                for entry in range(MAX_RINGS)
                if (ring := _read_ring(name, words, fd, entry)) is not None
            )
            found_groups = tuple(groups.group_statistics(mm, words, fd))
        finally:
            words.release()  # before the mapping closes
    return BusInfo(
        name=name,
        path=path,
        segment_size=size
        + sum(ring.file_size for ring in rings)
        + sum(slot.doorbell_bytes for slot in instances),
        capacity=identity.capacity,
        max_event_size=identity.max_event_size,
        layout_version=identity.layout_version,
        creator_pid=identity.creator_pid,
        created_ns=identity.created_ns,
        published=sum(ring.published for ring in rings),
        fill=max((ring.fill for ring in rings), default=0.0),
        reclaim_corrupt=sum(ring.reclaim_corrupt for ring in rings),
        live=live,
        instances=instances,
        rings=rings,
        groups=found_groups,
    )


def _read_ring(name: str, words: memoryview, fd: int, entry: int) -> RingInfo | None:
    def field(offset: int) -> int:
        return int(words[entry_word(entry, offset)])

    state = field(ENTRY_STATE)
    if state == ENTRY_FREE:
        return None
    state_name = _STATE_NAMES.get(state, f"unknown ({state})")
    if state == ENTRY_LIVE and not ofd.holds_conflicting(fd, LOCK_RING_BASE + entry):
        state_name = "dead"
    path = ring_path(name, field(ENTRY_RING_ID))
    capacity = field(ENTRY_CAPACITY)

    def info(
        file_size: int = 0,
        published: int = 0,
        write_cursor: int = 0,
        head: int = 0,
        reclaim_corrupt: int = 0,
        problem: str = "",
    ) -> RingInfo:
        used = max(0, write_cursor - head)
        return RingInfo(
            entry=entry,
            gen=field(ENTRY_GEN),
            state=state_name,
            path=path,
            capacity=capacity,
            file_size=file_size,
            writer_slot=field(ENTRY_WRITER_SLOT),
            writer_pid=field(ENTRY_WRITER_PID),
            published=published,
            write_cursor=write_cursor,
            head=head,
            fill=min(1.0, used / capacity) if capacity else 0.0,
            reclaim_corrupt=reclaim_corrupt,
            problem=problem,
        )

    try:
        ring_fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        return info(problem=str(exc))
    try:
        st = os.fstat(ring_fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != ring_file_size(capacity):
            return info(problem=f"{path} is not a ring file of {capacity} bytes")
        with mmap.mmap(ring_fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ) as ring_mm:
            identity = read_ring_identity(ring_mm)
            ring_words = memoryview(ring_mm).cast("Q")
            try:
                write_cursor = int(ring_words[W_WRITE_CURSOR])
                head = int(ring_words[W_HEAD])
                reclaim_corrupt = int(ring_words[W_RECLAIM_CORRUPT])
                published = _committed(ring_mm, ring_words, capacity)
            finally:
                ring_words.release()
    finally:
        os.close(ring_fd)
    if identity.magic != RING_MAGIC:
        return info(problem=f"{path} is not a shmbus ring (magic {identity.magic:#x})")
    return info(st.st_size, published, write_cursor, head, reclaim_corrupt)


def _committed(ring_mm: mmap.mmap, ring_words: memoryview, capacity: int) -> int:
    """Records committed to a ring: one more than the sequence number of the
    record at ``last_record`` (``next_seq`` runs one ahead while a record is
    being written)."""
    last = int(ring_words[W_LAST_RECORD])
    if last == NO_RECORD:
        return 0
    found = event_at(ring_mm, RING_OFFSET, capacity, last)
    if found is not None:
        return int(found[1]) + 1
    return int(ring_words[W_NEXT_SEQ])


def _doorbell_bytes(path: str) -> int:
    """Memory the doorbell file *path* takes (a page, for a semaphore), not
    following a link; 0 if it is not there."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    return st.st_blocks * 512 if stat.S_ISREG(st.st_mode) else 0


def _read_slot(name: str, mm: mmap.mmap, words: memoryview, fd: int, index: int) -> SlotInfo | None:
    base = slot_offset(index)

    def word(field: int) -> int:
        return int(words[(base + field) // 8])

    pid = word(SLOT_PID)
    if pid == 0:
        return None  # free, or being claimed (the pid is written last)
    start_ms = word(SLOT_START)
    subscriptions = word(SLOT_SUBSCRIPTIONS)
    locked = ofd.holds_conflicting(fd, LOCK_SLOT_BASE + index, exclusive=True)
    alive = locked and procs.is_alive(pid, start_ms)
    command = mm[base + SLOT_COMMAND : base + SLOT_COMMAND + SLOT_COMMAND_SIZE]
    text = command.split(b"\0", 1)[0].decode("utf-8", "replace")
    if alive:
        text = procs.command_line(pid) or text
    ring = word(SLOT_RING)
    bell_id = int(words[bell_word(index)])
    return SlotInfo(
        slot=index,
        pid=pid,
        start_ms=start_ms,
        command=text,
        lag_bytes=word(SLOT_BACKLOG) if subscriptions else 0,
        delivered=word(SLOT_DELIVERED),
        dropped=word(SLOT_DROPPED),
        corrupt=word(SLOT_CORRUPT),
        lapped=word(SLOT_LAPPED),
        published=word(SLOT_PUBLISHED),
        subscriptions=subscriptions,
        ring=ring - 1 if ring else None,
        alive=alive,
        blocking=bell_id != 0,
        doorbell_bytes=_doorbell_bytes(bell_path(name, bell_id)) if bell_id else 0,
    )
