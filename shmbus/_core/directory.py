"""The ring directory: how publishers announce their rings, how readers find
them, and when a ring's file may be removed.

Every publishing instance owns one ring file; the bus segment's directory has
:data:`~shmbus._core.layout.MAX_RINGS` entries that name them. An entry is *owned*
by whoever holds its ring lock byte (``LOCK_RING_BASE + e``, an OFD lock the
kernel drops on death): the ring's writer for as long as it may write, or
briefly someone installing or reclaiming a ring there. Only the owner writes
the entry.

Theory of operation
-------------------
Entry states::

    FREE ──install──▶ INSTALLING ──▶ LIVE ──writer closes──▶ RETIRED
      ▲                   │            │ (or dies: its lock byte is free)
      │                   ▼            ▼
      └───── reclaim ◀── RECLAIMING ◀──┘

Install rules (a writer, holding the entry's lock byte):

1. State ``INSTALLING``; store the new ``ring_id`` (so a dead installer's
   file can be found) and bump ``gen``: every ring ever installed in an
   entry has its own generation.
2. Create the ring file ``O_EXCL`` with that id, write its identity and
   writer state, then ``R`` (release fence: the file before the entry).
3. Fill in the entry, ``R``, store state ``LIVE``: the entry's commit.
4. Set every slot's *directory flag*. Readers look at their own flag byte at
   every step (one load) and rescan the directory when it is set: finding a
   new ring costs no file-system call on the hot path. Also set every slot's
   *group flag*: publishers then count the ring entries in use again
   (queue-group rule P1, :mod:`shmbus._core.groups`).

The writer keeps its lock byte until it closes; then it stores ``closed`` in
its ring and state ``RETIRED``, sets the directory flags, and tries to
reclaim its own ring at once (below). A writer that dies just lets go of the
byte: ``LIVE`` with a free lock byte means the same as ``RETIRED``.

Reader rules (a reader is the one of an instance with subscriptions; slot
``s``):

1. **First subscription**: store the slot's ``subscriptions`` word, ``F``
   (full fence), then scan. Rings then ``LIVE`` are followed from their
   current end (:meth:`~shmbus._core.ring.RingReader.snapshot`), whatever an
   earlier reader of the slot saw; rings already retired or being reclaimed
   hold only events published before the subscription, and are skipped.
2. **Later scans** (flag set: clear it, ``F``, scan): a generation not seen
   before is followed *from its beginning*, whatever its state: everything in
   a ring installed after the reader's previous scan was published after its
   subscriptions were made. (A reader whose subscriptions give up their
   backlog scans, then moves every ring it follows to its current end:
   :meth:`~shmbus._core.reader.RingFollower.skip_to_newest`.)
3. An entry is read as: state, ``A``, fields, ``A``, state and ``gen`` again;
   if they moved, the flag is set again for a rescan.
4. After mapping generation ``g`` of entry ``e`` (the mapping outlives the
   file's removal) *and following it*, store ``seen[s][e] = g``. A scan
   interrupted before that (a signal handler that raises) sets the flag
   again: the ring is found again, never lost.
5. A followed ring is *finished* when its writer is gone (state not ``LIVE``,
   a newer generation, or its lock byte free) and the reader has read up to
   its ``write_cursor``; then the reader drops its mapping.

Reclaim rules (the entry's owner: a writer that closes, or anyone who takes
the lock byte of an entry whose writer is gone):

1. Store state ``RECLAIMING``, ``F``.
2. For every live slot with ``subscriptions > 0``: if ``seen[s][e] < gen``,
   that reader has not mapped this ring yet and may still be owed its events:
   put the state back and give up (someone tries again later).
3. Otherwise unlink the ring file (readers keep their mappings) and store
   ``FREE``.

Why no reader is ever robbed: reclaim step 1 and reader rule 1 form a Dekker
pair (a store, a full fence, then a load, on each side). Either the reclaimer
sees the reader's ``subscriptions`` word and then waits for its
``seen`` word, or the reader's scan sees ``RECLAIMING`` (or later), and then
its first subscription came after the ring's writer was gone: it was owed
nothing. A reader that was subscribed before is checked by its ``seen`` word,
which it stores only after it has mapped the file.

What this costs: a reader that is stopped (SIGSTOP) keeps the rings it has not
seen from being removed (their events are owed to it); nobody waits for it,
and a new writer takes another entry. A writer that is stopped keeps its
entry; readers simply find nothing new in its ring.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import secrets
from dataclasses import dataclass

from ..errors import NoFreeSlotError, SegmentCorruptError, ShmBusError
from . import ofd
from .layout import (
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
    ENTRY_WRITER_START,
    LAYOUT_VERSION,
    LOCK_RING_BASE,
    LOCK_SLOT_BASE,
    MAX_CAPACITY,
    MAX_MAX_EVENT_SIZE,
    MAX_RINGS,
    MAX_SLOTS,
    MIN_MAX_EVENT_SIZE,
    NO_RECORD,
    OFF_DIRECTORY_FLAGS,
    OFF_GROUP_FLAGS,
    RING_IDENTITY,
    RING_MAGIC,
    RING_OFFSET,
    SLOT_RING,
    SLOT_SUBSCRIPTIONS,
    W_CLOSED,
    W_HEAD,
    W_LAST_RECORD,
    W_NEXT_SEQ,
    W_WRITE_CURSOR,
    entry_word,
    min_capacity,
    read_ring_identity,
    ring_file_size,
    seen_word,
    slot_word,
)
from .ordering import acquire_fence, full_fence, release_fence
from .procs import self_identity
from .segment import Segment
from .shmfiles import create_file, open_checked, ring_path

__all__ = [
    "EntryView",
    "FoundRing",
    "OwnRing",
    "RingFinder",
    "RingMapping",
    "install_ring",
    "map_ring",
    "reclaim_dead",
    "retire_ring",
    "scan",
    "signal_change",
    "writer_alive",
]

log = logging.getLogger("shmbus._core.directory")

_ALL_FLAGS = b"\x01" * MAX_SLOTS


@dataclass(frozen=True, slots=True)
class EntryView:
    """One directory entry as a reader's scan found it (reader rule 3)."""

    entry: int
    gen: int
    state: int
    ring_id: int
    capacity: int
    writer_slot: int


