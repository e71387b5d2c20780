"""The shared-memory layout: every offset, size and magic number of a bus.

This module is the single place where the bytes of a bus's files are given
meaning; ``docs/DESIGN.md`` draws the same pictures. Change a layout and you
must bump :data:`LAYOUT_VERSION`, because processes of different versions would
otherwise read each other's bytes wrongly.

A bus has one *bus segment* and one *ring file* per publishing instance
(single writer per ring: no cross-process lock on the publish path). All
integers are little-endian; every 8-byte field is 8-byte aligned, so that it
is written by a single store.

Bus segment ``shmbus.NAME``::

    0        IDENTITY (written once, by the creator while it is alone)
    4096     SLEEP FLAGS: one byte per slot, 1 = that slot's reader sleeps
    4352     DIRECTORY FLAGS: one byte per slot, 1 = the directory changed
             since that slot's reader last scanned it
    4608     BELL IDS: one u64 per slot, the id naming the doorbell of that
             slot's blocking reader (0 = none; a blocking reader of a bus
             shared with a group has a wake-up FIFO instead); see below
    5632     GROUP FLAGS: one byte per slot, 1 = the queue-group member table
             (or the ring directory) changed since that slot's publisher
             last read it
    8192     SLOTS: MAX_SLOTS x SLOT_SIZE, one per attached bus instance
    OFF_ENTRIES   RING DIRECTORY: MAX_RINGS x ENTRY_SIZE, one per ring
    OFF_SEEN      SEEN TABLE: MAX_SLOTS x MAX_RINGS words; word (s, e) is the
                  newest generation of entry e that slot s's reader has mapped
    OFF_CLAIMS    CLAIMS: MAX_RINGS words; word e names the queue-group member
                  the writer of ring entry e is assigning an event to (0: none)
    OFF_MEMBERS   MEMBER TABLE: MAX_MEMBERS x MEMBER_SIZE, one per queue-group
                  member subscription (see shmbus._core.groups)
    OFF_ASSIGNED  ASSIGNED TABLE: MAX_MEMBERS x MAX_RINGS words; word (m, e)
                  counts the events the writers of ring entry e assigned to
                  member m's current generation

Layout version 3 added the bell ids, the group flags, the claims, the
member table and the assigned table (and group records in the rings).

Doorbell ``/shmbus.NAME:bell.<bell id, 16 hex digits>``: a named POSIX
semaphore, whose file (``sem.shmbus.NAME:bell.<id>``) the C library lays out:
a ``sem_t`` of ``BELL_SEM_SIZE`` bytes.

Ring file ``shmbus.NAME:ring.<ring id, 16 hex digits>``::

    0        RING IDENTITY (written once, by its writer before registering it)
    64       WRITER STATE (written only by the ring's writer)
    1024     ORDINALS: MAX_MEMBERS words, written only by the ring's writer;
             word m = (member generation << 40) | the ordinal of the last
             event of this ring committed for that generation of member m
    4096     RING: ``capacity`` bytes of records

Record (starts 8-byte aligned inside the ring, never wraps)::

    0  length    u32  whole record incl. header and alignment padding
    4  kind      u16  RECORD_EVENT, RECORD_GROUP or RECORD_PADDING
    6  topic_len u16
    8  seq       u64  the ring's sequence number of the event (0 for padding)
    16 body_len  u32  msgpack envelope length
    20 checksum  u32  crc32(topic + body) xor seq_mix(seq); for RECORD_GROUP
                      crc32(assignments, crc32(topic + body)) xor seq_mix(seq)
    24 topic bytes, then body bytes, then zero padding to 8 bytes

    A RECORD_GROUP record (an event some queue group's member must handle)
    has its assignments between the header and the topic:

    24 count     u32  assignments, 1..MAX_MEMBERS
    28 reserved  u32  0
    32 count x (member u32, member generation u32, ordinal u64), then the
       topic, body and padding as above

File-lock bytes (Linux open-file-description locks on the bus segment's
descriptor; the kernel drops them when their holder dies):

* byte :data:`LOCK_ATTACH` is held shared by every attached instance, and
  exclusively by whoever initialises or removes the bus;
* byte ``LOCK_SLOT_BASE + s`` is held exclusively by the owner of slot ``s``;
* byte ``LOCK_RING_BASE + e`` is held exclusively by the writer of directory
  entry ``e``'s ring for as long as it may write it, and briefly by whoever
  installs or reclaims a ring there;
* byte ``LOCK_MEMBER_BASE + m`` is held exclusively by the instance whose
  queue-group subscription owns member entry ``m`` for as long as it is a
  member, and briefly by whoever settles a departed member there.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

# ─── Identity of the bus segment ─────────────────────────────────────────────

MAGIC = int.from_bytes(b"SHMBUS\x00\x03", "little")
#: Version 3: queue groups (member table, claims, assigned counts, group
#: records). Version 2 had one ring per publishing instance and no groups;
#: version 1 shared one ring under a writer lock.
LAYOUT_VERSION = 3
SEGMENT_READY = 0x52454459  # "READY": written last at initialisation

OFF_MAGIC = 0  # u64
OFF_LAYOUT_VERSION = 8  # u32
OFF_STATE = 12  # u32, SEGMENT_READY once initialised
OFF_CAPACITY = 16  # u64, ring bytes an instance uses unless it asks otherwise
OFF_MAX_EVENT_SIZE = 24  # u64, largest envelope, unless an instance asks otherwise
OFF_CREATOR_PID = 32  # u64
OFF_CREATED_NS = 40  # u64, time.time_ns() at creation
OFF_MODE = 48  # u32, permission bits of the bus's files
OFF_GID = 52  # u32, group of the bus's files (NO_GROUP: the creator's)
OFF_UID = 56  # u32, owner of the bus segment file (checked against fstat)
IDENTITY = struct.Struct("<QIIQQQQIII4x")  # magic .. uid, offsets 0..64
NO_GROUP = 0xFFFFFFFF


class Identity(NamedTuple):
    """The identity words of a bus segment, as :func:`read_identity` finds them."""

    magic: int
    layout_version: int
    state: int
    capacity: int
    max_event_size: int
    creator_pid: int
    created_ns: int
    mode: int
    gid: int
    uid: int


def read_identity(header: bytes | memoryview | object) -> Identity:
    """Decode the identity words at the start of a mapped bus segment."""
    return Identity._make(IDENTITY.unpack_from(header, 0))  # type: ignore[arg-type]


def read_layout_version(header: bytes | memoryview | object) -> tuple[int, int]:
    """(magic, layout version) of a bus segment of any layout version: both
    versions keep them at offsets 0 and 8."""
    magic, version = struct.unpack_from("<QI", header, 0)  # type: ignore[arg-type]
    return int(magic), int(version)


# ─── Flags, slots, directory, seen table ─────────────────────────────────────

MAX_SLOTS = 128
MAX_RINGS = 128

OFF_SLEEP_FLAGS = 4096  # MAX_SLOTS bytes
OFF_DIRECTORY_FLAGS = 4352  # MAX_SLOTS bytes
OFF_BELL_IDS = 4608  # MAX_SLOTS u64, written by each slot's owner only
OFF_GROUP_FLAGS = OFF_BELL_IDS + MAX_SLOTS * 8  # 5632: MAX_SLOTS bytes
OFF_SLOTS = 8192
SLOT_SIZE = 128

# Fields inside a slot (offsets relative to the slot's start); all written by
# the slot's owner only.
SLOT_PID = 0  # u64, owner's pid (0 = free)
SLOT_START = 8  # u64, owner's process start time, ms since the epoch
SLOT_BACKLOG = 16  # u64, bytes committed in followed rings that the reader has not read
SLOT_DELIVERED = 24  # u64
SLOT_DROPPED = 32  # u64
SLOT_CORRUPT = 40  # u64
SLOT_LAPPED = 48  # u64
SLOT_PUBLISHED = 56  # u64, events this instance published
SLOT_SUBSCRIPTIONS = 64  # u64, open subscriptions (0 = not reading)
SLOT_RING = 72  # u64, directory entry + 1 of the instance's own ring (0 = none yet)
SLOT_WAKE_ID = 80  # u64, random id naming the slot's wake-up FIFO (0 = none)
SLOT_COMMAND = 88  # 40 bytes, NUL-padded start of the owner's command line
SLOT_COMMAND_SIZE = 40

OFF_ENTRIES = OFF_SLOTS + MAX_SLOTS * SLOT_SIZE
ENTRY_SIZE = 64

# Fields of a directory entry; written only by the holder of the entry's
# ring lock byte (its writer, or whoever installs or reclaims a ring there).
ENTRY_STATE = 0  # u64, one of the ENTRY_* states below
ENTRY_GEN = 8  # u64, generation: +1 for every ring installed here
ENTRY_RING_ID = 16  # u64, random id naming the ring file
ENTRY_CAPACITY = 24  # u64, ring bytes (also in the ring file's identity)
ENTRY_WRITER_SLOT = 32  # u64, slot of the writing instance
ENTRY_WRITER_PID = 40  # u64
ENTRY_WRITER_START = 48  # u64

ENTRY_FREE = 0  # no ring file
ENTRY_INSTALLING = 1  # a writer is creating its ring file; readers skip it
ENTRY_LIVE = 2  # a writer may append (dead if its ring lock byte is free)
ENTRY_RETIRED = 3  # its writer closed: the ring only drains now
ENTRY_RECLAIMING = 4  # being removed; readers that still need it have mapped it

OFF_SEEN = OFF_ENTRIES + MAX_RINGS * ENTRY_SIZE

# ─── Queue groups (rules in shmbus._core.groups) ─────────────────────────────

#: Queue-group member subscriptions a bus can hold at once (in all processes).
MAX_MEMBERS = 128
#: Longest queue (group) name, in UTF-8 bytes: must equal
#: contract.MAX_QUEUE_NAME_LENGTH (a test checks).
MAX_QUEUE_BYTES = 255

# Claim word of ring entry e: written only by the writer of that entry's ring.
OFF_CLAIMS = OFF_SEEN + MAX_SLOTS * MAX_RINGS * 8

OFF_MEMBERS = OFF_CLAIMS + 4096
MEMBER_SIZE = 1408

# Fields of a member entry; written only by the holder of the entry's member
# lock byte (the member's instance, a joiner, or a settler).
MEMBER_CONTROL = 0  # u64, (generation << 8) | MEMBER_* state: one word, one store
MEMBER_SLOT = 8  # u64, slot of the member's instance
MEMBER_PID = 16  # u64
MEMBER_START = 24  # u64, the member process's start time (ms since the epoch)
MEMBER_WINDOW = 32  # u64, events the member can hold undelivered (its queue size)
MEMBER_DELIVERED = 40  # u64, events its consumer took
MEMBER_DROPPED = 48  # u64, assigned events it lost (live); all it did not deliver (settled)
MEMBER_PAST_DELIVERED = 56  # u64, delivered by earlier members of the same group here
MEMBER_PAST_DROPPED = 64  # u64, dropped by earlier members of the same group here
MEMBER_KEY = 72  # u64, group_key(queue, pattern): checks the two strings
MEMBER_QUEUE_LEN = 80  # u64
MEMBER_PATTERN_LEN = 88  # u64
MEMBER_QUEUE = 128  # MAX_QUEUE_BYTES + 1 bytes
MEMBER_PATTERN = 384  # MAX_TOPIC_BYTES bytes

MEMBER_FREE = 0  # never used, or given up by a joiner that died
MEMBER_JOINING = 1  # being filled in; publishers skip it
MEMBER_LIVE = 2  # takes assignments (dead if its lock byte is free)
MEMBER_LEAVING = 3  # takes no more; waits to be settled
MEMBER_SETTLED = 4  # gone; its final counts stay until the entry is reused
#: Member generations are counted modulo 2**24 (they are packed with an
#: ordinal in a ring's ORDINALS words and stored as u32 in records).
MEMBER_GEN_MASK = (1 << 24) - 1

OFF_ASSIGNED = OFF_MEMBERS + MAX_MEMBERS * MEMBER_SIZE
BUS_SEGMENT_SIZE = OFF_ASSIGNED + MAX_MEMBERS * MAX_RINGS * 8

U64 = struct.Struct("<Q")

# Shared words are written through a ``memoryview.cast("Q")`` of a mapping,
# indexed by word numbers, never with ``struct.pack_into``: CPython's
# pack_into zeroes the target bytes before it writes the value, so another
# process could read a transient 0 from a cursor. A memoryview item store is
# a single aligned 8-byte store.


def slot_offset(slot: int) -> int:
    """Offset of slot number *slot* in the bus segment."""
    return OFF_SLOTS + slot * SLOT_SIZE


def slot_word(slot: int, field: int) -> int:
    """Word number of 8-byte *field* (a ``SLOT_*`` offset) of slot *slot*."""
    return (OFF_SLOTS + slot * SLOT_SIZE + field) // 8


def bell_word(slot: int) -> int:
    """Word number of the bell id of slot *slot*."""
    return OFF_BELL_IDS // 8 + slot


def entry_word(entry: int, field: int) -> int:
    """Word number of 8-byte *field* (an ``ENTRY_*`` offset) of directory entry *entry*."""
    return (OFF_ENTRIES + entry * ENTRY_SIZE + field) // 8


def seen_word(slot: int, entry: int) -> int:
    """Word number of the seen-table cell of reader *slot* and directory *entry*."""
    return OFF_SEEN // 8 + slot * MAX_RINGS + entry


def claim_word(entry: int) -> int:
    """Word number of the claim word of ring directory *entry*."""
    return OFF_CLAIMS // 8 + entry


def member_offset(member: int) -> int:
    """Offset of member entry *member* in the bus segment."""
    return OFF_MEMBERS + member * MEMBER_SIZE


def member_word(member: int, field: int) -> int:
    """Word number of 8-byte *field* (a ``MEMBER_*`` offset) of member entry *member*."""
    return (OFF_MEMBERS + member * MEMBER_SIZE + field) // 8


def assigned_word(member: int, entry: int) -> int:
    """Word number of the assigned count of *member* by ring directory *entry*;
    a member's MAX_RINGS words are consecutive."""
    return OFF_ASSIGNED // 8 + member * MAX_RINGS + entry


