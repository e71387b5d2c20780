"""The ring directory protocol (shmbus._core.directory), single-threaded.

Each "process" is a Segment attached in this process (its own descriptor,
so OFD locks conflict between them as between processes). Readers are
RingFinder + RingReader, exactly what BusReader uses. Where the protocol has
a fence, the other side's step is run *inside* it (by patching the fence), so
the test chooses the interleaving the rules are about."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import pytest

from shmbus._core import directory
from shmbus._core.layout import (
    ENTRY_RETIRED,
    ENTRY_STATE,
    OFF_RING_ID,
    RING_OFFSET,
    entry_word,
)
from shmbus._core.ring import RingReader, RingWriter, content_checksum
from shmbus._core.segment import Segment, SegmentOptions
from shmbus._core.shmfiles import ring_path

CAPACITY = 1 << 16
MAX_EVENT = 1024


class Writer:
    """A publishing instance: its attachment and its ring."""

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self.ring = directory.install_ring(segment, CAPACITY, MAX_EVENT)
        self.writer = RingWriter(self.ring.mm, self.ring.words, RING_OFFSET, CAPACITY, MAX_EVENT)

    @property
    def key(self) -> tuple[int, int]:
        return (self.ring.entry, self.ring.gen)

    @property
    def path(self) -> str:
        return self.ring.path

    def publish(self, count: int) -> None:
        for n in range(count):
            body = f"event {n}".encode()
            self.writer.append(b"t", body, content_checksum(b"t", body))

    def retire(self) -> None:
        directory.retire_ring(self.segment, self.ring)


class Reader:
    """A reading instance: a RingFinder and what it follows."""

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self.finder = directory.RingFinder(segment)
        self.rings: dict[tuple[int, int], RingReader[bytes]] = {}
        self.subscribed = False

    def subscribe(self) -> None:
        first = not self.subscribed
        self.subscribed = True
        self.finder.announce(1)
        self.scan(first=first)

    def scan(self, *, first: bool = False) -> list[directory.FoundRing]:
        found = self.finder.scan(set(self.rings), first=first)
        for ring in found:
            mapping = ring.mapping
            reader: RingReader[bytes] = RingReader(
                mapping.mm,
                mapping.words,
                RING_OFFSET,
                mapping.capacity,
                mapping.max_event_size,
                0,
                0,
            )
            if not ring.from_start:
                reader.cursor, reader.expected_seq = reader.snapshot()
            self.rings[(mapping.entry, mapping.gen)] = reader
            self.finder.adopted(ring)
        return found

    def read(self, key: tuple[int, int]) -> list[bytes]:
        batch = self.rings[key].read(1000, lambda topic: topic)
        return [body for _, _, _, body, ok in batch.records if ok]


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
    """Run *step* (the other side) the first time directory's *name* fence runs."""
    real = getattr(directory, name)
    done = []

    def fence() -> None:
        real()
        if not done:
            done.append(True)
            step()

    monkeypatch.setattr(directory, name, fence)
    try:
        yield
    finally:
        monkeypatch.setattr(directory, name, real)
    assert done, f"the {name} never ran: the interleaving was not exercised"


# ─── Finding rings ───────────────────────────────────────────────────────────


def test_a_first_scan_follows_live_rings_from_their_end_and_skips_retired_ones(attach):
    live, gone, reader = Writer(attach()), Writer(attach()), Reader(attach())
    live.publish(3)
    gone.publish(2)
    gone.retire()
    reader.subscribe()
    assert set(reader.rings) == {live.key}
    live.publish(1)
    assert reader.read(live.key) == [b"event 0"]  # only what came after subscribing


def test_a_ring_installed_after_the_first_scan_is_followed_from_its_beginning(attach):
    reader = Reader(attach())
    reader.subscribe()
    writer = Writer(attach())
    writer.publish(3)
    assert reader.finder.changed()
    found = reader.scan()
    assert [ring.from_start for ring in found] == [True]
    assert reader.read(writer.key) == [b"event 0", b"event 1", b"event 2"]


def test_a_ring_that_came_and_went_between_two_scans_is_still_read_whole(attach):
    reader = Reader(attach())
    reader.subscribe()
    writer = Writer(attach())
    writer.publish(2)
    writer.retire()
    assert os.path.exists(writer.path)  # owed to the reader: not reclaimed
    reader.scan()
    assert reader.read(writer.key) == [b"event 0", b"event 1"]


def test_a_reader_that_stopped_and_subscribes_again_follows_the_live_rings_it_saw_before(
    attach,
):
    writer, segment = Writer(attach()), attach()
    before = Reader(segment)
    before.subscribe()
    assert writer.key in before.rings
    before.finder.announce(0)  # its last subscription closed: the reader stops
    again = Reader(segment)
    again.subscribe()
    writer.publish(1)
    assert again.read(writer.key) == [b"event 0"]


def test_the_directory_flag_is_clear_after_a_scan_and_set_by_an_install(attach):
    reader = Reader(attach())
    reader.subscribe()
    assert not reader.finder.changed()
    Writer(attach())
    assert reader.finder.changed()
    reader.scan()
    assert not reader.finder.changed()


# ─── Reclaiming ──────────────────────────────────────────────────────────────