@dataclass(slots=True)
class RingMapping:
    """A mapping of a ring file: read-only for a reader, read-write for the
    ring's writer (:class:`OwnRing`)."""

    entry: int
    gen: int
    mm: mmap.mmap
    words: memoryview
    capacity: int
    max_event_size: int

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.words.release()
            self.mm.close()


@dataclass(slots=True)
class OwnRing(RingMapping):
    """The ring this instance writes, with the id and path of its file."""

    ring_id: int
    path: str


def signal_change(segment: Segment) -> None:
    """Set every slot's directory flag and group flag (install rule 4)."""
    end = OFF_DIRECTORY_FLAGS + MAX_SLOTS
    segment.mm[OFF_DIRECTORY_FLAGS:end] = _ALL_FLAGS
    segment.mm[OFF_GROUP_FLAGS : OFF_GROUP_FLAGS + MAX_SLOTS] = _ALL_FLAGS


# ─── Writers ─────────────────────────────────────────────────────────────────


def install_ring(segment: Segment, capacity: int, max_event_size: int) -> OwnRing:
    """Take a free entry and install a new ring of *capacity* bytes in it
    (install rules); the caller then writes it until :func:`retire_ring`.

    Raises :class:`~shmbus.errors.SegmentSpaceError` if ``/dev/shm`` cannot
    hold the ring, and :class:`~shmbus.errors.NoFreeSlotError` if every
    entry is in use (or still owed to a reader).
    """
    fd = segment.fd
    for entry in range(MAX_RINGS):
        if not ofd.try_lock(fd, LOCK_RING_BASE + entry, exclusive=True):
            continue
        try:
            if _reclaim_owned(segment, entry):
                return _install_owned(segment, entry, capacity, max_event_size)
        except BaseException:
            ofd.unlock(fd, LOCK_RING_BASE + entry)
            raise
        ofd.unlock(fd, LOCK_RING_BASE + entry)
    raise NoFreeSlotError(
        f"bus {segment.name!r} has all {MAX_RINGS} ring entries in use (by live publishers, "
        "or retired rings that a stopped reader has not seen yet)"
    )