# ─── Doorbell files ──────────────────────────────────────────────────────────

#: Bytes of a doorbell's file: ``sizeof(sem_t)`` (glibc and musl, 64-bit).
#: A file of another size is refused (a shorter one would fault when mapped).
BELL_SEM_SIZE = 32

# ─── Ring files ──────────────────────────────────────────────────────────────

RING_MAGIC = int.from_bytes(b"SHMRING\x03", "little")

OFF_RING_MAGIC = 0  # u64
OFF_RING_LAYOUT_VERSION = 8  # u32
OFF_RING_ENTRY = 12  # u32, its directory entry
OFF_RING_ID = 16  # u64, equals the entry's ring id and the file name's
OFF_RING_GEN = 24  # u64, equals the entry's generation when it was installed
OFF_RING_CAPACITY = 32  # u64
OFF_RING_MAX_EVENT_SIZE = 40  # u64, largest body its writer appends
OFF_RING_WRITER_PID = 48  # u64
OFF_RING_WRITER_START = 56  # u64
RING_IDENTITY = struct.Struct("<QIIQQQQQQ")  # offsets 0..64


class RingIdentity(NamedTuple):
    """The identity words of a ring file."""

    magic: int
    layout_version: int
    entry: int
    ring_id: int
    gen: int
    capacity: int
    max_event_size: int
    writer_pid: int
    writer_start: int


