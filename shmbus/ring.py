"""The ring protocol: how records are written into and read out of the ring.

Theory of operation
-------------------
The ring is ``capacity`` bytes inside the segment. Positions are 64-bit byte
counts that only grow; ``position % capacity`` is where a position lives.
Three header words describe the ring (see :mod:`shmbus.layout`):

========================  ====================================================
``write_cursor``          End of the last committed record. Readers never read
                          at or past it. Advancing it is the commit.
``head``                  Start of the oldest record whose bytes are intact.
                          Everything in ``[head, write_cursor)`` is readable.
``next_seq``              Sequence number the next event record will carry.
========================  ====================================================

Writer rules (one writer at a time: the caller holds the writer lock):

1. **Reserve** the sequence number first (``next_seq += 1``). A writer that
   dies after this leaves a gap in the sequence that every reader sees and
   counts as a lost event, so a crash is never silent.
2. **Reclaim**: walk ``head`` forward over whole records until the new record
   (and any padding before it) fits in ``[head + capacity)``; store ``head``
   *before* touching the reclaimed bytes, so a reader that sees new bytes also
   sees the new ``head`` (stores are not reordered with stores on x86-64).
3. **Write** an optional padding record up to the wrap point (a record never
   straddles the end of the ring), then the record: header, topic, body.
4. **Commit** by storing ``write_cursor`` past the record.

Reader rules (any number of readers, none of them writes the ring):

1. Read ``write_cursor``; read records from the private ``cursor`` up to it,
   copying out the topic, and the body only of records a subscription wants.
2. Then read ``head``. Any record read at a position below it may have been
   overwritten while it was copied (the reader was *lapped*): throw the batch
   away, move to ``head`` and read again. The gap in sequence numbers this
   leaves is counted when the next record arrives.
3. A record whose header does not make sense (length, kind, sizes) is
   *corrupt*: it is counted and the reader moves to ``write_cursor``, the only
   other record boundary it can trust; the gap is counted too.
4. Sequence numbers must increase by one; a jump forward is a gap (lap,
   corrupt run, or a dead writer's reserved number), counted as lost events.

Everything read from the ring is untrusted: every length is checked against
the ring's bounds and ``max_event_size`` before anything is sliced, so a
reader never allocates more than ``max_event_size`` per record and never loops
more than ``limit`` records per call.
"""

from __future__ import annotations

import logging
import mmap
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .layout import (
    MAX_TOPIC_BYTES,
    RECORD,
    RECORD_EVENT,
    RECORD_HEADER_SIZE,
    RECORD_PADDING,
    W_HEAD,
    W_LAST_RECORD,
    W_NEXT_SEQ,
    W_PUBLISHED,
    W_RECLAIM_CORRUPT,
    W_TORN_RECORDS,
    W_WRITE_CURSOR,
    aligned,
    min_capacity,
    seq_mix,
)

__all__ = ["RingBatch", "RingReader", "RingWriter", "content_checksum"]

log = logging.getLogger("shmbus.ring")

Route = TypeVar("Route")


def content_checksum(topic: bytes, body: bytes) -> int:
    """CRC-32 of a record's topic and body, before it is bound to a sequence."""
    return zlib.crc32(body, zlib.crc32(topic))