def test_a_retired_ring_no_subscribed_reader_is_owed_is_removed_when_it_retires(attach):
    writer = Writer(attach())
    Reader(attach())  # attached, never subscribed
    writer.publish(2)
    writer.retire()
    assert not os.path.exists(writer.path)


def test_a_retired_ring_a_subscribed_reader_has_not_mapped_is_kept(attach):
    reader = Reader(attach())
    reader.subscribe()
    writer = Writer(attach())
    writer.publish(1)
    writer.retire()
    assert directory.reclaim_dead(reader.segment) == 0
    assert os.path.exists(writer.path)


def test_a_ring_is_removed_once_mapped_and_the_mapping_still_reads_it(attach):
    reader = Reader(attach())
    reader.subscribe()
    writer = Writer(attach())
    writer.publish(2)
    writer.retire()
    reader.scan()
    assert directory.reclaim_dead(reader.segment) == 1
    assert not os.path.exists(writer.path)
    assert reader.read(writer.key) == [b"event 0", b"event 1"]


def test_a_dead_writers_ring_is_reclaimed_by_another_instance_once_seen(attach):
    reader = Reader(attach())
    reader.subscribe()
    writer_segment = attach()
    writer = Writer(writer_segment)
    writer.publish(1)
    writer_segment.abandon()  # dies: the kernel drops its lock bytes
    entry, gen = writer.key
    assert not directory.writer_alive(reader.segment, entry, gen)
    assert directory.reclaim_dead(reader.segment) == 0  # not seen yet
    reader.scan()
    assert reader.read(writer.key) == [b"event 0"]
    assert directory.reclaim_dead(reader.segment) == 1
    assert not os.path.exists(writer.path)


def test_a_reclaimed_entry_is_reused_with_a_new_generation(attach):
    first = Writer(attach())
    first.retire()
    second = Writer(attach())
    assert second.key == (first.key[0], first.key[1] + 1)
    assert second.path != first.path


def test_a_new_writer_takes_another_entry_while_a_stopped_reader_is_owed_the_old_one(attach):
    reader = Reader(attach())
    reader.subscribe()
    first = Writer(attach())
    first.publish(1)
    first.retire()  # the reader never scans again: it is "stopped"
    second = Writer(attach())
    assert second.key[0] != first.key[0]
    assert os.path.exists(first.path)


def test_a_writer_is_alive_until_it_retires(attach):
    writer = Writer(attach())
    reader = Reader(attach())
    entry, gen = writer.key
    assert directory.writer_alive(reader.segment, entry, gen)
    writer.retire()
    assert not directory.writer_alive(reader.segment, entry, gen)


# ─── Interleavings at the fences ─────────────────────────────────────────────


def test_a_first_scan_inside_a_reclaim_sees_it_and_is_owed_nothing(attach, monkeypatch):
    """Reclaimer stores RECLAIMING, fence; the reader announces and scans
    right there: it must skip the ring (it retired before the subscription),
    and the reclaim then goes through."""
    reader = Reader(attach())
    writer = Writer(attach())
    writer.publish(1)
    with inside_fence(monkeypatch, "full_fence", reader.subscribe):
        writer.retire()
    assert writer.key not in reader.rings
    assert not os.path.exists(writer.path)


def test_a_reclaim_inside_a_first_scans_fence_sees_the_reader_and_backs_off(attach, monkeypatch):
    """The reader announces, fence; a whole reclaim runs right there: it must
    see the reader's subscriptions word and keep the ring, since the reader
    has not mapped it; the reader's scan then sees it retired and skips it."""
    writer_segment = attach()
    writer = Writer(writer_segment)
    writer.publish(1)
    reader = Reader(attach())
    states = []

    def reclaim_now() -> None:
        writer.retire()
        states.append(os.path.exists(writer.path))

    # The first full_fence to run is the reader's (announce, then fence).
    with inside_fence(monkeypatch, "full_fence", reclaim_now):
        reader.subscribe()
    assert states == [True]  # the reclaim backed off
    assert writer.key not in reader.rings  # rule 1: retired before the subscription
    assert directory.reclaim_dead(reader.segment) == 1  # seen now: it goes


def test_an_entry_that_changes_during_a_scan_is_scanned_again(attach, monkeypatch):
    reader = Reader(attach())
    reader.subscribe()
    writer = Writer(attach())
    reader.scan()
    writer.publish(1)
    late: list[Writer] = []

    def install_another() -> None:
        writer.retire()
        late.append(Writer(attach()))

    with inside_fence(monkeypatch, "acquire_fence", install_another):
        reader.scan()
    assert reader.finder.changed()  # rule 3: look again
    reader.scan()
    assert late[0].key in reader.rings


def test_a_ring_file_that_disagrees_with_its_entry_is_not_read(attach):
    reader = Reader(attach())
    reader.subscribe()
    writer = Writer(attach())
    writer.ring.words[OFF_RING_ID // 8] ^= 1  # the file's identity no longer matches
    reader.scan()
    assert writer.key not in reader.rings
    assert reader.finder.unusable == 1


def test_a_backed_off_reclaim_leaves_the_entry_retired_not_reclaiming(attach):
    reader = Reader(attach())
    reader.subscribe()
    writer = Writer(attach())
    entry = writer.key[0]
    writer.retire()
    assert reader.segment.words[entry_word(entry, ENTRY_STATE)] == ENTRY_RETIRED
    assert os.path.exists(ring_path(reader.segment.name, writer.ring.ring_id))