def read_ring_identity(header: bytes | memoryview | object) -> RingIdentity:
    """Decode the identity words at the start of a mapped ring file."""
    return RingIdentity._make(RING_IDENTITY.unpack_from(header, 0))  # type: ignore[arg-type]


# Writer state: written only by the ring's writer.
OFF_WRITE_CURSOR = 64  # u64, bytes ever committed: the commit point
OFF_HEAD = 72  # u64, position of the oldest record not yet reclaimed
OFF_NEXT_SEQ = 80  # u64, records committed (= sequence number of the next one)
OFF_LAST_RECORD = 88  # u64, start of the last committed record (NO_RECORD: none yet)
OFF_RECLAIM_CORRUPT = 96  # u64, times reclaim found an unreadable record
OFF_CLOSED = 104  # u64, 1 once the writer has closed (it never appends again)

W_WRITE_CURSOR = OFF_WRITE_CURSOR // 8
W_HEAD = OFF_HEAD // 8
W_NEXT_SEQ = OFF_NEXT_SEQ // 8
W_LAST_RECORD = OFF_LAST_RECORD // 8
W_RECLAIM_CORRUPT = OFF_RECLAIM_CORRUPT // 8
W_CLOSED = OFF_CLOSED // 8

NO_RECORD = 0xFFFFFFFFFFFFFFFF

