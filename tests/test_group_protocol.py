"""The queue-group protocol (shmbus._core.groups), single-threaded.

Each "process" is a Segment attached in this process (its own descriptor, so
OFD locks conflict between them as between processes). Publishers are a ring
(RingWriter) plus the Assigner ShmBus uses; members are the MemberSubscription
ShmBus hands out, fed by a RingReader over the publisher's ring. Where the
protocol has a fence, the other side's step is run *inside* it (by patching
the fence), so the test chooses the interleaving the rules are about. Rule
names (P3, S2, M1...) are those of the module's docstring."""

from __future__ import annotations

import contextlib
import random
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmbus._core import directory, groups
from shmbus._core.layout import (
    ASSIGNMENT,
    GROUP_HEADER,
    MAX_MEMBERS,
    MEMBER_CONTROL,
    MEMBER_JOINING,
    MEMBER_KEY,
    MEMBER_LEAVING,
    MEMBER_LIVE,
    MEMBER_PATTERN,
    MEMBER_PATTERN_LEN,
    MEMBER_QUEUE,
    MEMBER_SETTLED,
    MEMBER_SIZE,
    MEMBER_WINDOW,
    RING_OFFSET,
    W_ORDINALS,
    member_offset,
    member_word,
)
from shmbus._core.ring import RingReader, RingWriter, content_checksum
from shmbus._core.segment import Segment, SegmentOptions
from shmbus.errors import NoFreeSlotError

CAPACITY = 1 << 16
MAX_EVENT = 1024
TOPIC = b"jobs.a"


class Publisher:
    """A publishing instance: its ring and its Assigner."""

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self.ring = directory.install_ring(segment, CAPACITY, MAX_EVENT)
        self.writer = RingWriter(self.ring.mm, self.ring.words, RING_OFFSET, CAPACITY, MAX_EVENT)
        self.assigner = groups.Assigner(segment, self.ring.entry, self.ring.words)

    @property
    def key(self) -> tuple[int, int]:
        return (self.ring.entry, self.ring.gen)

    def publish(self, topic: bytes = TOPIC, body: bytes = b"x") -> list[tuple[int, int, int]]:
        """Publish one event; return the (member, generation, ordinal) it names."""
        block = self.assigner.assign(topic)
        checksum = content_checksum(topic, body)
        if block:
            self.writer.append(topic, body, checksum, block)
            self.assigner.finish(True)
        else:
            self.writer.append(topic, body, checksum)
        return named(block)

    def reader(self) -> RingReader[bytes]:
        return RingReader(self.ring.mm, self.ring.words, RING_OFFSET, CAPACITY, MAX_EVENT, 0, 0)


def named(block: bytes) -> list[tuple[int, int, int]]:
    if not block:
        return []
    count = GROUP_HEADER.unpack_from(block, 0)[0]
    return [
        ASSIGNMENT.unpack_from(block, GROUP_HEADER.size + i * ASSIGNMENT.size)
        for i in range(count)
    ]


class Member:
    """A member subscription in an instance of its own."""

    def __init__(
        self,
        segment: Segment,
        *,
        queue: str = "workers",
        pattern: str = "jobs.>",
        window: int = 100,
    ) -> None:
        self.segment = segment
        self.sub = groups.MemberSubscription(pattern, queue, maxsize=window)
        self.membership = groups.join(segment, queue, pattern, window)
        self.sub.bind(self.membership, segment)

    @property
    def index(self) -> int:
        return self.membership.index

    def take(self, count: int) -> None:
        """Its consumer takes *count* events (M2)."""
        self.sub.delivered += count
        self.sub._publish()

    def receive(self, publisher: Publisher, reader: RingReader[bytes]) -> list[int]:
        """Read the publisher's ring; return the sequence numbers it delivers (M1)."""
        batch = reader.read(1000, lambda topic: topic)
        return [
            seq
            for seq, _, _, _, ok in batch.records
            if ok and self.sub.accept(batch.assignments.get(seq), publisher.key)
        ]

    def leave(self) -> bool:
        return groups.leave(self.segment, self.membership, self.sub.delivered, -1)

    def state(self) -> int:
        return int(self.segment.words[member_word(self.index, MEMBER_CONTROL)]) & 0xFF