def _install_owned(segment: Segment, entry: int, capacity: int, max_event_size: int) -> OwnRing:
    words = segment.words
    pid, start = self_identity()
    gen = int(words[entry_word(entry, ENTRY_GEN)]) + 1
    for _attempt in range(8):
        ring_id = secrets.randbits(64) or 1
        words[entry_word(entry, ENTRY_STATE)] = ENTRY_INSTALLING  # rule 1
        words[entry_word(entry, ENTRY_RING_ID)] = ring_id
        words[entry_word(entry, ENTRY_GEN)] = gen
        path = ring_path(segment.name, ring_id)
        try:
            fd = create_file(path, segment.access, ring_file_size(capacity))
        except FileExistsError:
            continue  # a squatter guessed the name: draw another
        except BaseException:
            words[entry_word(entry, ENTRY_STATE)] = ENTRY_FREE
            raise
        break
    else:
        words[entry_word(entry, ENTRY_STATE)] = ENTRY_FREE
        raise SegmentCorruptError(f"bus {segment.name!r}: could not create a ring file name")
    try:
        mm = mmap.mmap(fd, ring_file_size(capacity))
    finally:
        os.close(fd)
    ring_words = memoryview(mm).cast("Q")
    RING_IDENTITY.pack_into(
        mm, 0, RING_MAGIC, LAYOUT_VERSION, entry, ring_id, gen, capacity, max_event_size, pid, start
    )
    ring_words[W_WRITE_CURSOR] = 0
    ring_words[W_HEAD] = 0
    ring_words[W_NEXT_SEQ] = 0
    ring_words[W_LAST_RECORD] = NO_RECORD
    ring_words[W_CLOSED] = 0
    release_fence()  # rule 2: the ring file before the entry that names it
    words[entry_word(entry, ENTRY_CAPACITY)] = capacity
    words[entry_word(entry, ENTRY_WRITER_SLOT)] = segment.slot
    words[entry_word(entry, ENTRY_WRITER_PID)] = pid
    words[entry_word(entry, ENTRY_WRITER_START)] = start
    release_fence()
    words[entry_word(entry, ENTRY_STATE)] = ENTRY_LIVE  # rule 3: the entry's commit
    words[slot_word(segment.slot, SLOT_RING)] = entry + 1
    signal_change(segment)  # rule 4
    return OwnRing(entry, gen, mm, ring_words, capacity, max_event_size, ring_id, path)


def retire_ring(segment: Segment, ring: OwnRing) -> None:
    """The writer closes: mark its ring retired, reclaim it if no reader is
    owed anything from it, and let go of the entry. Never waits."""
    ring.words[W_CLOSED] = 1
    words = segment.words
    words[entry_word(ring.entry, ENTRY_STATE)] = ENTRY_RETIRED
    if segment.slot >= 0:
        words[slot_word(segment.slot, SLOT_RING)] = 0
    signal_change(segment)
    try:
        _reclaim_owned(segment, ring.entry)
    finally:
        ring.close()
        ofd.unlock(segment.fd, LOCK_RING_BASE + ring.entry)


def reclaim_dead(segment: Segment, own_entry: int = -1) -> int:
    """Reclaim every ring whose writer is gone and that no reader is still
    owed; return how many were removed. Non-blocking: an entry someone holds
    is skipped."""
    words = segment.words
    fd = segment.fd
    removed = 0
    for entry in range(MAX_RINGS):
        if entry == own_entry or words[entry_word(entry, ENTRY_STATE)] == ENTRY_FREE:
            continue
        if not ofd.try_lock(fd, LOCK_RING_BASE + entry, exclusive=True):
            continue  # a live writer (or another reclaimer)
        try:
            state = words[entry_word(entry, ENTRY_STATE)]
            if state != ENTRY_FREE and _reclaim_owned(segment, entry):
                removed += 1
        finally:
            ofd.unlock(fd, LOCK_RING_BASE + entry)
    return removed


