"""The shared-memory segment layout: every offset, size and magic number.

This module is the single place where the bytes of a segment are given
meaning; ``docs/DESIGN.md`` draws the same picture. Change a layout and you
must bump :data:`LAYOUT_VERSION`, because processes of different versions would
otherwise read each other's bytes wrongly.

Segment (all integers little-endian, every 8-byte field 8-byte aligned so that
it is written by a single store)::

    0        HEADER: identity (written once at creation)
    64       HEADER: writer state (changed only under the writer lock)
    4096     SLEEP FLAGS: one byte per slot, 1 = that reader sleeps on its FIFO
    8192     SLOTS: MAX_SLOTS x SLOT_SIZE, one per attached bus instance
    RING_OFFSET   RING: ``capacity`` bytes of records

Record (starts 8-byte aligned inside the ring, never wraps)::

    0  length    u32  whole record incl. header and alignment padding
    4  kind      u16  RECORD_EVENT or RECORD_PADDING
    6  topic_len u16
    8  seq       u64  sequence number of the event (0 for padding)
    16 body_len  u32  msgpack envelope length
    20 checksum  u32  crc32(topic + body) xor seq_mix(seq)
    24 topic bytes, then body bytes, then zero padding to 8 bytes

File-lock bytes (Linux open-file-description locks on the segment's
descriptor; the kernel drops them when their holder dies):

* byte :data:`LOCK_ATTACH` is held shared by every attached instance, and
  exclusively by whoever initialises or removes the segment;
* byte :data:`LOCK_TAKEOVER` arbitrates which waiter takes over the writer
  lock from a dead holder;
* byte ``LOCK_SLOT_BASE + i`` is held exclusively by the owner of slot ``i``.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

# ─── Identity ────────────────────────────────────────────────────────────────

MAGIC = int.from_bytes(b"SHMBUS\x00\x01", "little")
LAYOUT_VERSION = 1
SEGMENT_READY = 0x52454459  # "READY": written last at initialisation

OFF_MAGIC = 0  # u64
OFF_LAYOUT_VERSION = 8  # u32
OFF_STATE = 12  # u32, SEGMENT_READY once initialised
OFF_CAPACITY = 16  # u64, ring bytes
OFF_MAX_EVENT_SIZE = 24  # u64, largest envelope accepted
OFF_RING_OFFSET = 32  # u64
OFF_CREATOR_PID = 40  # u64
OFF_CREATED_NS = 48  # u64, time.time_ns() at creation
OFF_MODE = 56  # u32, permission bits of the bus's files
OFF_GID = 60  # u32, group of the bus's files (NO_GROUP: the creator's)
IDENTITY = struct.Struct("<QIIQQQQQII")  # magic .. gid, offsets 0..64
NO_GROUP = 0xFFFFFFFF


class Identity(NamedTuple):
    """The identity words of a segment header, as :func:`read_identity` finds them."""

    magic: int
    layout_version: int
    state: int
    capacity: int
    max_event_size: int
    ring_offset: int
    creator_pid: int
    created_ns: int
    mode: int
    gid: int


def read_identity(header: bytes | memoryview | object) -> Identity:
    """Decode the identity words at the start of a mapped segment header."""
    return Identity._make(IDENTITY.unpack_from(header, 0))  # type: ignore[arg-type]

# ─── Writer state (mutated only by the writer-lock holder) ───────────────────

OFF_WRITE_CURSOR = 64  # u64, bytes ever committed: the commit point
OFF_HEAD = 72  # u64, position of the oldest record not yet reclaimed
OFF_NEXT_SEQ = 80  # u64, sequence number the next record will take
OFF_LOCK_PID = 88  # u64, writer-lock holder's pid (0 = none recorded)
OFF_LOCK_START = 96  # u64, holder's process start time, ms since the epoch
OFF_LOCK_EPOCH = 104  # u64, bumped by every acquisition and takeover
OFF_LOCK_RECOVERIES = 112  # u64, takeovers from dead holders
OFF_TORN_RECORDS = 120  # u64, sequence numbers reserved by writers that died
OFF_PUBLISHED = 128  # u64, records committed
OFF_RECLAIM_CORRUPT = 136  # u64, times reclaim found an unreadable record
OFF_LOCK_SLOT = 144  # u64, writer-lock holder's instance slot
OFF_LAST_RECORD = 152  # u64, start position of the last committed record
OFF_ORPHAN_EPOCH = 160  # u64, lock epoch + 1 when a slot was reclaimed with its intent set

U64 = struct.Struct("<Q")

# Shared words are written through a ``memoryview.cast("Q")`` of the segment,
# indexed by these word numbers, never with ``struct.pack_into``: CPython's
# pack_into zeroes the target bytes before it writes the value, so another
# process could read a transient 0 from a cursor. A memoryview item store is
# a single aligned 8-byte store.
W_WRITE_CURSOR = OFF_WRITE_CURSOR // 8
W_HEAD = OFF_HEAD // 8
W_NEXT_SEQ = OFF_NEXT_SEQ // 8
W_LOCK_PID = OFF_LOCK_PID // 8
W_LOCK_START = OFF_LOCK_START // 8
W_LOCK_EPOCH = OFF_LOCK_EPOCH // 8
W_LOCK_RECOVERIES = OFF_LOCK_RECOVERIES // 8
W_TORN_RECORDS = OFF_TORN_RECORDS // 8
W_PUBLISHED = OFF_PUBLISHED // 8
W_RECLAIM_CORRUPT = OFF_RECLAIM_CORRUPT // 8
W_LOCK_SLOT = OFF_LOCK_SLOT // 8
W_LAST_RECORD = OFF_LAST_RECORD // 8
W_ORPHAN_EPOCH = OFF_ORPHAN_EPOCH // 8

# ─── Reader slots ────────────────────────────────────────────────────────────

MAX_SLOTS = 256
OFF_SLEEP_FLAGS = 4096  # MAX_SLOTS bytes
OFF_SLOTS = 8192
SLOT_SIZE = 128

# Fields inside a slot (offsets relative to the slot's start).
SLOT_PID = 0  # u64, owner's pid (0 = free)
SLOT_START = 8  # u64, owner's process start time, ms since the epoch
SLOT_READ_CURSOR = 16  # u64, where the owner's reader is in the ring
SLOT_DELIVERED = 24  # u64
SLOT_DROPPED = 32  # u64
SLOT_CORRUPT = 40  # u64
SLOT_LAPPED = 48  # u64
SLOT_PUBLISHED = 56  # u64, events this instance published
SLOT_SUBSCRIPTIONS = 64  # u64, open subscriptions (0 = not reading)
SLOT_LOCK_INTENT = 72  # u64, 1 from before acquiring the writer lock to after releasing it
SLOT_COMMAND = 80  # 48 bytes, NUL-padded start of the owner's command line
SLOT_COMMAND_SIZE = 48

HEADER_SIZE = OFF_SLOTS + MAX_SLOTS * SLOT_SIZE
RING_OFFSET = HEADER_SIZE

# ─── Records ─────────────────────────────────────────────────────────────────

RECORD = struct.Struct("<IHHQII")  # length, kind, topic_len, seq, body_len, checksum
RECORD_HEADER_SIZE = RECORD.size  # 24
RECORD_ALIGN = 8
RECORD_EVENT = 1
RECORD_PADDING = 2

# ─── File-lock bytes ─────────────────────────────────────────────────────────

LOCK_ATTACH = 0
LOCK_TAKEOVER = 1
LOCK_SLOT_BASE = 1024

# ─── Sizes ───────────────────────────────────────────────────────────────────

DEFAULT_CAPACITY = 16 * 1024 * 1024
DEFAULT_MAX_EVENT_SIZE = 1_048_576
MIN_MAX_EVENT_SIZE = 256
#: Record lengths are u32: the largest event must leave room for its header.
MAX_MAX_EVENT_SIZE = 1 << 31
MAX_TOPIC_BYTES = 1024  # must equal contract.MAX_TOPIC_LENGTH (a test checks)
MAX_CAPACITY = 1 << 40


def aligned(size: int) -> int:
    """Round *size* up to the record alignment."""
    return (size + RECORD_ALIGN - 1) & ~(RECORD_ALIGN - 1)


def max_record_size(max_event_size: int) -> int:
    """Largest record an event of at most *max_event_size* bytes can need."""
    return aligned(RECORD_HEADER_SIZE + MAX_TOPIC_BYTES + max_event_size)


def min_capacity(max_event_size: int) -> int:
    """Smallest ring that holds two of the largest records.

    Two, so that a record never has to reclaim the space of the record just
    before it while a reader may still be copying that one out.
    """
    return 2 * max_record_size(max_event_size) + RECORD_ALIGN


def segment_size(capacity: int) -> int:
    """Bytes of a segment whose ring holds *capacity* bytes."""
    return RING_OFFSET + capacity


def seq_mix(seq: int) -> int:
    """Spread *seq* over 32 bits so a checksum binds the record to its sequence."""
    return ((seq * 0x9E3779B1) ^ (seq >> 32)) & 0xFFFFFFFF


def slot_offset(slot: int) -> int:
    """Offset of slot number *slot* in the segment."""
    return OFF_SLOTS + slot * SLOT_SIZE


def slot_word(slot: int, field: int) -> int:
    """Word number of 8-byte *field* (a ``SLOT_*`` offset) of slot *slot*."""
    return (OFF_SLOTS + slot * SLOT_SIZE + field) // 8