@pytest.fixture
def attach(bus_name: str) -> Iterator[Callable[[], Segment]]:
    """Attach another 'process' to the test's bus."""
    segments: list[Segment] = []

    def new() -> Segment:
        segment = Segment.attach(SegmentOptions(bus_name, CAPACITY, MAX_EVENT, 0o600, None))
        segments.append(segment)
        return segment

    yield new
    for segment in reversed(segments):
        with contextlib.suppress(Exception):
            segment.detach()


@contextlib.contextmanager
def inside_fence(
    monkeypatch: pytest.MonkeyPatch, name: str, step: Callable[[], None]
) -> Iterator[None]:
    """Run *step* (the other side) the first time groups' *name* fence runs."""
    real = getattr(groups, name)
    done: list[bool] = []

    def fence() -> None:
        real()
        if not done:
            done.append(True)
            step()

    monkeypatch.setattr(groups, name, fence)
    try:
        yield
    finally:
        monkeypatch.setattr(groups, name, real)
    assert done, f"the {name} never ran: the interleaving was not exercised"


def stats_of(segment: Segment, queue: str = "workers") -> groups.GroupStatistics:
    found = groups.group_statistics(segment.mm, segment.words, segment.fd)
    (group,) = [g for g in found if g.queue == queue]
    return group


# ─── Assignment ──────────────────────────────────────────────────────────────


def test_each_matching_event_names_exactly_one_member_of_its_group(attach):
    members = [Member(attach()) for _ in range(3)]
    publisher = Publisher(attach())
    chosen = [publisher.publish() for _ in range(30)]
    assert all(len(names) == 1 for names in chosen)
    counts = Counter(names[0][0] for names in chosen)
    assert counts == {member.index: 10 for member in members}  # idle members: round robin


def test_an_event_no_group_matches_is_a_plain_record(attach):
    Member(attach(), pattern="jobs.>")
    publisher = Publisher(attach())
    assert publisher.publish(b"other.topic") == []


def test_an_event_matching_two_groups_names_one_member_of_each(attach):
    workers = [Member(attach(), queue="workers") for _ in range(2)]
    auditors = [Member(attach(), queue="audit", pattern="jobs.*") for _ in range(2)]
    publisher = Publisher(attach())
    names = publisher.publish()
    assert len(names) == 2
    assert {index for index, _, _ in names} & {m.index for m in workers}
    assert {index for index, _, _ in names} & {m.index for m in auditors}


def test_a_member_delivers_only_the_records_that_name_its_entry_and_generation(attach):
    members = [Member(attach()) for _ in range(2)]
    publisher = Publisher(attach())
    names = [publisher.publish() for _ in range(6)]
    delivered = [m.receive(publisher, publisher.reader()) for m in members]
    assert sorted(delivered[0] + delivered[1]) == list(range(6))
    for member, seqs in zip(members, delivered, strict=True):
        assert seqs == [seq for seq, n in enumerate(names) if n[0][0] == member.index]


def test_ordinals_count_from_one_per_ring_and_generation(attach):
    Member(attach())
    first, second = Publisher(attach()), Publisher(attach())
    assert [first.publish()[0][2] for _ in range(3)] == [1, 2, 3]
    assert [second.publish()[0][2] for _ in range(2)] == [1, 2]


# ─── Credit (P2, M2) ─────────────────────────────────────────────────────────


def test_a_member_whose_window_is_full_is_passed_over_until_its_consumer_takes_events(attach):
    a = Member(attach(), window=2)
    b = Member(attach(), window=2)
    publisher = Publisher(attach())
    assert Counter(publisher.publish()[0][0] for _ in range(4)) == {a.index: 2, b.index: 2}
    b.take(2)
    assert [publisher.publish()[0][0] for _ in range(2)] == [b.index, b.index]


def test_the_member_with_more_room_takes_more(attach):
    small = Member(attach(), window=2)
    large = Member(attach(), window=100)
    publisher = Publisher(attach())
    counts = Counter(publisher.publish()[0][0] for _ in range(20))
    assert counts[small.index] <= 2 and counts[large.index] >= 18