# Ordinals: written only by the ring's writer (rules in shmbus._core.groups).
OFF_RING_ORDINALS = 1024  # MAX_MEMBERS words
W_ORDINALS = OFF_RING_ORDINALS // 8
#: An ORDINALS word is (generation << ORDINAL_BITS) | ordinal.
ORDINAL_BITS = 40
ORDINAL_MASK = (1 << ORDINAL_BITS) - 1

RING_OFFSET = 4096


def ring_file_size(capacity: int) -> int:
    """Bytes of a ring file whose ring holds *capacity* bytes."""
    return RING_OFFSET + capacity


# ─── Records ─────────────────────────────────────────────────────────────────

RECORD = struct.Struct("<IHHQII")  # length, kind, topic_len, seq, body_len, checksum
RECORD_HEADER_SIZE = RECORD.size  # 24
RECORD_ALIGN = 8
RECORD_EVENT = 1
RECORD_PADDING = 2
RECORD_GROUP = 3  # an event with queue-group assignments after the header
#: Header of a RECORD_GROUP record's assignments: count u32, reserved u32.
GROUP_HEADER = struct.Struct("<II")
#: One assignment: member entry u32, member generation u32, ordinal u64.
ASSIGNMENT = struct.Struct("<IIQ")
#: Most assignments a record carries (one per group; a group has a member).
MAX_ASSIGNMENTS = MAX_MEMBERS
#: Largest assignments block: a record is at most this much longer than its
#: header, topic and body.
MAX_ASSIGNMENT_BYTES = GROUP_HEADER.size + MAX_ASSIGNMENTS * ASSIGNMENT.size