def _reclaim_owned(segment: Segment, entry: int) -> bool:
    """With the entry's lock byte held: make it FREE if no reader is owed its
    ring (reclaim rules); True if the entry is free now."""
    words = segment.words
    state_word = entry_word(entry, ENTRY_STATE)
    state = int(words[state_word])
    if state == ENTRY_FREE:
        return True
    gen = int(words[entry_word(entry, ENTRY_GEN)])
    ring_id = int(words[entry_word(entry, ENTRY_RING_ID)])
    if state != ENTRY_INSTALLING:  # an installer's ring was never shown to readers
        words[state_word] = ENTRY_RECLAIMING  # rule 1
        full_fence()
        for slot in range(MAX_SLOTS):
            if (
                words[slot_word(slot, SLOT_SUBSCRIPTIONS)]
                and words[seen_word(slot, entry)] < gen
                and (
                    slot == segment.slot
                    or ofd.holds_conflicting(segment.fd, LOCK_SLOT_BASE + slot)
                )
            ):
                # Rule 2: that reader may still be owed this ring's events.
                words[state_word] = ENTRY_RETIRED
                return False
    try:
        os.unlink(ring_path(segment.name, ring_id))  # rule 3
    except FileNotFoundError:
        pass
    except PermissionError:
        log.info("bus %r: ring file of entry %d belongs to another user", segment.name, entry)
    words[state_word] = ENTRY_FREE
    signal_change(segment)
    return True


# ─── Readers ─────────────────────────────────────────────────────────────────


def scan(segment: Segment) -> tuple[list[EntryView], bool]:
    """Read every entry that names a ring (reader rule 3). Returns the
    entries and whether all of them read consistently (False: scan again)."""
    words = segment.words
    found: list[EntryView] = []
    stable = True
    for entry in range(MAX_RINGS):
        state = int(words[entry_word(entry, ENTRY_STATE)])
        if state in (ENTRY_FREE, ENTRY_INSTALLING):
            continue
        acquire_fence()
        gen = int(words[entry_word(entry, ENTRY_GEN)])
        ring_id = int(words[entry_word(entry, ENTRY_RING_ID)])
        capacity = int(words[entry_word(entry, ENTRY_CAPACITY)])
        writer_slot = int(words[entry_word(entry, ENTRY_WRITER_SLOT)])
        acquire_fence()
        again = int(words[entry_word(entry, ENTRY_STATE)])
        if again != state and not (state == ENTRY_LIVE and again == ENTRY_RETIRED):
            stable = False
            if again in (ENTRY_FREE, ENTRY_INSTALLING):
                continue
        if int(words[entry_word(entry, ENTRY_GEN)]) != gen:
            stable = False
            continue
        found.append(EntryView(entry, gen, again, ring_id, capacity, writer_slot))
    return found, stable


@dataclass(frozen=True, slots=True)
class FoundRing:
    """A ring a :class:`RingFinder` scan mapped: follow it from its beginning
    (reader rule 2) or from its current end (rule 1)."""

    mapping: RingMapping
    from_start: bool