def test_when_no_member_has_room_the_one_with_the_most_gets_the_event(attach):
    a = Member(attach(), window=1)
    b = Member(attach(), window=3)
    publisher = Publisher(attach())
    for _ in range(4):
        publisher.publish()  # both full now
    b.take(1)  # b has room for one more than a
    assert publisher.publish()[0][0] == b.index
    assert publisher.publish()[0][0] in (a.index, b.index)  # both at 0: someone gets it


def test_while_all_are_full_a_member_whose_consumer_stopped_gets_nothing_once_another_moves(
    attach,
):
    stopped = Member(attach(), window=2)
    busy = Member(attach(), window=2)
    publisher = Publisher(attach())
    for _ in range(4):
        publisher.publish()  # both full now
    publisher.publish()  # over-committed: nobody has moved yet, either may get it
    chosen = []
    for _ in range(10):
        busy.take(1)  # only the busy one's consumer moves, slower than events come
        chosen += [publisher.publish()[0][0] for _ in range(3)]
    assert stopped.index not in chosen


def test_two_publishers_count_each_others_assignments_against_a_members_credit(attach):
    """Alternating publishers fill two members of window 3 exactly: each
    publisher's choice sees the other's assignments (were they ignored, the
    first member of each pair would get 4)."""
    a, b = Member(attach(), window=3), Member(attach(), window=3)
    one, two = Publisher(attach()), Publisher(attach())
    chosen = [publisher.publish()[0][0] for _ in range(3) for publisher in (one, two)]
    assert Counter(chosen) == {a.index: 3, b.index: 3}


def test_a_publisher_counts_the_assignments_of_a_ring_installed_after_it_read_the_table(attach):
    a, b = Member(attach(), window=3), Member(attach(), window=3)
    early = Publisher(attach())
    chosen = [early.publish()[0][0]]  # reads the table (and the rings in use) now
    late = Publisher(attach())  # installing a ring raises every group flag
    chosen += [late.publish()[0][0] for _ in range(4)]
    chosen += [early.publish()[0][0]]
    assert Counter(chosen) == {a.index: 3, b.index: 3}


# ─── Claims and settling (P3, S1-S3) ─────────────────────────────────────────


def test_a_settler_that_sees_a_claim_gives_up_and_the_claimant_does_not_assign(
    attach, monkeypatch
):
    """S2 inside P3's fence: the settler sees the claim (it waits), the
    publisher then sees LEAVING (it does not assign)."""
    member = Member(attach())
    publisher = Publisher(attach())
    publisher.publish()  # its table names the member
    settled: list[bool] = []
    with inside_fence(monkeypatch, "full_fence", lambda: settled.append(member.leave())):
        names = publisher.publish()
    assert settled == [False] and member.state() == MEMBER_LEAVING
    assert names == []
    assert groups.settle_dead(attach()) == 1
    assert member.state() == MEMBER_SETTLED
    assert stats_of(member.segment).dropped == 1  # the first event only


def test_a_claim_made_after_leaving_was_stored_sees_it_and_does_not_assign(attach, monkeypatch):
    """P3 inside S1's fence: the publisher sees LEAVING; the settler then
    finds no claim and settles at once."""
    member = Member(attach())
    publisher = Publisher(attach())
    publisher.publish()  # its table names the member
    names: list[list[tuple[int, int, int]]] = []
    with inside_fence(monkeypatch, "full_fence", lambda: names.append(publisher.publish())):
        assert member.leave() is True
    assert names == [[]]
    assert member.state() == MEMBER_SETTLED
    assert stats_of(member.segment).dropped == 1  # the first event only


def test_an_assignment_in_flight_when_its_member_leaves_is_counted_dropped(attach, monkeypatch):
    """The settler runs between the assigned count and the end of the claim
    (P3's release fence): it must wait, and the next settle counts it."""
    member = Member(attach())
    publisher = Publisher(attach())
    settled: list[bool] = []
    with inside_fence(monkeypatch, "release_fence", lambda: settled.append(member.leave())):
        names = publisher.publish()
    assert len(names) == 1 and settled == [False]
    assert groups.settle_dead(attach()) == 1
    group = stats_of(member.segment)
    assert (group.delivered, group.dropped) == (0, 1)