class RingWriter:
    """Appends records to the ring. The caller must hold the writer lock."""

    __slots__ = ("_mm", "_words", "_base", "_capacity", "_reclaim_slack", "before_commit")

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
        #: Fault-injection hook run after the record is written, before the
        #: commit; None outside tests.
        self.before_commit: Callable[[], None] | None = None

    def append(self, topic: bytes, body: bytes, checksum: int) -> int:
        """Write one event record and commit it; return its sequence number.

        *checksum* is :func:`content_checksum` of *topic* and *body*, computed
        by the caller before taking the lock.
        """
        mm = self._mm
        words = self._words
        capacity = self._capacity
        base = self._base
        seq: int = words[W_NEXT_SEQ]
        words[W_NEXT_SEQ] = seq + 1
        position: int = words[W_WRITE_CURSOR]
        head: int = words[W_HEAD]
        if not position - capacity <= head <= position:
            # Only a foreign write can put head there: start reclaiming afresh.
            head = position
            words[W_HEAD] = head
            words[W_RECLAIM_CORRUPT] += 1
        topic_len = len(topic)
        body_len = len(body)
        length = aligned(RECORD_HEADER_SIZE + topic_len + body_len)
        offset = position % capacity
        room = capacity - offset
        pad = room if length > room else 0
        reclaim_to = position + pad + length - capacity
        if head < reclaim_to:
            # Reclaim a slice of the ring at a time rather than one record
            # per append: the walk then runs once per ~capacity/16 bytes.
            head = self._reclaim(head, reclaim_to + self._reclaim_slack, position)
            words[W_HEAD] = head
        if pad:
            if pad >= RECORD_HEADER_SIZE:
                RECORD.pack_into(mm, base + offset, pad, RECORD_PADDING, 0, 0, 0, 0)
            position += pad
            offset = 0
        start = base + offset
        RECORD.pack_into(
            mm, start, length, RECORD_EVENT, topic_len, seq, body_len, checksum ^ seq_mix(seq)
        )
        start += RECORD_HEADER_SIZE
        mm[start : start + topic_len] = topic
        start += topic_len
        mm[start : start + body_len] = body
        if self.before_commit is not None:
            self.before_commit()
        words[W_LAST_RECORD] = position
        words[W_WRITE_CURSOR] = position + length
        words[W_PUBLISHED] += 1
        return seq

    def account_dead_writer(self) -> int:
        """After taking the lock over from a dead writer, count the sequence
        numbers it reserved but never committed; return how many."""
        words = self._words
        reserved = words[W_NEXT_SEQ]
        if reserved == 0:
            return 0
        # The last reserved number was committed iff the last committed
        # record (whose start is stored just before each commit) carries it.
        last = words[W_LAST_RECORD]
        write_cursor = words[W_WRITE_CURSOR]
        committed = False
        if last < write_cursor <= last + self._capacity:
            offset = last % self._capacity
            if self._capacity - offset >= RECORD_HEADER_SIZE:
                _, kind, _, seq, _, _ = RECORD.unpack_from(self._mm, self._base + offset)
                committed = kind == RECORD_EVENT and seq == reserved - 1
        torn = 0 if committed else 1
        words[W_TORN_RECORDS] += torn
        # Every reserved number is now either committed or torn; a writer that
        # died between its commit and counting it must not leave this short.
        words[W_PUBLISHED] = reserved - words[W_TORN_RECORDS]
        return torn

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
            sane = (kind == RECORD_PADDING and length == room) or (
                kind == RECORD_EVENT
                and length == aligned(RECORD_HEADER_SIZE + topic_len + body_len)
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


@dataclass(slots=True)
class RingBatch(Generic[Route]):
    """What one :meth:`RingReader.read` call found."""

    #: Wanted records in ring order: (seq, route, topic, body, checksum_ok).
    records: list[tuple[int, Route, bytes, bytes, bool]] = field(default_factory=list)
    #: Ranges of lost sequence numbers, ``[first, end)``: laps, dead writers.
    gaps: list[tuple[int, int]] = field(default_factory=list)
    #: Records rejected because their header was unreadable.
    corrupt: int = 0
    #: True if the reader was lapped during this call (its batch discarded).
    lapped: bool = False


class RingReader(Generic[Route]):
    """Follows the ring from a starting position, for one process's reader.

    Parameters
    ----------
    mm, ring_offset, capacity, max_event_size:
        The mapped segment and its ring geometry.
    cursor, next_seq:
        Where to start: a consistent pair read under the writer lock, so no
        record at or after *cursor* has a sequence number below *next_seq*.
    """

    __slots__ = ("_mm", "_words", "_base", "_capacity", "_max_body", "cursor", "expected_seq")

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
        self.cursor = cursor
        self.expected_seq = next_seq

    def pending(self) -> bool:
        """True if committed records lie beyond the cursor."""
        return bool(self._words[W_WRITE_CURSOR] != self.cursor)

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
        for _attempt in range(3):
            head: int = words[W_HEAD]
            position = max(self.cursor, head)
            if head <= write_cursor and 0 <= write_cursor - position <= capacity:
                break
            # Writers moved between the two loads (head is newer than the
            # write_cursor we read): load both again.
            write_cursor = words[W_WRITE_CURSOR]
        else:
            # They stay contradictory: the header words are corrupt, not a
            # record. Resynchronise at the commit point.
            batch.corrupt += 1
            self.cursor = write_cursor
            return batch
        start_position = position
        # Every committed record below write_cursor reserved its number
        # before the commit, so none can carry one at or above this.
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
        crc32 = zlib.crc32
        while position < write_cursor and count < limit and budget > 0:
            offset = position % capacity
            room = capacity - offset
            if room < RECORD_HEADER_SIZE:
                position += room
                continue
            length, kind, topic_len, seq, body_len, checksum = unpack_record(mm, base + offset)
            if kind == RECORD_PADDING and length == room:
                position += room
                continue
            if (
                kind != RECORD_EVENT
                or length != (RECORD_HEADER_SIZE + 7 + topic_len + body_len) & ~7
                or length > room
                or not 0 < topic_len <= MAX_TOPIC_BYTES
                or body_len > max_body
            ):
                if words[W_HEAD] > position:
                    break  # overwritten under us, not corrupt: handled below
                corrupt_at.append(position)
                position = write_cursor
                break
            topic_start = base + offset + RECORD_HEADER_SIZE
            body_start = topic_start + topic_len
            topic = mm[topic_start:body_start]
            if seq != expected:
                # A gap, or a damaged sequence number: believe it only if the
                # record is intact, or one flipped bit would make every later
                # record look stale. A damaged record is skipped whole; its
                # own event then shows up as a gap at the next good record.
                body = mm[body_start : body_start + body_len]
                mix = ((seq * 0x9E3779B1) ^ (seq >> 32)) & 0xFFFFFFFF
                if (
                    seq < expected
                    or seq >= next_seq_bound
                    or crc32(body, crc32(topic)) ^ mix != checksum
                ):
                    if words[W_HEAD] > position:
                        break  # overwritten under us: handled below
                    corrupt_at.append(position)
                    position += length
                    continue
                gaps.append((expected, seq))
            marks.append((position, seq))
            expected = seq + 1
            count += 1
            route = select(topic)
            if route is not None:
                budget -= body_len
                body = mm[body_start : body_start + body_len]
                # seq_mix(seq), inlined: this loop runs once per record.
                mix = ((seq * 0x9E3779B1) ^ (seq >> 32)) & 0xFFFFFFFF
                records.append(
                    (seq, route, topic, body, crc32(body, crc32(topic)) ^ mix == checksum)
                )
            position += length
        head = words[W_HEAD]
        if head > start_position:
            return self._salvage(batch, head, marks, corrupt_at, position, expected)
        batch.corrupt += len(corrupt_at)
        self.cursor = position
        self.expected_seq = expected
        return batch

    def _salvage(
        self,
        batch: RingBatch[Route],
        head: int,
        marks: list[tuple[int, int]],
        corrupt_at: list[int],
        position: int,
        expected: int,
    ) -> RingBatch[Route]:
        """Lapped while copying: keep what is provably intact.

        ``head`` moves before any byte is overwritten and never moves back, so
        a record that starts at or above its final value was not touched while
        it was copied; one below it may have been. The records below are
        dropped, and the sequence numbers they held become a gap, counted.
        """
        keep = next((index for index, (start, _) in enumerate(marks) if start >= head), None)
        if keep is None:
            # Nothing provably intact: start again at the oldest intact
            # record; the gap is counted at the next record read.
            self.cursor = head
            return RingBatch(lapped=True)
        first_seq = marks[keep][1]
        salvaged: RingBatch[Route] = RingBatch(lapped=True)
        salvaged.records = [record for record in batch.records if record[0] >= first_seq]
        if first_seq > self.expected_seq:
            salvaged.gaps.append((self.expected_seq, first_seq))
        salvaged.gaps.extend(gap for gap in batch.gaps if gap[0] > first_seq)
        salvaged.corrupt = sum(1 for start in corrupt_at if start >= head)
        self.cursor = position
        self.expected_seq = expected
        return salvaged