class RingFinder:
    """A reader's side of the directory: reader rules 1-4 for one slot.

    The reader announces its subscriptions here (the word reclaimers look
    at), asks whether the directory changed (one flag byte), and scans; what
    it follows is its own business (it passes the keys it knows).
    """

    def __init__(self, segment: Segment) -> None:
        self._segment = segment
        self._slot = segment.slot
        self._flag = OFF_DIRECTORY_FLAGS + segment.slot
        self._subscriptions = slot_word(segment.slot, SLOT_SUBSCRIPTIONS)
        #: Scans that found a ring file it could not use (counted as corrupt).
        self.unusable = 0

    def changed(self) -> bool:
        """True if the directory changed since the last scan."""
        return bool(self._segment.mm[self._flag])

    def announce(self, subscriptions: int) -> None:
        """Store the number of open subscriptions (0: not reading)."""
        self._segment.words[self._subscriptions] = subscriptions

    def scan(self, known: set[tuple[int, int]], *, first: bool) -> list[FoundRing]:
        """Map every ring the directory names whose (entry, generation) is not
        in *known* and that this reader is owed (reader rules 1-4).

        *first*: the reader's first scan since it announced subscriptions
        (rule 1: only LIVE rings, from their end). The caller must have
        announced its subscriptions before calling it, and calls
        :meth:`adopted` for each ring once it follows it (rule 4: only then is
        it marked seen).
        """
        segment = self._segment
        words = segment.words
        segment.mm[self._flag] = 0
        full_fence()  # rule 1 (the subscriptions word) and rule 2 (the flag) before the scan
        views, stable = scan(segment)
        found: list[FoundRing] = []
        for view in views:
            key = (view.entry, view.gen)
            seen = seen_word(self._slot, view.entry)
            if key in known:
                if words[seen] < view.gen:
                    words[seen] = view.gen  # followed before an interruption marked it
                continue
            if not first and words[seen] >= view.gen:
                continue  # (a first scan ignores what an earlier reader of the slot saw)
            if first and view.state != ENTRY_LIVE:
                words[seen] = view.gen  # rule 1: retired before we subscribed
                continue
            try:
                mapping = map_ring(segment, view)
            except (ShmBusError, OSError) as exc:
                log.warning("bus %r: not reading ring %s: %s", segment.name, key, exc)
                self.unusable += 1
                words[seen] = view.gen
                continue
            if mapping is None:
                if not first:
                    log.warning("bus %r: ring %s vanished before it was read", segment.name, key)
                words[seen] = view.gen
                continue
            found.append(FoundRing(mapping, not first))
        if not stable:
            self.scan_again()  # rule 3
        return found

    def adopted(self, found: FoundRing) -> None:
        """The caller follows *found* now: mark its generation seen (rule 4).
        Until then it stays owed to this reader, however the scan ended."""
        mapping = found.mapping
        words = self._segment.words
        seen = seen_word(self._slot, mapping.entry)
        if words[seen] < mapping.gen:
            words[seen] = mapping.gen

    def scan_again(self) -> None:
        """Make :meth:`changed` true, so the reader scans at its next step."""
        self._segment.mm[self._flag] = 1


def map_ring(segment: Segment, view: EntryView) -> RingMapping | None:
    """Map the ring file *view* names, read-only, after checking the file
    (shmfiles rules) and its identity against the entry. None if it is gone
    (reclaimed: nobody was owed it). Raises SegmentCorruptError or
    ForeignFileError if it is not a ring this bus may read."""
    path = ring_path(segment.name, view.ring_id)
    try:
        fd = open_checked(path, os.O_RDONLY, segment.access)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size < RING_OFFSET:
            raise SegmentCorruptError(f"{path} is {size} bytes, smaller than a ring header")
        mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    identity = read_ring_identity(mm)
    problem = ""
    if identity.magic != RING_MAGIC or identity.layout_version != LAYOUT_VERSION:
        problem = f"magic {identity.magic:#x}, layout version {identity.layout_version}"
    elif (identity.entry, identity.ring_id, identity.gen) != (view.entry, view.ring_id, view.gen):
        problem = (
            f"it says entry {identity.entry}, id {identity.ring_id:#x}, generation "
            f"{identity.gen}; the directory says {view.entry}, {view.ring_id:#x}, {view.gen}"
        )
    elif (
        not MIN_MAX_EVENT_SIZE <= identity.max_event_size <= MAX_MAX_EVENT_SIZE
        or not min_capacity(identity.max_event_size) <= identity.capacity <= MAX_CAPACITY
        or identity.capacity % 8
        or size != ring_file_size(identity.capacity)
    ):
        problem = (
            f"capacity {identity.capacity}, max_event_size {identity.max_event_size} and "
            f"file size {size} do not agree"
        )
    if problem:
        mm.close()
        raise SegmentCorruptError(f"{path} is not a ring of bus {segment.name!r}: {problem}")
    return RingMapping(
        view.entry,
        view.gen,
        mm,
        memoryview(mm).cast("Q"),
        int(identity.capacity),
        int(identity.max_event_size),
    )


def writer_alive(segment: Segment, entry: int, gen: int) -> bool:
    """True while generation *gen* of *entry* may still get new records:
    its entry is LIVE with that generation and its writer holds the entry's
    lock byte (reader rule 5)."""
    words = segment.words
    if (
        words[entry_word(entry, ENTRY_STATE)] != ENTRY_LIVE
        or words[entry_word(entry, ENTRY_GEN)] != gen
    ):
        return False
    return ofd.holds_conflicting(segment.fd, LOCK_RING_BASE + entry)