def test_settling_counts_every_assigned_event_not_delivered_as_dropped(attach):
    member = Member(attach())
    publisher = Publisher(attach())
    for _ in range(5):
        publisher.publish()
    member.take(2)
    assert member.leave() is True
    group = stats_of(member.segment)
    assert (group.delivered, group.dropped, group.members) == (2, 3, ())


def test_a_member_whose_instance_died_is_settled_by_the_next_sweep(attach):
    doomed = Member(attach())
    publisher = Publisher(attach())
    for _ in range(4):
        publisher.publish()
    doomed.take(1)
    doomed.segment.detach()  # the kernel drops its lock bytes, as on kill -9
    survivor = attach()
    before = stats_of(survivor)
    assert before.members[0].alive is False and before.dropped == 3  # reported as dropped already
    assert groups.settle_dead(survivor) == 1
    after = stats_of(survivor)
    assert (after.delivered, after.dropped, after.members) == (1, 3, ())


def test_a_live_member_is_never_settled_by_a_sweep(attach):
    member = Member(attach())
    assert groups.settle_dead(attach()) == 0
    assert member.state() == MEMBER_LIVE


def test_settling_twice_counts_once(attach):
    member = Member(attach())
    publisher = Publisher(attach())
    publisher.publish()
    assert member.leave() is True
    sweeper = attach()
    groups._settle_owned(sweeper, member.index, -1)
    assert stats_of(sweeper).dropped == 1


# ─── Joining and reuse (J1-J3) ───────────────────────────────────────────────


def test_a_joiner_zeroes_the_assigned_counts_of_the_entry_it_takes(attach):
    first = Member(attach())
    publisher = Publisher(attach())
    for _ in range(3):
        publisher.publish()
    first.leave()
    second = Member(attach())
    assert second.index == first.index  # the group's settled entry is reused first
    assert stats_of(second.segment).members[0].assigned == 0


def test_a_publisher_with_an_old_table_never_assigns_to_a_reused_entry(attach, monkeypatch):
    first = Member(attach())
    publisher = Publisher(attach())
    publisher.publish()  # its table names first's generation
    first.leave()
    # The new member's join raises the publisher's flag; pretend it never saw it.
    second = Member(attach())
    publisher.segment.mm[publisher.assigner._flag] = 0
    names = publisher.publish()
    assert names == [] or names[0][1] == second.membership.gen
    names = publisher.publish()  # the table is read again
    assert names[0][:2] == (second.index, second.membership.gen)


def test_records_named_for_an_earlier_generation_are_not_delivered(attach):
    first = Member(attach())
    publisher = Publisher(attach())
    publisher.publish()
    first.leave()
    second = Member(attach())
    assert second.receive(publisher, publisher.reader()) == []


def test_a_same_group_joiner_keeps_the_groups_history(attach):
    first = Member(attach())
    publisher = Publisher(attach())
    for _ in range(3):
        publisher.publish()
    first.take(2)
    first.leave()
    Member(attach())
    group = stats_of(publisher.segment)
    assert (group.delivered, group.dropped) == (2, 1)


def test_an_entry_left_mid_join_is_free_and_never_assigned_to(attach):
    joiner = attach()
    member = Member(joiner)
    words = joiner.words
    control = int(words[member_word(member.index, MEMBER_CONTROL)])
    words[member_word(member.index, MEMBER_CONTROL)] = (control & ~0xFF) | MEMBER_JOINING
    joiner.detach()  # died mid-join
    publisher = Publisher(attach())
    assert publisher.publish() == []
    again = Member(attach())
    assert again.index == member.index


def test_joining_a_bus_whose_member_entries_are_all_taken_raises(attach):
    segment = attach()
    held: set[int] = set()
    for _ in range(MAX_MEMBERS):
        held.add(groups.join(segment, "q", "jobs.>", 10, held).index)
    with pytest.raises(NoFreeSlotError, match=f"all {MAX_MEMBERS} queue-group member entries"):
        groups.join(attach(), "q", "jobs.>", 10)


# ─── Losses (M1, M3) ─────────────────────────────────────────────────────────


