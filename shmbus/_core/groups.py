"""Queue groups: how the publishers of a bus share each matching event among
the members of a group, so that exactly one member handles it.

A *queue group* is every subscription on the bus, in any process, made with
the same pattern and the same queue name (``bus.subscribe(pattern,
queue=NAME)``). Each event whose topic matches is handled by one member;
plain subscriptions still get every event.

Theory of operation
-------------------
Python has no compare-and-swap on shared memory, and a lock that a stopped
member could hold would stall the others. So members never race for events:
**the publisher decides.** It is already the single writer of its ring; it
writes, in the event's record, which member of each matching group the event
is for (an *assignment*), and a member's reader delivers a group event only
if it is named there. Two members can never both be named, whatever
happens, because a record names one member entry and *generation* per group
and a generation is owned by one subscription for its life.

To choose, publishers read a *member table* in the bus segment: one entry per
member subscription, written by its member, saying which group it belongs to
and how much it can still take (its *credit*). Members publish how many
events their consumer took; publishers count what they assigned. An idle
member has credit, a full, slow or stopped one has none, so work goes to
whoever is ready.

Who writes what (offsets in :mod:`shmbus._core.layout`):

==========================  =================================================
member entry ``m``          the holder of lock byte ``LOCK_MEMBER_BASE + m``:
                            the member's instance while it is a member, or a
                            joiner, or a settler once the member is gone
claim word ``e``            the writer of ring directory entry ``e``
assigned word ``(m, e)``    the writer of ring entry ``e`` while member ``m``
                            is LIVE; the joiner of ``m`` while it is JOINING
                            (it zeroes them)
a ring's ORDINALS word m    that ring's writer
group flag of slot ``s``    set by anyone who changes the member table or
                            installs a ring; cleared by slot ``s``'s publisher
==========================  =================================================

A member entry's ``control`` word is ``(generation << 8) | state``, one
store, so a reader never sees a state of one generation with the number of
another::

    FREE ─join─▶ JOINING ─▶ LIVE ─close, or dies─▶ LEAVING ─settle─▶ SETTLED
     ▲             │  (dies: lock free = FREE)                          │
     └─────────────┴───────────── join (the entry is reused) ◀──────────┘

(``R``, ``A``, ``F``: release, acquire and full fences, see
:mod:`shmbus._core.ordering`.)

Join rules (a subscription with ``queue=``, in its instance):

J1. The subscription is added to its instance's reader *first*: the reader
    then follows every ring from a point before any event can be assigned to
    the new member (rings installed later are followed from their start).
J2. Take the lock byte of an entry (never waiting): first a SETTLED entry of
    the same group (its history stays with the group), then a FREE one, then
    any other. An entry that is LIVE or LEAVING with its lock byte free
    belonged to a member that died: settle it first (S rules); if it cannot
    be settled yet, try another entry. JOINING or garbage with a free lock
    byte is a joiner that died: the entry is free.
J3. Store control ``(g + 1, JOINING)``; write the fields (slot, pid, window =
    the subscription's queue size, delivered = dropped = 0, the group's
    history, key, queue name, pattern); zero the member's assigned words
    (no publisher writes them now: see P3); ``R``; store control ``(g + 1,
    LIVE)``; set every group flag.

Publisher rules (the writer of ring entry ``e``, under its instance's thread
lock, for an event whose topic matches some group):

P1. If its group flag is set (or it has never read the table): clear the
    flag, ``F``, read the table (whoever changes the table stores its words,
    ``R``, then sets every flag). An entry is read as control, ``A``, fields
    and strings, ``A``, control again; a moving entry sets the flag again
    for another read; an entry in a state no member writes, or whose strings
    do not make a valid pattern and queue name, or whose key does not match
    them, is skipped and counted corrupt. Also re-count the ring entries in
    use (assigned words of higher entries are not summed).
P2. For each matching group choose a member: of the next two members in
    round-robin order, the one with more credit, where
    ``credit = window + delivered + dropped - sum of its assigned words``.
    If neither has any (every member is full), *over-commit*: choose the
    member whose consumer was last seen to move (its ``delivered`` changed,
    as this publisher's over-commits see it), and among those the one it
    over-committed least since. The event then waits in, or evicts from, a
    full queue, counted there: nothing is lost silently. A stopped or dead
    member shares the over-commits only until another member's consumer is
    seen to move.
P3. **Claim**: store claim ``e = (m, g)``, ``F``, load m's control. If it is
    not ``(g, LIVE)`` the member left: store claim 0, drop it from the
    choice (and read the table again at the next publish). Otherwise add 1
    to assigned ``(m, e)``, ``R``, store claim 0. With S1-S2 this is a
    Dekker pair: a settler either sees the claim and leaves settling for
    later, or the claim sees LEAVING and does not assign.
P4. Write the record as a group record naming ``(m, g, ordinal)`` per group,
    where ordinals count this ring's assignments to generation ``g`` of m,
    from 1, in the publisher's memory across table reads (a read that
    missed m must not start it at 1 again); commit it (ring rules).
P5. After the commit, ``R``, store the ring's ORDINALS word m = ``(g,
    ordinal)``. If the append was interrupted before its commit (a signal
    handler raised), the ordinals are taken back (the assigned word keeps
    its count: see *Counting*).

Member rules (the member's reader, on its loop):

M1. A group record is delivered to a member iff its assignments name the
    member's entry and generation, its checksum holds, and its ordinal is
    above the last one seen from that ring (anything else is not this
    member's). An ordinal that jumps counts the ordinals skipped as dropped
    (lapped or corrupt records that were this member's), and so does a
    record named for it that does not decode. Ring-level losses (sequence
    gaps, records whose checksum fails) are not counted on a member: they
    cannot be attributed, its ordinals count them.
M2. After each event its consumer takes, store ``delivered`` and
    ``dropped`` (evicted + lost): its credit moves with its consumer, so a
    stopped or blocked member stops taking work once ``window`` events wait
    for it.
M3. Tail losses (assigned records lapped with none after them): on its
    heartbeat, for each ring, load ORDINALS m; ``A``; if the reader has read
    that ring up to its ``write_cursor``, every ordinal up to that word was
    committed before it (P5) and so passed: those not seen are dropped.
M4. Leave (the subscription closes, or its bus): store the final
    ``delivered``, then settle the entry itself (S rules; if a claim is in
    the way, store LEAVING and leave it to the next settler); release the
    lock byte.
M5. On its heartbeat a member checks that its entry still says what it
    wrote (control, fields, strings); if not (hostile bytes), it writes the
    fields again, ``R``, control ``(g, LIVE)``, and sets every group flag.
    Publishers skip a damaged entry meanwhile (P1), so its share of the
    work goes to the other members.

Settle rules (the holder of m's lock byte: the member leaving, a joiner, or
anyone sweeping: readers every 2 s, instances on connect and close):

S1. Store control ``(g, LEAVING)``, ``F``.
S2. If a claim word names ``(m, g)`` and its ring's writer lives (holds its
    lock byte, or is this instance), a publisher is assigning to m: give up,
    someone settles later.
S3. Otherwise ``A``; ``assigned`` = the sum of m's assigned words, final
    now; store ``dropped = assigned - delivered``: every event assigned to
    the member and not taken by its consumer is dropped on the group
    (queued, in a ring, or assigned after it died); ``R``; store control
    ``(g, SETTLED)``; set every group flag. Settling is idempotent (it
    recomputes from words that no longer move), so a settler that dies
    midway leaves it for the next.

Counting
--------
For every group, at rest: the events its publishers committed while it had
members = the sum over its members, past and present, of ``delivered +
dropped``. Counts a member makes while alive (M1, M3, evictions) are folded
into its final ``dropped`` by S3, never counted twice. Reports (``shmbus
stat``, :func:`group_statistics`) count a dead, unsettled member's
``assigned - delivered`` as dropped already. One over-count is possible: a
publisher killed (or interrupted) between P3 and its commit assigned an
event that was never published; it is counted as dropped.

A reused entry keeps the group's history (``past_delivered``,
``past_dropped``) if the joiner belongs to the same group; a joiner of
another group takes the entry only if no FREE one is left, and then that
history leaves the table (logged).

Crash and stall cases
---------------------
* A member killed anywhere: its lock byte is free. Publishers keep
  assigning to it until its credit is used up (its words stop moving), then
  choose others; the next sweep settles it and counts what it never
  delivered.
* A member stopped (SIGSTOP) or its loop blocked: its credit runs out after
  ``window`` events; the others take the rest. Nobody waits for it; on
  resume it delivers what waits for it.
* A member killed mid-join: JOINING with a free lock byte; publishers never
  saw it LIVE, so nothing was assigned to it; the next joiner reuses it.
* A publisher killed or stopped: it holds a claim for at most the few
  instructions of P3. Stopped there, the member it claims cannot be settled
  until it resumes or dies (its entry stays LEAVING); nothing else waits.
  Killed there, its claim is ignored (its lock byte is free).
* A publisher stopped with an old table: P3 re-reads the member's control
  word, so it never assigns to a generation that left or to an entry reused
  by another member.
* pid reuse: liveness is the kernel's lock byte, never a pid.
* Hostile bytes: entries are validated before use (P1) and repaired by
  their member (M5); a record's assignments are only acted on when its
  checksum holds, and only for the reader's own entry and generation (M1);
  counts are clamped at zero. An entry that looks LIVE but whose lock byte
  is free is settled like a dead member's, its assignments counted as
  dropped. Damage costs at most the events assigned to the damaged entry
  (counted there), never a crash or a wait.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import struct
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from ..contract import Event, TopicMatcher, validate_pattern, validate_queue_name
from ..delivery import QueueSubscription, SubscriptionStatistics
from ..errors import NoFreeSlotError
from ..stats import GroupStatistics, MemberStatistics
from . import ofd
from .layout import (
    ASSIGNMENT,
    ENTRY_FREE,
    ENTRY_STATE,
    GROUP_HEADER,
    LOCK_MEMBER_BASE,
    LOCK_RING_BASE,
    MAX_MEMBERS,
    MAX_QUEUE_BYTES,
    MAX_RINGS,
    MAX_SLOTS,
    MAX_TOPIC_BYTES,
    MEMBER_CONTROL,
    MEMBER_DELIVERED,
    MEMBER_DROPPED,
    MEMBER_FREE,
    MEMBER_GEN_MASK,
    MEMBER_JOINING,
    MEMBER_KEY,
    MEMBER_LEAVING,
    MEMBER_LIVE,
    MEMBER_PAST_DELIVERED,
    MEMBER_PAST_DROPPED,
    MEMBER_PATTERN,
    MEMBER_PATTERN_LEN,
    MEMBER_PID,
    MEMBER_QUEUE,
    MEMBER_QUEUE_LEN,
    MEMBER_SETTLED,
    MEMBER_SLOT,
    MEMBER_START,
    MEMBER_WINDOW,
    OFF_GROUP_FLAGS,
    ORDINAL_BITS,
    ORDINAL_MASK,
    W_ORDINALS,
    assigned_word,
    claim_word,
    entry_word,
    member_offset,
    member_word,
)
from .ordering import acquire_fence, full_fence, release_fence
from .procs import self_identity
from .segment import Segment

__all__ = [
    "Assigner",
    "MemberEntry",
    "MemberRouting",
    "MemberSubscription",
    "Membership",
    "group_key",
    "group_statistics",
    "join",
    "leave",
    "read_member",
    "settle_dead",
    "signal_change",
]

log = logging.getLogger("shmbus._core.groups")

_ALL_FLAGS = b"\x01" * MAX_SLOTS
_U64 = (1 << 64) - 1
_TOPIC_CACHE_LIMIT = 4096
#: (entry, generation) of a ring, as the reader keys the rings it follows.
RingKey = tuple[int, int]


def group_key(queue: str, pattern: str) -> int:
    """The 64-bit key of group (*queue*, *pattern*): checks an entry's strings."""
    digest = hashlib.blake2b(
        queue.encode("utf-8") + b"\0" + pattern.encode("utf-8"), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little")


def _control(gen: int, state: int) -> int:
    return (gen << 8) | state


def _claim(member: int, gen: int) -> int:
    return ((member + 1) << 32) | gen


def signal_change(segment: Segment) -> None:
    """Set every slot's group flag (J3, S3, M5): publishers read the table
    again. ``R`` first: the table's new words before the flags."""
    release_fence()
    end = OFF_GROUP_FLAGS + MAX_SLOTS
    segment.mm[OFF_GROUP_FLAGS:end] = _ALL_FLAGS


# ─── Reading the member table ────────────────────────────────────────────────


class MemberEntry(NamedTuple):
    """A member entry as :func:`read_member` found it (validated)."""

    member: int
    gen: int
    state: int
    slot: int
    pid: int
    window: int
    delivered: int
    dropped: int
    past_delivered: int
    past_dropped: int
    key: int
    queue: str
    pattern: str


class _Corrupt(Exception):
    """A member entry holds bytes no member writes."""


def read_member(mm: mmap.mmap, words: memoryview, index: int) -> MemberEntry | None:
    """Member entry *index* (P1's reading), or None if it is free, joining,
    or changed while it was read. Raises :class:`_Corrupt` (with what is
    wrong) for bytes no member writes."""
    control = int(words[member_word(index, MEMBER_CONTROL)])
    state = control & 0xFF
    if state in (MEMBER_FREE, MEMBER_JOINING):
        return None
    if state not in (MEMBER_LIVE, MEMBER_LEAVING, MEMBER_SETTLED):
        raise _Corrupt(f"state {state}")
    acquire_fence()
    fields = [int(words[member_word(index, offset)]) for offset in _FIELDS]
    queue_len, pattern_len = fields[-2:]
    base = member_offset(index)
    queue_raw = b""
    pattern_raw = b""
    if 0 < queue_len <= MAX_QUEUE_BYTES and 0 < pattern_len <= MAX_TOPIC_BYTES:
        queue_raw = mm[base + MEMBER_QUEUE : base + MEMBER_QUEUE + queue_len]
        pattern_raw = mm[base + MEMBER_PATTERN : base + MEMBER_PATTERN + pattern_len]
    acquire_fence()
    if int(words[member_word(index, MEMBER_CONTROL)]) != control:
        return None
    if not queue_raw:
        raise _Corrupt(f"queue name length {queue_len}, pattern length {pattern_len}")
    try:
        queue = validate_queue_name(queue_raw.decode("utf-8"))
        pattern = validate_pattern(pattern_raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Corrupt(str(exc)) from None
    slot, pid, window, delivered, dropped, past_delivered, past_dropped, key = fields[:-2]
    if key != group_key(queue, pattern):
        raise _Corrupt(f"key {key:#x} does not match queue {queue!r}, pattern {pattern!r}")
    return MemberEntry(
        index,
        control >> 8,
        state,
        slot,
        pid,
        window,
        delivered,
        dropped,
        past_delivered,
        past_dropped,
        key,
        queue,
        pattern,
    )


_FIELDS = (
    MEMBER_SLOT,
    MEMBER_PID,
    MEMBER_WINDOW,
    MEMBER_DELIVERED,
    MEMBER_DROPPED,
    MEMBER_PAST_DELIVERED,
    MEMBER_PAST_DROPPED,
    MEMBER_KEY,
    MEMBER_QUEUE_LEN,
    MEMBER_PATTERN_LEN,
)


def _assigned_total(words: memoryview, member: int, rows: int = MAX_RINGS) -> int:
    start = assigned_word(member, 0)
    return sum(words[start : start + rows])


# ─── Joining, leaving, settling ──────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class Membership:
    """One member subscription's entry: index and generation, and what its
    member wrote there (to repair it, M5)."""

    index: int
    gen: int
    queue: str
    pattern: str
    slot: int
    pid: int
    start: int
    window: int
    past_delivered: int
    past_dropped: int


def join(
    segment: Segment,
    queue: str,
    pattern: str,
    window: int,
    held: Collection[int] = (),
    own_ring: int = -1,
) -> Membership:
    """Make a member entry for a new subscription of group (*queue*,
    *pattern*) that can hold *window* events (J2-J3). *held*: entries this
    instance already holds (its descriptor's locks would not conflict);
    *own_ring*: the entry of its ring, if it publishes (S2).

    Raises :class:`~shmbus.errors.NoFreeSlotError` if every entry is taken.
    """
    key = group_key(queue, pattern)
    for index in _join_order(segment, key, held):
        if not ofd.try_lock(segment.fd, LOCK_MEMBER_BASE + index, exclusive=True):
            continue
        try:
            membership = _take(segment, index, queue, pattern, key, window, own_ring)
        except BaseException:
            ofd.unlock(segment.fd, LOCK_MEMBER_BASE + index)
            raise
        if membership is not None:
            return membership
        ofd.unlock(segment.fd, LOCK_MEMBER_BASE + index)
    raise NoFreeSlotError(
        f"bus {segment.name!r} has all {MAX_MEMBERS} queue-group member entries in use "
        f"(joining queue {queue!r} on {pattern!r})"
    )


def _join_order(segment: Segment, key: int, held: Collection[int]) -> list[int]:
    """Entries to try, best first (J2)."""
    words = segment.words
    same, free, other = [], [], []
    for index in range(MAX_MEMBERS):
        if index in held:
            continue
        state = int(words[member_word(index, MEMBER_CONTROL)]) & 0xFF
        if state == MEMBER_SETTLED and words[member_word(index, MEMBER_KEY)] == key:
            same.append(index)
        elif state in (MEMBER_FREE, MEMBER_JOINING):
            free.append(index)
        else:
            other.append(index)
    return same + free + other


def _take(
    segment: Segment, index: int, queue: str, pattern: str, key: int, window: int, own_ring: int
) -> Membership | None:
    """With *index*'s lock byte held: make it this subscription's entry, or
    None if a departed member there cannot be settled yet."""
    words = segment.words
    control_word = member_word(index, MEMBER_CONTROL)
    state = int(words[control_word]) & 0xFF
    if state in (MEMBER_LIVE, MEMBER_LEAVING) and not _settle_owned(segment, index, own_ring):
        return None
    control = int(words[control_word])
    gen, state = control >> 8, control & 0xFF
    past_delivered = past_dropped = 0
    if state == MEMBER_SETTLED:
        try:
            found = read_member(segment.mm, words, index)
        except _Corrupt:
            found = None
        if found is not None and (found.key, found.queue, found.pattern) == (key, queue, pattern):
            past_delivered = (found.past_delivered + found.delivered) & _U64
            past_dropped = (found.past_dropped + found.dropped) & _U64
        elif found is not None:
            log.info(
                "bus %r: member entry %d reused; the history of group %r on %r "
                "(%d delivered, %d dropped) leaves the table",
                segment.name,
                index,
                found.queue,
                found.pattern,
                found.past_delivered + found.delivered,
                found.past_dropped + found.dropped,
            )
    gen = ((gen & MEMBER_GEN_MASK) + 1) & MEMBER_GEN_MASK
    words[control_word] = _control(gen, MEMBER_JOINING)  # J3
    pid, start = self_identity()
    membership = Membership(
        index, gen, queue, pattern, segment.slot, pid, start, window, past_delivered, past_dropped
    )
    _write_fields(segment, membership, 0, 0)
    first = assigned_word(index, 0)
    for word in range(first, first + MAX_RINGS):
        words[word] = 0
    release_fence()
    words[control_word] = _control(gen, MEMBER_LIVE)
    signal_change(segment)
    return membership


def _write_fields(segment: Segment, membership: Membership, delivered: int, dropped: int) -> None:
    """Every field of *membership*'s entry but its control word (J3, M5)."""
    words = segment.words
    index = membership.index
    queue_raw = membership.queue.encode("utf-8")
    pattern_raw = membership.pattern.encode("utf-8")
    for field, value in (
        (MEMBER_SLOT, membership.slot),
        (MEMBER_PID, membership.pid),
        (MEMBER_START, membership.start),
        (MEMBER_WINDOW, membership.window),
        (MEMBER_DELIVERED, delivered),
        (MEMBER_DROPPED, dropped),
        (MEMBER_PAST_DELIVERED, membership.past_delivered),
        (MEMBER_PAST_DROPPED, membership.past_dropped),
        (MEMBER_KEY, group_key(membership.queue, membership.pattern)),
        (MEMBER_QUEUE_LEN, len(queue_raw)),
        (MEMBER_PATTERN_LEN, len(pattern_raw)),
    ):
        words[member_word(index, field)] = value
    base = member_offset(index)
    segment.mm[base + MEMBER_QUEUE : base + MEMBER_QUEUE + len(queue_raw)] = queue_raw
    segment.mm[base + MEMBER_PATTERN : base + MEMBER_PATTERN + len(pattern_raw)] = pattern_raw


def _entry_intact(segment: Segment, membership: Membership) -> bool:
    """True if *membership*'s entry still says what its member wrote (M5)."""
    try:
        found = read_member(segment.mm, segment.words, membership.index)
    except _Corrupt:
        return False
    if found is None:
        return False
    written = (
        membership.gen,
        MEMBER_LIVE,
        membership.slot,
        membership.pid,
        membership.window,
        membership.past_delivered,
        membership.past_dropped,
        membership.queue,
        membership.pattern,
    )
    return (
        found.gen,
        found.state,
        found.slot,
        found.pid,
        found.window,
        found.past_delivered,
        found.past_dropped,
        found.queue,
        found.pattern,
    ) == written


def leave(segment: Segment, membership: Membership, delivered: int, own_ring: int) -> bool:
    """The member's subscription closes (M4): publish its final count, settle
    its entry if no publisher is assigning to it, let go of the entry.
    Returns True if it was settled now. Never waits."""
    index = membership.index
    try:
        words = segment.words
        if int(words[member_word(index, MEMBER_CONTROL)]) >> 8 != membership.gen:
            return False  # not ours any more (damaged): leave it to the sweeps
        words[member_word(index, MEMBER_DELIVERED)] = delivered
        settled = _settle_owned(segment, index, own_ring)
        signal_change(segment)
        return settled
    finally:
        ofd.unlock(segment.fd, LOCK_MEMBER_BASE + index)


def settle_dead(segment: Segment, held: Collection[int] = (), own_ring: int = -1) -> int:
    """Settle every member whose instance is gone (S rules); return how many.
    *held*: this instance's own entries; *own_ring*: its ring's entry (its
    claims count as a live writer's). Non-blocking: an entry someone holds is
    skipped."""
    words = segment.words
    settled = 0
    for index in range(MAX_MEMBERS):
        if index in held:
            continue
        state = int(words[member_word(index, MEMBER_CONTROL)]) & 0xFF
        if state not in (MEMBER_LIVE, MEMBER_LEAVING):
            continue
        if not ofd.try_lock(segment.fd, LOCK_MEMBER_BASE + index, exclusive=True):
            continue  # its member lives (or someone else settles it)
        try:
            if _settle_owned(segment, index, own_ring):
                settled += 1
        finally:
            ofd.unlock(segment.fd, LOCK_MEMBER_BASE + index)
    return settled


def _settle_owned(segment: Segment, index: int, own_ring: int) -> bool:
    """With *index*'s lock byte held: S1-S3. True if the entry is settled."""
    words = segment.words
    control_word = member_word(index, MEMBER_CONTROL)
    control = int(words[control_word])
    gen, state = control >> 8, control & 0xFF
    if state == MEMBER_SETTLED:
        return True
    if state not in (MEMBER_LIVE, MEMBER_LEAVING):
        return False
    words[control_word] = _control(gen, MEMBER_LEAVING)  # S1
    full_fence()
    claim = _claim(index, gen)
    for entry in range(MAX_RINGS):  # S2
        if words[claim_word(entry)] == claim and (
            entry == own_ring or ofd.holds_conflicting(segment.fd, LOCK_RING_BASE + entry)
        ):
            return False
    acquire_fence()  # S3: the claims before the counts they guard
    assigned = _assigned_total(words, index)
    delivered = int(words[member_word(index, MEMBER_DELIVERED)])
    words[member_word(index, MEMBER_DROPPED)] = max(0, assigned - delivered) & _U64
    release_fence()
    words[control_word] = _control(gen, MEMBER_SETTLED)
    signal_change(segment)
    return True


# ─── Publishers ──────────────────────────────────────────────────────────────


class _Member:
    """A LIVE member as one publisher knows it: the words it reads and
    writes for it (computed once), and what this ring gave it."""

    __slots__ = (
        "index",
        "gen",
        "claim",
        "live",
        "control",
        "cell",
        "window",
        "delivered",
        "dropped",
        "assigned",
        "ordinal",
        "seen",
        "moved_at",
        "over",
    )

    def __init__(self, index: int, gen: int, ring_entry: int) -> None:
        self.index = index
        self.gen = gen
        self.claim = _claim(index, gen)
        self.live = _control(gen, MEMBER_LIVE)
        self.control = member_word(index, MEMBER_CONTROL)
        self.cell = assigned_word(index, ring_entry)
        self.window = member_word(index, MEMBER_WINDOW)
        self.delivered = member_word(index, MEMBER_DELIVERED)
        self.dropped = member_word(index, MEMBER_DROPPED)
        self.assigned = assigned_word(index, 0)
        #: The last ordinal this ring gave this generation (P4).
        self.ordinal = 0
        #: Over-commit bookkeeping (P2): its ``delivered`` when last seen, the
        #: over-commit that saw it change, over-commits to it since.
        self.seen = -1
        self.moved_at = 0
        self.over = 0


class _Group:
    """A group as one publisher's table read found it."""

    __slots__ = ("queue", "pattern", "matcher", "members", "turn")

    def __init__(self, queue: str, pattern: str) -> None:
        self.queue = queue
        self.pattern = pattern
        self.matcher = TopicMatcher(pattern)
        self.members: list[_Member] = []
        self.turn = 0


#: The assignments block of a record for one group.
_ONE_ASSIGNMENT = struct.Struct("<IIIIQ")


class Assigner:
    """The publisher side (P rules) for the writer of one ring.

    Parameters
    ----------
    segment:
        The publishing instance's attachment.
    ring_entry, ring_words:
        Its ring's directory entry and the ring file's words (ORDINALS).
    """

    def __init__(self, segment: Segment, ring_entry: int, ring_words: memoryview) -> None:
        self._segment = segment
        self._mm = segment.mm
        self._words = segment.words
        self._entry = ring_entry
        self._ring_words = ring_words
        self._claim = claim_word(ring_entry)
        self._flag = OFF_GROUP_FLAGS + segment.slot
        self._groups: dict[tuple[str, str], _Group] = {}
        self._members: dict[tuple[int, int], _Member] = {}
        #: member entry -> (generation, last ordinal this ring gave it): kept
        #: across table reads, so a member one read missed (moving, damaged)
        #: goes on from its ordinal, never back to 1 (its reader would take
        #: those records for old ones).
        self._ordinals: dict[int, tuple[int, int]] = {}
        self._by_topic: dict[bytes, tuple[_Group, ...]] = {}
        self._rows = MAX_RINGS
        self._stale = True
        self._pending: list[_Member] = []
        self._ticks = 0
        self._warned: set[tuple[int, int]] = set()
        #: Member entries skipped because their bytes make no sense.
        self.corrupt = 0
        #: Events assigned while every member of their group was full (P2).
        self.overcommitted = 0
        # A claim a dead writer of this entry left is ours to clear.
        self._words[self._claim] = 0

    def assign(self, raw_topic: bytes) -> bytes:
        """Choose a member of every group whose pattern matches (P1-P3);
        return the assignments block for the record (b"" if no group
        matches). Call :meth:`finish` once the append is done."""
        if self._stale or self._mm[self._flag]:
            self._read_table()
        if not self._groups:
            return b""
        groups = self._by_topic.get(raw_topic)
        if groups is None:
            groups = self._match(raw_topic)
        if not groups:
            return b""
        pending = self._pending
        pending.clear()
        for group in groups:
            member = self._claim_one(group)
            if member is not None:
                member.ordinal += 1
                pending.append(member)
        if not pending:
            return b""
        if len(pending) == 1:
            member = pending[0]
            return _ONE_ASSIGNMENT.pack(1, 0, member.index, member.gen, member.ordinal)
        return GROUP_HEADER.pack(len(pending), 0) + b"".join(
            ASSIGNMENT.pack(member.index, member.gen, member.ordinal) for member in pending
        )

    def release(self) -> None:
        """The writer closes: a claim an interrupted P3 left goes."""
        self._words[self._claim] = 0

    def finish(self, committed: bool) -> None:
        """After the append of the block :meth:`assign` returned: P5."""
        pending = self._pending
        if committed:
            release_fence()
            ring_words = self._ring_words
            for member in pending:
                word = (member.gen << ORDINAL_BITS) | member.ordinal
                ring_words[W_ORDINALS + member.index] = word
        else:
            for member in pending:
                member.ordinal -= 1
        pending.clear()

    # ─── P2, P3 ───

    def _claim_one(self, group: _Group) -> _Member | None:
        words = self._words
        claim = self._claim
        members = group.members
        while members:
            member = self._choose(group)
            words[claim] = member.claim  # P3
            full_fence()
            if words[member.control] != member.live:
                words[claim] = 0
                members.remove(member)
                self._stale = True  # it left: read the table at the next publish
                continue
            cell = member.cell
            words[cell] = (words[cell] + 1) & _U64
            release_fence()
            words[claim] = 0
            return member
        return None

    def _choose(self, group: _Group) -> _Member:
        members = group.members
        count = len(members)
        if count == 1:
            return members[0]
        turn = group.turn % count
        group.turn = turn + 1
        first, second = members[turn], members[(turn + 1) % count]
        first_credit, second_credit = self._credit(first), self._credit(second)
        if first_credit >= second_credit:
            best, credit = first, first_credit
        else:
            best, credit = second, second_credit
        if credit > 0:
            return best
        return self._over_commit(members)

    def _over_commit(self, members: list[_Member]) -> _Member:
        """P2 when every member is full: the member whose consumer moved last,
        and of those the one over-committed least since."""
        words = self._words
        tick = self._ticks = self._ticks + 1
        best = members[0]
        best_key: tuple[int, int] | None = None
        for member in members:
            delivered = int(words[member.delivered])
            if delivered != member.seen:
                member.seen, member.moved_at, member.over = delivered, tick, 0
            key = (member.moved_at, -member.over)
            if best_key is None or key > best_key:
                best, best_key = member, key
        best.over += 1
        self.overcommitted += 1
        return best

    def _credit(self, member: _Member) -> int:
        words = self._words
        start = member.assigned
        return (
            int(words[member.window])
            + int(words[member.delivered])
            + int(words[member.dropped])
            - sum(words[start : start + self._rows])
        )

    # ─── P1 ───

    def _read_table(self) -> None:
        mm = self._mm
        words = self._words
        mm[self._flag] = 0
        full_fence()
        self._stale = False
        rows = self._entry + 1
        for entry in range(MAX_RINGS - 1, self._entry, -1):
            if words[entry_word(entry, ENTRY_STATE)] != ENTRY_FREE:
                rows = entry + 1
                break
        self._rows = rows
        previous_groups, previous_members = self._groups, self._members
        ordinals = self._ordinals
        for old_member in previous_members.values():
            ordinals[old_member.index] = (old_member.gen, old_member.ordinal)
        groups: dict[tuple[str, str], _Group] = {}
        members: dict[tuple[int, int], _Member] = {}
        for index in range(MAX_MEMBERS):
            state = int(words[member_word(index, MEMBER_CONTROL)]) & 0xFF
            if state != MEMBER_LIVE:
                if state > MEMBER_SETTLED:
                    self.corrupt += 1
                    self._warn(index, int(words[member_word(index, MEMBER_CONTROL)]), "state")
                continue
            try:
                found = read_member(mm, words, index)
            except _Corrupt as exc:
                self.corrupt += 1
                self._warn(index, int(words[member_word(index, MEMBER_CONTROL)]), str(exc))
                continue
            if found is None:
                mm[self._flag] = 1  # it moved while read: read it again next time
                continue
            if found.state != MEMBER_LIVE:
                continue
            name = (found.queue, found.pattern)
            group = groups.get(name)
            if group is None:
                group = groups[name] = _Group(*name)
                old = previous_groups.get(name)
                if old is not None:
                    group.turn = old.turn
            key = (index, found.gen)
            member = previous_members.get(key)
            if member is None:
                member = _Member(index, found.gen, self._entry)
                gen, ordinal = ordinals.get(index, (-1, 0))
                member.ordinal = ordinal if gen == found.gen else 0
            members[key] = member
            group.members.append(member)
        self._groups = groups
        self._members = members
        self._by_topic.clear()

    def _warn(self, index: int, control: int, problem: str) -> None:
        if (index, control) not in self._warned:
            self._warned.add((index, control))
            log.warning(
                "bus %r: queue-group member entry %d is damaged (%s); not assigning to it",
                self._segment.name,
                index,
                problem,
            )

    def _match(self, raw_topic: bytes) -> tuple[_Group, ...]:
        try:
            topic = raw_topic.decode("utf-8")
        except UnicodeDecodeError:
            return ()
        groups = tuple(group for group in self._groups.values() if group.matcher(topic))
        if len(self._by_topic) >= _TOPIC_CACHE_LIMIT:
            self._by_topic.clear()
        self._by_topic[raw_topic] = groups
        return groups


# ─── Members ─────────────────────────────────────────────────────────────────


class MemberSubscription(QueueSubscription):
    """A subscription that is a member of a queue group (M rules).

    Its queue bound is its *window*: publishers stop choosing it once that
    many assigned events wait for its consumer.
    """

    def __init__(
        self,
        pattern: str,
        queue: str,
        *,
        maxsize: int,
        on_close: Callable[[QueueSubscription], None] | None = None,
    ) -> None:
        super().__init__(pattern, maxsize=maxsize, on_close=on_close, queue=queue)
        #: The group's queue name (never None for a member).
        self.group_queue = queue
        self.membership: Membership | None = None
        self._segment: Segment | None = None
        self._words: memoryview | None = None
        #: Times its entry was found damaged and written again (M5).
        self.repaired = 0
        self._delivered_word = 0
        self._dropped_word = 0
        self._last: dict[RingKey, int] = {}
        self._group_statistics: Callable[[], GroupStatistics | None] | None = None

    def bind(
        self,
        membership: Membership,
        segment: Segment,
        group_statistics: Callable[[], GroupStatistics | None] | None = None,
    ) -> None:
        """Attach the entry :func:`join` made (before any event can be assigned)."""
        self.membership = membership
        self._segment = segment
        self._words = segment.words
        self._delivered_word = member_word(membership.index, MEMBER_DELIVERED)
        self._dropped_word = member_word(membership.index, MEMBER_DROPPED)
        self._group_statistics = group_statistics

    def unbind(self) -> Membership | None:
        """Stop publishing counts (the entry is left); return the membership."""
        membership, self.membership = self.membership, None
        self._words = None
        self._segment = None
        return membership

    def check_entry(self) -> bool:
        """M5: write the entry again if it does not say what this member
        wrote; True if it had to."""
        membership, segment = self.membership, self._segment
        if membership is None or segment is None or self._words is None:
            return False
        try:
            if _entry_intact(segment, membership):
                return False
            log.warning(
                "bus %r: the entry of queue-group member %d (queue %r) was damaged; "
                "writing it again",
                segment.name,
                membership.index,
                membership.queue,
            )
            _write_fields(segment, membership, self.delivered, self.dropped)
            release_fence()
            segment.words[member_word(membership.index, MEMBER_CONTROL)] = _control(
                membership.gen, MEMBER_LIVE
            )
            signal_change(segment)
        except (ValueError, TypeError):
            return False  # the bus let go of its mapping
        self.repaired += 1
        return True

    # ─── Counters (M2) ───

    async def __anext__(self) -> Event:
        event = await super().__anext__()
        self._publish()
        return event

    def _publish(self) -> None:
        words = self._words
        if words is None:
            return
        try:
            words[self._delivered_word] = self.delivered
            words[self._dropped_word] = self.dropped
        except (ValueError, TypeError):
            self._words = None  # the bus let go of its mapping

    def count_lost(self, count: int) -> None:
        """Ring-level losses are not attributed to a member (M1)."""

    def count_member_lost(self, count: int) -> None:
        """Count *count* events assigned to this member that it lost."""
        if count > 0 and not self._closed:
            self.lost += count
            self._publish()

    def statistics(self) -> SubscriptionStatistics:
        """This subscription's counters, with its queue name and its group's
        statistics read from the bus (its members' entries and lock bytes:
        about a hundred microseconds, for monitoring, not per event)."""
        base = super().statistics()
        group = self._group_statistics() if self._group_statistics is not None else None
        return SubscriptionStatistics(
            pattern=base.pattern,
            delivered=base.delivered,
            dropped=base.dropped,
            queued=base.queued,
            maxsize=base.maxsize,
            queue=self.queue,
            group=group,
        )

    # ─── Routing (M1, M3) ───

    def accept(self, block: bytes | None, ring: RingKey) -> bool:
        """True if the record whose assignments are *block* (from the ring
        keyed *ring*; its checksum holds) is this member's to deliver (M1)."""
        membership = self.membership
        if block is None or membership is None or len(block) < GROUP_HEADER.size:
            return False
        count, _ = GROUP_HEADER.unpack_from(block, 0)
        count = min(count, (len(block) - GROUP_HEADER.size) // ASSIGNMENT.size)
        index, gen = membership.index, membership.gen
        for offset in range(GROUP_HEADER.size, GROUP_HEADER.size + count * ASSIGNMENT.size, 16):
            member, member_gen, ordinal = ASSIGNMENT.unpack_from(block, offset)
            if member != index or member_gen != gen:
                continue
            last = self._last.get(ring, 0)
            if ordinal <= last:
                return False  # not above the last one: not a new assignment
            if ordinal > last + 1:
                self.count_member_lost(ordinal - last - 1)
            self._last[ring] = ordinal
            return True
        return False

    def reconcile(
        self, ring: RingKey, ring_words: memoryview, caught_up: Callable[[], bool]
    ) -> None:
        """M3 for one followed ring."""
        membership = self.membership
        if membership is None:
            return
        word = int(ring_words[W_ORDINALS + membership.index])
        if word >> ORDINAL_BITS != membership.gen:
            return
        acquire_fence()
        if not caught_up():
            return
        ordinal = word & ORDINAL_MASK
        last = self._last.get(ring, 0)
        if ordinal > last:
            self.count_member_lost(ordinal - last)
            self._last[ring] = ordinal

    def forget(self, ring: RingKey) -> None:
        self._last.pop(ring, None)


#: A subscription as a reader holds it (plain, member, or blocking).
_Sub = TypeVar("_Sub")


class MemberRouting:
    """A reader's member subscriptions: the routing decision of M1 and the
    heartbeat's M3 (the reader calls these; it knows nothing of groups)."""

    def __init__(self) -> None:
        self._members: set[MemberSubscription] = set()

    def __bool__(self) -> bool:
        return bool(self._members)

    def add(self, sub: object) -> None:
        if isinstance(sub, MemberSubscription):
            self._members.add(sub)

    def remove(self, sub: object) -> None:
        if isinstance(sub, MemberSubscription):
            self._members.discard(sub)

    def held(self) -> set[int]:
        """Member entries this reader's subscriptions hold."""
        return {
            sub.membership.index for sub in self._members if sub.membership is not None
        }

    def assigned(
        self,
        targets: tuple[_Sub, ...],
        block: bytes | None,
        ring: RingKey,
    ) -> tuple[_Sub, ...]:
        """*targets* without the members this record is not assigned to."""
        if len(targets) == 1:
            sub = targets[0]
            if not isinstance(sub, MemberSubscription) or sub.accept(block, ring):
                return targets
            return ()
        return tuple(
            sub
            for sub in targets
            if not isinstance(sub, MemberSubscription) or sub.accept(block, ring)
        )

    def undecodable(self, targets: Iterable[object]) -> None:
        """A record assigned to these members does not decode: their loss."""
        for sub in targets:
            if isinstance(sub, MemberSubscription):
                sub.count_member_lost(1)

    def heartbeat(self, rings: Iterable[tuple[RingKey, memoryview, Callable[[], bool]]]) -> None:
        """M3 for every followed ring, and M5 for every member."""
        if not self._members:
            return
        for key, ring_words, caught_up in rings:
            for sub in self._members:
                sub.reconcile(key, ring_words, caught_up)
        for sub in self._members:
            sub.check_entry()

    def forget(self, ring: RingKey) -> None:
        """The reader dropped ring *ring* (drained)."""
        for sub in self._members:
            sub.forget(ring)


# ─── Statistics ──────────────────────────────────────────────────────────────


def group_statistics(
    mm: mmap.mmap,
    words: memoryview,
    fd: int,
    held: Collection[int] = (),
    only: tuple[str, str] | None = None,
) -> list[GroupStatistics]:
    """Every group the member table records, by (queue, pattern), or only
    group *only*. A member is alive while someone holds its lock byte
    (*held*: entries the caller's own descriptor holds, which its lock
    queries cannot see). Damaged entries are left out."""
    totals: dict[tuple[str, str], list[int]] = {}
    members: dict[tuple[str, str], list[MemberStatistics]] = {}
    key = group_key(*only) if only is not None else None
    for index in range(MAX_MEMBERS):
        if key is not None and words[member_word(index, MEMBER_KEY)] != key:
            continue
        try:
            found = read_member(mm, words, index)
        except _Corrupt:
            continue
        if found is None:
            continue
        name = (found.queue, found.pattern)
        if only is not None and name != only:
            continue
        total = totals.setdefault(name, [0, 0])
        listed = members.setdefault(name, [])
        total[0] += found.past_delivered + found.delivered
        total[1] += found.past_dropped
        if found.state == MEMBER_SETTLED:
            total[1] += found.dropped
            continue
        assigned = _assigned_total(words, index)
        alive = index in held or ofd.holds_conflicting(fd, LOCK_MEMBER_BASE + index)
        dropped = found.dropped if alive else max(found.dropped, assigned - found.delivered)
        total[1] += dropped
        listed.append(
            MemberStatistics(
                slot=found.slot,
                pid=found.pid,
                assigned=assigned,
                delivered=found.delivered,
                dropped=dropped,
                alive=alive,
            )
        )
    return [
        GroupStatistics(
            queue=queue,
            pattern=pattern,
            members=tuple(members[(queue, pattern)]),
            delivered=delivered,
            dropped=dropped,
        )
        for (queue, pattern), (delivered, dropped) in sorted(totals.items())
    ]