# ─── File-lock bytes ─────────────────────────────────────────────────────────

LOCK_ATTACH = 0
LOCK_SLOT_BASE = 1024
LOCK_RING_BASE = 2048
LOCK_MEMBER_BASE = 3072

# ─── Sizes ───────────────────────────────────────────────────────────────────

#: Ring bytes per publishing instance by default: 16 publishers fit Docker's
#: default 64 MiB /dev/shm with room to spare (see docs/DESIGN.md).
DEFAULT_CAPACITY = 3 * 1024 * 1024
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
    """Largest record an event of at most *max_event_size* bytes can need
    (with assignments for the most groups a record can name)."""
    return aligned(RECORD_HEADER_SIZE + MAX_ASSIGNMENT_BYTES + MAX_TOPIC_BYTES + max_event_size)


def min_capacity(max_event_size: int) -> int:
    """Smallest ring that holds two of the largest records.

    Two, so that a record never has to reclaim the space of the record just
    before it while a reader may still be copying that one out.
    """
    return 2 * max_record_size(max_event_size) + RECORD_ALIGN


def seq_mix(seq: int) -> int:
    """Spread *seq* over 32 bits so a checksum binds the record to its sequence."""
    return ((seq * 0x9E3779B1) ^ (seq >> 32)) & 0xFFFFFFFF