def test_an_ordinal_that_jumps_counts_the_assignments_skipped(attach):
    member = Member(attach())
    publisher = Publisher(attach())
    for _ in range(5):
        publisher.publish()
    reader = publisher.reader()
    batch = reader.read(1000, lambda topic: topic)
    kept = [s for s, *_ in batch.records if s in (0, 3, 4)]  # records 1 and 2 lapped
    for seq in kept:
        assert member.sub.accept(batch.assignments[seq], publisher.key)
    assert member.sub.lost == 2


def test_an_ordinal_not_above_the_last_is_not_delivered_again(attach):
    member = Member(attach())
    publisher = Publisher(attach())
    publisher.publish()
    batch = publisher.reader().read(10, lambda topic: topic)
    block = batch.assignments[0]
    assert member.sub.accept(block, publisher.key)
    assert not member.sub.accept(block, publisher.key)
    assert member.sub.lost == 0


def test_assignments_lapped_at_a_rings_tail_are_counted_once_the_reader_caught_up(attach):
    member = Member(attach())
    publisher = Publisher(attach())
    reader = publisher.reader()
    for _ in range(3):
        publisher.publish()
    assert len(member.receive(publisher, reader)) == 3
    for _ in range(4):
        publisher.publish()
    reader.cursor = int(publisher.ring.words[8])  # lapped past them: nothing more follows
    member.sub.reconcile(publisher.key, publisher.ring.words, reader.caught_up)
    assert member.sub.lost == 4


def test_nothing_is_counted_lost_while_the_reader_is_behind(attach):
    member = Member(attach())
    publisher = Publisher(attach())
    reader = publisher.reader()
    for _ in range(3):
        publisher.publish()
    member.sub.reconcile(publisher.key, publisher.ring.words, reader.caught_up)
    assert member.sub.lost == 0
    assert len(member.receive(publisher, reader)) == 3
    member.sub.reconcile(publisher.key, publisher.ring.words, reader.caught_up)
    assert member.sub.lost == 0


def test_the_rings_ordinal_word_moves_only_after_the_commit(attach, monkeypatch):
    """P5: while the record is not committed, a reader that is caught up must
    not count it lost."""
    member = Member(attach())
    publisher = Publisher(attach())
    reader = publisher.reader()
    seen: list[int] = []

    def before_commit() -> None:
        seen.append(int(publisher.ring.words[W_ORDINALS + member.index]))
        member.sub.reconcile(publisher.key, publisher.ring.words, reader.caught_up)

    publisher.writer.before_commit = before_commit
    publisher.publish()
    assert seen == [0] and member.sub.lost == 0
    assert len(member.receive(publisher, reader)) == 1


def test_an_append_interrupted_before_its_commit_gives_back_its_ordinal(attach):
    Member(attach())
    publisher = Publisher(attach())
    block = publisher.assigner.assign(TOPIC)
    assert named(block)[0][2] == 1
    publisher.assigner.finish(False)  # the append raised before committing
    assert publisher.publish()[0][2] == 1


# ─── Hostile bytes ───────────────────────────────────────────────────────────


def test_a_damaged_member_entry_is_skipped_counted_and_its_work_goes_to_the_others(attach):
    damaged, healthy = Member(attach()), Member(attach())
    base = member_offset(damaged.index)
    damaged.segment.mm[base + MEMBER_PATTERN : base + MEMBER_PATTERN + 4] = b"\xff\xfe *"
    publisher = Publisher(attach())
    chosen = {publisher.publish()[0][0] for _ in range(10)}
    assert chosen == {healthy.index}
    assert publisher.assigner.corrupt == 1


def test_a_member_writes_its_damaged_entry_again_and_gets_work_again(attach):
    damaged, healthy = Member(attach()), Member(attach())
    base = member_offset(damaged.index)
    damaged.segment.mm[base + MEMBER_QUEUE : base + MEMBER_QUEUE + 3] = b"\x00\x01\x02"
    publisher = Publisher(attach())
    assert {publisher.publish()[0][0] for _ in range(4)} == {healthy.index}
    assert damaged.sub.check_entry() is True  # its heartbeat (M5)
    assert damaged.index in {publisher.publish()[0][0] for _ in range(4)}
    assert damaged.sub.check_entry() is False


