"""The ring protocol: how one writer appends records to its ring and how any
number of readers follow it.

Theory of operation
-------------------
Every publishing bus instance owns one ring (a ring file, see
:mod:`shmbus._core.layout`) and is its only writer: threads of the instance take an
in-process lock, and no other process ever writes it. Nothing on the write
path waits for another process, and a writer that dies, stalls or is
interrupted can hurt nobody's ring but its own.

The ring is ``capacity`` bytes. Positions are 64-bit byte counts that only
grow; ``position % capacity`` is where a position lives. The writer state
words (written by the writer alone) describe the ring:

========================  ====================================================
``write_cursor``          End of the last committed record. Readers never read
                          at or past it. Storing it is the commit.
``head``                  Start of the oldest record whose bytes are intact.
                          Everything in ``[head, write_cursor)`` is readable.
``next_seq``              One more than the newest sequence number written or
                          being written: a bound no committed record reaches.
``last_record``           Start of the last committed record, so that a reader
                          can read a consistent (position, sequence) pair.
========================  ====================================================

Writer rules (one writer; ``R`` marks a release fence, ``A`` an acquire
fence, see :mod:`shmbus._core.ordering`):

1. **Know where you are.** The writer keeps its position and next sequence
   number in its own memory and uses the shared words only to publish them.
   If ``write_cursor`` is not where the writer left it, its last append was
   interrupted (a signal handler raised) after the commit: it takes position
   from ``write_cursor`` and the sequence number from the record at
   ``last_record``. Interrupted before the commit, the append is simply
   redone at the same place with the same number.
2. **Reclaim**: walk ``head`` over whole records until the new record (and
   any padding before it) fits in ``[head, head + capacity)``; store ``head``,
   then ``R``, *before* touching the reclaimed bytes, so a reader that sees new
   bytes also sees the new ``head``.
3. **Write** an optional padding record up to the wrap point (a record never
   straddles the end of the ring), then the record: header, topic, body; a
   *group record* (an event that queue-group members must share, see
   :mod:`shmbus._core.groups`) has its assignments block between the header
   and the topic, and its checksum covers the block too.
4. Store ``next_seq = seq + 1``, then ``R`` (the record and the bound before
   the commit).
5. **Commit**: store ``last_record``, then ``write_cursor`` past the record.

A writer killed anywhere leaves at most one uncommitted record, past
``write_cursor`` where no reader looks; nothing it committed is lost, and
nobody waits for it.

Reader rules (any number of readers, none of them writes the ring, which
they map read-only):

1. Load ``write_cursor``, then ``A``, then ``head`` and ``next_seq``; read records
   from the private ``cursor`` up to ``write_cursor``, copying out the topic,
   and the body only of records a subscription wants. A body is copied once
   into memory of the reader's own (a large one into an arena the reader
   reuses from one call to the next) and is checked and decoded from there,
   never from the shared mapping.
2. Then ``A`` and load ``head`` again. ``head`` moves before any byte is
   overwritten and never moves back, so a record that starts at or above its
   final value was not touched while it was copied: keep those. The records
   below it may have been overwritten (the reader was *lapped*): drop them;
   their sequence numbers become a gap, counted. If none was intact, the
   writer is overrunning the reader: move to ``last_record`` (the newest
   record, if it is committed, i.e. below ``write_cursor``, and at or above
   ``head``; else to ``head``) and count the gap at the next record read.
   Moving to ``head``, the next record the writer reclaims, would be lapped
   again at once; the newest record is a whole ring ahead of the writer.
   A reader may stop copying early when ``head`` has already passed the
   record it is about to copy (a hint: rule 2's check after the copy decides).
3. A record whose header does not make sense (length, kind, sizes, a group
   record's assignment count outside ``1..MAX_ASSIGNMENTS``) is *corrupt*: it
   is counted and the reader moves to ``write_cursor``, the only other record
   boundary it can trust; the gap is counted too. What the assignments *say*
   is checked by whoever acts on them (:mod:`shmbus._core.groups`), and only
   for a record whose checksum holds.
4. Sequence numbers must increase by one; a jump forward is a gap (lap or
   corrupt run), counted as lost events. A number that is not above the last
   one, or not below ``next_seq``, or whose record fails its checksum while
   it jumps, is corrupt, not a gap.
5. A reader joining a ring starts at the record after ``last_record``
   (:meth:`RingReader.snapshot`): its header gives a position and a
   sequence number that belong together. If that position is past
   ``write_cursor`` (the writer is between its two commit stores), or the
   ring keeps lapping the snapshot, it starts at ``write_cursor`` and
   adopts the next record's number.

Everything read from the ring is untrusted: every length is checked against
the ring's bounds and ``max_event_size`` before anything is sliced, so a
reader never allocates more than ``max_event_size`` per record and never loops
more than ``limit`` records per call.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Callable
from typing import Generic, TypeVar

from .layout import (
    ASSIGNMENT,
    GROUP_HEADER,
    MAX_ASSIGNMENTS,
    MAX_TOPIC_BYTES,
    NO_RECORD,
    RECORD,
    RECORD_EVENT,
    RECORD_GROUP,
    RECORD_HEADER_SIZE,
    RECORD_PADDING,
    W_HEAD,
    W_LAST_RECORD,
    W_NEXT_SEQ,
    W_RECLAIM_CORRUPT,
    W_WRITE_CURSOR,
    aligned,
    min_capacity,
    seq_mix,
)
from .ordering import acquire_fence, release_fence

__all__ = [
    "UNKNOWN_SEQ",
    "RingBatch",
    "RingReader",
    "RingWriter",
    "assignments_length",
    "content_checksum",
    "crc32",
    "event_at",
]

log = logging.getLogger("shmbus._core.ring")

try:
    # ISA-L's CRC-32: the same CRC-32 as zlib's (processes with and without
    # it read each other's rings), about 3.5 times faster, which is most of
    # the per-byte cost of a large event on both sides.
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is a dependency; a build may lack it
    from zlib import crc32

#: Bodies at least this large are copied into the reader's reusable arena
#: rather than into a new ``bytes`` each (no allocation or page faults per
#: record; below it a small copy is cheaper than the bookkeeping).
ARENA_MIN = 16 * 1024

Route = TypeVar("Route")

#: ``expected_seq`` of a reader that adopts the next record's number as is.
UNKNOWN_SEQ = -1

_EVENT_KINDS = (RECORD_EVENT, RECORD_GROUP)
#: Bytes a group record needs before its assignments can be read.
_GROUP_MINIMUM = RECORD_HEADER_SIZE + GROUP_HEADER.size


def event_at(
    mm: mmap.mmap, ring_offset: int, capacity: int, position: int
) -> tuple[int, int] | None:
    """(length, seq) of the event record starting at *position*, or None if
    no event record header fits there (what ``last_record`` points at)."""
    offset = position % capacity
    if capacity - offset < RECORD_HEADER_SIZE:
        return None
    length, kind, _, seq, _, _ = RECORD.unpack_from(mm, ring_offset + offset)
    if kind not in _EVENT_KINDS or not 0 < length <= capacity - offset:
        return None
    return length, seq


def assignments_length(
    mm: mmap.mmap | memoryview, record_offset: int, kind: int, room: int
) -> int:
    """Bytes of assignments between a record's header and its topic: 0 for an
    event record, the size of the block for a group record, -1 if the record
    cannot be one (the count is out of bounds, or the block does not fit)."""
    if kind == RECORD_EVENT:
        return 0
    if kind != RECORD_GROUP or room < _GROUP_MINIMUM:
        return -1
    count: int = GROUP_HEADER.unpack_from(mm, record_offset + RECORD_HEADER_SIZE)[0]
    if not 0 < count <= MAX_ASSIGNMENTS:
        return -1
    return GROUP_HEADER.size + count * ASSIGNMENT.size


def content_checksum(topic: bytes, body: bytes) -> int:
    """CRC-32 of a record's topic and body, before it is bound to a sequence."""
    return crc32(body, crc32(topic))