def test_a_member_one_table_read_missed_goes_on_from_its_ordinal(attach):
    """Skipped once (here: damaged, then written again), a member must not
    get ordinals from 1 again: its reader would take them for old ones."""
    member = Member(attach())
    Member(attach())  # takes the work meanwhile
    publisher = Publisher(attach())
    reader = publisher.reader()
    names = [publisher.publish() for _ in range(4)]
    base = member_offset(member.index)
    member.segment.mm[base + MEMBER_QUEUE : base + MEMBER_QUEUE + 1] = b" "
    groups.signal_change(member.segment)
    missed = publisher.publish()  # reads the table without it
    assert missed[0][0] != member.index
    assert member.sub.check_entry() is True
    later = [publisher.publish() for _ in range(4)]  # reads it again, with it
    assert any(n[0][0] == member.index for n in later)
    received = member.receive(publisher, reader)
    assert len(received) == sum(n[0][0] == member.index for n in names + later)
    assert member.sub.lost == 0


def test_a_control_word_scribbled_to_another_generation_is_written_again(attach):
    member = Member(attach())
    word = member_word(member.index, MEMBER_CONTROL)
    member.segment.words[word] = ((member.membership.gen + 5) << 8) | MEMBER_SETTLED
    publisher = Publisher(attach())
    assert publisher.publish() == []
    assert member.sub.check_entry() is True
    assert publisher.publish()[0][:2] == (member.index, member.membership.gen)


def test_an_intact_entry_is_left_as_it_is(attach):
    member = Member(attach())
    Publisher(attach()).publish()
    member.take(1)
    assert member.sub.check_entry() is False


def test_a_member_entry_in_a_state_no_member_writes_is_counted_damaged(attach):
    member = Member(attach())
    member.segment.words[member_word(member.index, MEMBER_CONTROL)] = (7 << 8) | 0x77
    publisher = Publisher(attach())
    assert publisher.publish() == []
    assert publisher.assigner.corrupt == 1


def test_a_member_entry_whose_key_does_not_match_its_strings_is_damaged(attach):
    member = Member(attach())
    member.segment.words[member_word(member.index, MEMBER_KEY)] ^= 1
    publisher = Publisher(attach())
    assert publisher.publish() == []
    assert publisher.assigner.corrupt == 1


def test_a_hostile_window_costs_only_the_entry_that_claims_it(attach):
    greedy, fair = Member(attach()), Member(attach())
    greedy.segment.words[member_word(greedy.index, MEMBER_WINDOW)] = (1 << 64) - 1
    fair.segment.words[member_word(fair.index, MEMBER_WINDOW)] = 0
    publisher = Publisher(attach())
    names = [publisher.publish()[0] for _ in range(5)]
    assert {index for index, _, _ in names} <= {greedy.index, fair.index}
    assert len({(index, ordinal) for index, _, ordinal in names}) == 5  # never twice


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 2**32 - 1), entries=st.integers(1, 12))
def test_random_bytes_in_the_member_table_never_break_a_publisher_or_a_report(
    attach, seed, entries
):
    rng = random.Random(seed)
    segment = attach()
    try:
        for index in rng.sample(range(MAX_MEMBERS), entries):
            base = member_offset(index)
            segment.mm[base : base + MEMBER_SIZE] = rng.randbytes(MEMBER_SIZE)
            if rng.random() < 0.7:  # often a plausible state, to reach the checks behind it
                segment.words[member_word(index, MEMBER_CONTROL)] = (
                    rng.getrandbits(24) << 8
                ) | rng.choice((MEMBER_LIVE, MEMBER_LEAVING, MEMBER_SETTLED))
            if rng.random() < 0.5:
                segment.words[member_word(index, MEMBER_PATTERN_LEN)] = rng.randint(0, 2000)
                segment.mm[base + MEMBER_QUEUE : base + MEMBER_QUEUE + 1] = b"q"
        publisher = Publisher(attach())
        for _ in range(5):
            for index, _, _ in publisher.publish(rng.choice([b"jobs.a", b"x", b"\xff"])):
                assert 0 <= index < MAX_MEMBERS
        groups.group_statistics(segment.mm, segment.words, segment.fd)
        groups.settle_dead(segment)
        publisher.segment.detach()
    finally:
        segment.detach()