class RingWriter:
    """Appends records to one ring; the caller is its only writer (threads of
    one instance serialise before calling)."""

    __slots__ = (
        "_mm",
        "_words",
        "_base",
        "_capacity",
        "_reclaim_slack",
        "_position",
        "_next_seq",
        "before_commit",
    )

    def __init__(
        self, mm: mmap.mmap, words: memoryview, ring_offset: int, capacity: int, max_event_size: int
    ) -> None:
        self._mm = mm
        self._words = words
        self._base = ring_offset
        self._capacity = capacity
        # Never so much slack that the ring could not hold two of the largest
        # records any more.
        self._reclaim_slack = max(0, min(capacity // 16, capacity - min_capacity(max_event_size)))
        self._position = int(words[W_WRITE_CURSOR])
        self._next_seq = int(words[W_NEXT_SEQ])
        #: Fault-injection hook run after the record is written, before the
        #: commit; None outside tests.
        self.before_commit: Callable[[], None] | None = None

    @property
    def next_seq(self) -> int:
        """Sequence number the next record will carry (= records committed)."""
        return self._next_seq

    @property
    def commit_point(self) -> int:
        """The ``write_cursor`` word as it is now: it moves iff an append commits."""
        return int(self._words[W_WRITE_CURSOR])

    def append(self, topic: bytes, body: bytes, checksum: int, assignments: bytes = b"") -> int:
        """Write one event record and commit it; return its sequence number.

        *checksum* is :func:`content_checksum` of *topic* and *body*, computed
        by the caller beforehand. *assignments* (a group-header and its
        assignments, see :mod:`shmbus._core.groups`) makes it a group record.
        """
        mm = self._mm
        words = self._words
        capacity = self._capacity
        base = self._base
        position = self._position
        if words[W_WRITE_CURSOR] != position:
            position = self._resync()  # rule 1
        seq = self._next_seq
        head: int = words[W_HEAD]
        if not position - capacity <= head <= position:
            # Only a foreign write can put head there: start reclaiming afresh.
            head = position
            words[W_HEAD] = head
            words[W_RECLAIM_CORRUPT] += 1
        topic_len = len(topic)
        body_len = len(body)
        extra = len(assignments)
        kind = RECORD_GROUP if extra else RECORD_EVENT
        if extra:
            checksum = crc32(assignments, checksum)
        length = aligned(RECORD_HEADER_SIZE + extra + topic_len + body_len)
        offset = position % capacity
        room = capacity - offset
        pad = room if length > room else 0
        reclaim_to = position + pad + length - capacity
        if head < reclaim_to:
            # Reclaim a slice of the ring at a time rather than one record
            # per append: the walk then runs once per ~capacity/16 bytes.
            head = self._reclaim(head, reclaim_to + self._reclaim_slack, position)
            words[W_HEAD] = head
            release_fence()  # rule 2: head before the reclaimed bytes change
        if pad:
            if pad >= RECORD_HEADER_SIZE:
                RECORD.pack_into(mm, base + offset, pad, RECORD_PADDING, 0, 0, 0, 0)
            position += pad
            offset = 0
        start = base + offset
        RECORD.pack_into(mm, start, length, kind, topic_len, seq, body_len, checksum ^ seq_mix(seq))
        start += RECORD_HEADER_SIZE
        if extra:
            mm[start : start + extra] = assignments
            start += extra
        mm[start : start + topic_len] = topic
        start += topic_len
        mm[start : start + body_len] = body
        if self.before_commit is not None:
            self.before_commit()
        words[W_NEXT_SEQ] = seq + 1
        release_fence()  # rule 4: record and bound before the commit
        words[W_LAST_RECORD] = position
        words[W_WRITE_CURSOR] = position + length  # rule 5: the commit
        self._position = position + length
        self._next_seq = seq + 1
        return seq

    def _resync(self) -> int:
        """The last append was interrupted after its commit: adopt it."""
        words = self._words
        position = int(words[W_WRITE_CURSOR])
        last = int(words[W_LAST_RECORD])
        seq = int(words[W_NEXT_SEQ])
        if last != NO_RECORD and last < position:
            found = event_at(self._mm, self._base, self._capacity, last)
            if found is not None:
                seq = found[1] + 1
        self._position = position
        self._next_seq = seq
        return position

    def _reclaim(self, head: int, reclaim_to: int, write_cursor: int) -> int:
        """Walk *head* over whole records until it reaches *reclaim_to*."""
        mm = self._mm
        capacity = self._capacity
        while head < reclaim_to:
            if head >= write_cursor:
                return write_cursor
            offset = head % capacity
            room = capacity - offset
            if room < RECORD_HEADER_SIZE:
                head += room
                continue
            length, kind, topic_len, _seq, body_len, _ = RECORD.unpack_from(mm, self._base + offset)
            extra = assignments_length(mm, self._base + offset, kind, room)
            sane = (kind == RECORD_PADDING and length == room) or (
                extra >= 0
                and length == aligned(RECORD_HEADER_SIZE + extra + topic_len + body_len)
                and length <= room
            )
            if not sane:
                # Someone scribbled on the ring: no record boundary past this
                # point can be trusted, so give up everything older than the
                # record being written. Readers count the loss as a gap.
                log.warning(
                    "ring record at position %d is unreadable (length=%d kind=%d); "
                    "discarding records up to position %d",
                    head,
                    length,
                    kind,
                    write_cursor,
                )
                self._words[W_RECLAIM_CORRUPT] += 1
                return write_cursor
            head += length
        return head


class RingBatch(Generic[Route]):
    """What one :meth:`RingReader.read` call found.

    A plain slotted class rather than a dataclass: one is made per read, on
    the path from a wake-up to the event in hand.
    """

    __slots__ = ("records", "assignments", "gaps", "corrupt", "lapped", "examined")

    def __init__(self, *, lapped: bool = False) -> None:
        #: Wanted records in ring order: (seq, route, topic, body, checksum_ok).
        #: A large body is a view of the reader's arena, valid until its next
        #: read() call: decode it before reading again.
        self.records: list[tuple[int, Route, bytes, bytes | memoryview, bool]] = []
        #: The assignments block of each wanted group record, by sequence
        #: number (covered by the record's checksum).
        self.assignments: dict[int, bytes] = {}
        #: Ranges of lost sequence numbers, ``[first, end)``: laps, corrupt runs.
        self.gaps: list[tuple[int, int]] = []
        #: Records rejected because their header was unreadable.
        self.corrupt = 0
        #: True if the reader was lapped during this call.
        self.lapped = lapped
        #: Event records the call went through (wanted or not, kept or
        #: lapped): what its *limit* counted.
        self.examined = 0


class RingReader(Generic[Route]):
    """Follows one ring from a starting position, for one process's reader.

    Parameters
    ----------
    mm, words, ring_offset, capacity, max_event_size:
        The mapped ring file (read-only is enough), its words and geometry.
    cursor, next_seq:
        Where to start: a pair from :meth:`snapshot` (or ``(0, 0)`` for a
        ring read from its beginning); ``next_seq`` may be
        :data:`UNKNOWN_SEQ` to adopt the first record's number.
    """

    __slots__ = (
        "_mm",
        "_words",
        "_base",
        "_capacity",
        "_max_body",
        "_arena",
        "cursor",
        "expected_seq",
    )

    def __init__(
        self,
        mm: mmap.mmap,
        words: memoryview,
        ring_offset: int,
        capacity: int,
        max_event_size: int,
        cursor: int,
        next_seq: int,
    ) -> None:
        self._mm = mm
        self._words = words
        self._base = ring_offset
        self._capacity = capacity
        self._max_body = max_event_size
        #: Private copies of the large bodies of one read() call, allocated on
        #: the first large body and reused by every later call.
        self._arena: memoryview | None = None
        self.cursor = cursor
        self.expected_seq = next_seq

    def pending(self) -> bool:
        """True if committed records lie beyond the cursor."""
        return bool(self._words[W_WRITE_CURSOR] != self.cursor)

    def caught_up(self) -> bool:
        """True if the cursor is at ``write_cursor`` (loaded now)."""
        return bool(self._words[W_WRITE_CURSOR] == self.cursor)

    def backlog(self) -> int:
        """Committed bytes not read yet (0 if the words make no sense)."""
        behind = int(self._words[W_WRITE_CURSOR]) - self.cursor
        return behind if 0 <= behind <= self._capacity else 0

    def snapshot(self, attempts: int = 4) -> tuple[int, int]:
        """A consistent (position, next sequence number) pair: where a reader
        joining now starts (reader rule 5). Does not move this reader."""
        words = self._words
        capacity = self._capacity
        for _ in range(attempts):
            last = int(words[W_LAST_RECORD])
            acquire_fence()
            if last == NO_RECORD:
                return 0, 0
            found = event_at(self._mm, self._base, capacity, last)
            if found is None:
                break
            acquire_fence()
            if int(words[W_HEAD]) <= last:  # not lapped while we looked
                length, seq = found
                if last + length <= int(words[W_WRITE_CURSOR]):
                    return last + length, seq + 1
                # Between the writer's two commit stores (writer rule 5): the
                # record is written, its commit is not; start at the commit.
                break
        # Lapped under us again and again, or damaged: start at the commit
        # point and take the next record's number as it comes.
        return int(words[W_WRITE_CURSOR]), UNKNOWN_SEQ

    def read(self, limit: int, select: Callable[[bytes], Route | None]) -> RingBatch[Route]:
        """Read up to *limit* records; keep those for which *select* is not None.

        *select* gets the raw topic bytes of each event record and returns the
        route for it (None: not wanted, the body is never copied).
        """
        mm = self._mm
        words = self._words
        capacity = self._capacity
        base = self._base
        max_body = self._max_body
        batch: RingBatch[Route] = RingBatch()
        write_cursor: int = words[W_WRITE_CURSOR]
        position = self.cursor
        if position == write_cursor:
            return batch
        acquire_fence()  # rule 1: the commit before the records it covers
        head: int = words[W_HEAD]
        if head > position:
            position = head
        if not (head <= write_cursor and 0 <= write_cursor - position <= capacity):
            bounds = self._bounds()
            if bounds is None:
                # The words stay contradictory: the header words are corrupt,
                # not a record. Resynchronise at the commit point.
                batch.corrupt += 1
                self.cursor = int(words[W_WRITE_CURSOR])
                return batch
            write_cursor, position = bounds
        start_position = position
        # The writer stores next_seq before it commits, so no committed record
        # below write_cursor carries a number at or above this.
        next_seq_bound: int = words[W_NEXT_SEQ]
        expected = self.expected_seq
        records = batch.records
        gaps = batch.gaps
        # (position, seq) of every event record accepted, and the positions of
        # corrupt ones: what a partial lap keeps or drops (see below).
        marks: list[tuple[int, int]] = []
        corrupt_at: list[int] = []
        count = 0
        # Copy at most a quarter of the ring per call: with large events a
        # long batch would be lapped while it is being copied.
        budget = capacity // 4
        unpack_record = RECORD.unpack_from
        arena = self._arena
        arena_at = 0
        while position < write_cursor and count < limit and budget > 0:
            offset = position % capacity
            room = capacity - offset
            if room < RECORD_HEADER_SIZE:
                position += room
                continue
            length, kind, topic_len, seq, body_len, checksum = unpack_record(mm, base + offset)
            extra = 0
            if kind != RECORD_EVENT:
                if kind == RECORD_PADDING and length == room:
                    position += room
                    continue
                extra = assignments_length(mm, base + offset, kind, room)
            if (
                extra < 0
                or length != (RECORD_HEADER_SIZE + 7 + extra + topic_len + body_len) & ~7
                or length > room
                or not 0 < topic_len <= MAX_TOPIC_BYTES
                or body_len > max_body
            ):
                if words[W_HEAD] > position:
                    break  # overwritten under us, not corrupt: handled below
                corrupt_at.append(position)
                position = write_cursor
                break
            topic_start = base + offset + RECORD_HEADER_SIZE + extra
            body_start = topic_start + topic_len
            topic = mm[topic_start:body_start]
            if seq != expected:
                # A gap, or a damaged sequence number: believe it only if the
                # record is intact, or one flipped bit would make every later
                # record look stale. A damaged record is skipped whole; its
                # own event then shows up as a gap at the next good record.
                body = mm[body_start : body_start + body_len]
                mix = ((seq * 0x9E3779B1) ^ (seq >> 32)) & 0xFFFFFFFF
                content = crc32(body, crc32(topic))
                if extra:
                    content = crc32(mm[topic_start - extra : topic_start], content)
                if seq < expected or seq >= next_seq_bound or content ^ mix != checksum:
                    if words[W_HEAD] > position:
                        break  # overwritten under us: handled below
                    corrupt_at.append(position)
                    position += length
                    continue
                if expected != UNKNOWN_SEQ:
                    gaps.append((expected, seq))
            marks.append((position, seq))
            expected = seq + 1
            count += 1
            route = select(topic)
            if route is not None:
                if words[W_HEAD] > position:
                    # Being overwritten already: copying and checking it
                    # would be wasted work (rule 2 handles the lap).
                    break
                budget -= body_len
                copy: bytes | memoryview
                if body_len < ARENA_MIN:
                    copy = mm[body_start : body_start + body_len]
                else:
                    # One copy out of shared memory, into memory of our own:
                    # the checksum, rule 2's check and the decoding all look
                    # at that copy, never at bytes the writer may change.
                    if arena is None:
                        arena = self._arena = memoryview(
                            bytearray(capacity // 4 + self._max_body)
                        )
                    arena_end = arena_at + body_len
                    with memoryview(mm) as shared:
                        arena[arena_at:arena_end] = shared[body_start : body_start + body_len]
                    copy = arena[arena_at:arena_end]
                    arena_at = arena_end
                # seq_mix(seq), inlined: this loop runs once per record.
                mix = ((seq * 0x9E3779B1) ^ (seq >> 32)) & 0xFFFFFFFF
                content = crc32(copy, crc32(topic))
                if extra:
                    block = mm[topic_start - extra : topic_start]
                    batch.assignments[seq] = block
                    content = crc32(block, content)
                records.append((seq, route, topic, copy, content ^ mix == checksum))
            position += length
        acquire_fence()  # rule 2: the copies before the second load of head
        head = words[W_HEAD]
        if head > start_position:
            salvaged = self._salvage(batch, head, marks, corrupt_at, position, expected)
            salvaged.examined = count
            return salvaged
        batch.examined = count
        batch.corrupt += len(corrupt_at)
        self.cursor = position
        self.expected_seq = expected
        return batch

    def _bounds(self) -> tuple[int, int] | None:
        """(write_cursor, start position) from two fresh loads, once the
        first pair contradicted itself: the writer moved between the loads
        (head newer than the write_cursor read). None if the words stay
        contradictory."""
        words = self._words
        for _attempt in range(2):
            write_cursor = int(words[W_WRITE_CURSOR])
            acquire_fence()
            head = int(words[W_HEAD])
            position = max(self.cursor, head)
            if head <= write_cursor and 0 <= write_cursor - position <= self._capacity:
                return write_cursor, position
        return None

    def _salvage(
        self,
        batch: RingBatch[Route],
        head: int,
        marks: list[tuple[int, int]],
        corrupt_at: list[int],
        position: int,
        expected: int,
    ) -> RingBatch[Route]:
        """Lapped while copying (reader rule 2): keep what is provably intact."""
        keep = next((index for index, (start, _) in enumerate(marks) if start >= head), None)
        if keep is None:
            # Nothing provably intact (rule 2): resume at the newest
            # committed record; the gap is counted at the next record read.
            words = self._words
            last = int(words[W_LAST_RECORD])
            acquire_fence()
            committed = int(words[W_WRITE_CURSOR])
            self.cursor = last if last != NO_RECORD and head <= last < committed else head
            return RingBatch(lapped=True)
        first_seq = marks[keep][1]
        salvaged: RingBatch[Route] = RingBatch(lapped=True)
        salvaged.records = [record for record in batch.records if record[0] >= first_seq]
        salvaged.assignments = {
            seq: block for seq, block in batch.assignments.items() if seq >= first_seq
        }
        if first_seq > self.expected_seq and self.expected_seq != UNKNOWN_SEQ:
            salvaged.gaps.append((self.expected_seq, first_seq))
        salvaged.gaps.extend(gap for gap in batch.gaps if gap[0] > first_seq)
        salvaged.corrupt = sum(1 for start in corrupt_at if start >= head)
        self.cursor = position
        self.expected_seq = expected
        return salvaged
