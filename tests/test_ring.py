"""The ring protocol (shmbus._core.ring): RingWriter and RingReader over an anonymous
mapping laid out like a ring file, single-threaded, so every interleaving is
chosen by the test."""

from __future__ import annotations

import mmap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmbus._core import layout
from shmbus._core.layout import (
    NO_RECORD,
    OFF_HEAD,
    OFF_LAST_RECORD,
    OFF_NEXT_SEQ,
    OFF_WRITE_CURSOR,
    RECORD,
    RECORD_EVENT,
    RECORD_HEADER_SIZE,
    RECORD_PADDING,
    RING_OFFSET,
    aligned,
)
from shmbus._core.ring import UNKNOWN_SEQ, RingBatch, RingReader, RingWriter, content_checksum

MAX_EVENT = 512


class Ring:
    """A fresh ring-file-shaped mapping with one writer."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.mm = mmap.mmap(-1, layout.ring_file_size(capacity))
        #: shared words are written through an 8-byte view, as the bus does
        self.words = memoryview(self.mm).cast("Q")
        self.set_word(OFF_LAST_RECORD, NO_RECORD)
        self.writer = RingWriter(self.mm, self.words, RING_OFFSET, capacity, MAX_EVENT)
        #: seq -> (start position, topic, body) of every record written
        self.written: dict[int, tuple[int, bytes, bytes]] = {}

    def append(self, topic: bytes, body: bytes) -> int:
        seq = self.writer.append(topic, body, content_checksum(topic, body))
        end = self.word(OFF_WRITE_CURSOR)
        self.written[seq] = (end - record_length(topic, body), topic, body)
        return seq

    def reader(self, cursor: int = 0, next_seq: int = 0) -> RingReader[bytes]:
        return RingReader(
            self.mm, self.words, RING_OFFSET, self.capacity, MAX_EVENT, cursor, next_seq
        )

    def word(self, offset: int) -> int:
        return int(self.words[offset // 8])

    def set_word(self, offset: int, value: int) -> None:
        self.words[offset // 8] = value

    def record_offset(self, seq: int) -> int:
        """Offset in the mapping of record *seq*'s header."""
        return RING_OFFSET + self.written[seq][0] % self.capacity


def record_length(topic: bytes, body: bytes) -> int:
    return aligned(RECORD_HEADER_SIZE + len(topic) + len(body))


def body_for_length(length: int, topic: bytes = b"t") -> bytes:
    """A body that makes a record of exactly *length* bytes."""
    body = bytes(range(256)) * 4
    return body[: length - RECORD_HEADER_SIZE - len(topic)]


def select_all(topic: bytes) -> bytes:
    return topic


def seqs(records) -> list[int]:
    return [record[0] for record in records]


# ─── Round trip ──────────────────────────────────────────────────────────────


def test_records_round_trip_in_order():
    ring = Ring(4096)
    written = [(b"a.b", b"first"), (b"c", b""), (b"d.e.f", bytes(range(200)))]
    for topic, body in written:
        ring.append(topic, body)
    batch = ring.reader().read(100, select_all)
    assert batch.records == [
        (seq, topic, topic, body, True) for seq, (topic, body) in enumerate(written)
    ]
    assert batch.gaps == [] and batch.corrupt == 0 and not batch.lapped


def test_writer_returns_consecutive_sequence_numbers_and_commits():
    ring = Ring(4096)
    assert [ring.append(b"t", b"x") for _ in range(3)] == [0, 1, 2]
    assert ring.word(OFF_NEXT_SEQ) == 3
    assert ring.word(OFF_WRITE_CURSOR) == 3 * record_length(b"t", b"x")
    assert ring.word(layout.OFF_NEXT_SEQ) == 3
    assert ring.word(OFF_LAST_RECORD) == 2 * record_length(b"t", b"x")


def test_reader_advances_to_the_write_cursor_and_expected_seq():
    ring = Ring(4096)
    for _ in range(4):
        ring.append(b"t", b"body")
    reader = ring.reader()
    reader.read(100, select_all)
    assert reader.cursor == ring.word(OFF_WRITE_CURSOR)
    assert reader.expected_seq == 4
    assert not reader.pending()


def test_read_returns_at_most_limit_records_and_resumes_after_them():
    ring = Ring(4096)
    for i in range(10):
        ring.append(b"t", bytes([i]))
    reader = ring.reader()
    assert seqs(reader.read(3, select_all).records) == [0, 1, 2]
    assert reader.pending()
    assert seqs(reader.read(3, select_all).records) == [3, 4, 5]
    assert seqs(reader.read(100, select_all).records) == [6, 7, 8, 9]
    assert reader.read(100, select_all).records == []


def test_unselected_records_are_skipped_without_a_gap():
    ring = Ring(4096)
    for topic in (b"keep", b"skip", b"keep", b"skip"):
        ring.append(topic, b"x")
    batch = ring.reader().read(100, lambda topic: "route" if topic == b"keep" else None)
    assert [(seq, route) for seq, route, *_ in batch.records] == [(0, "route"), (2, "route")]
    assert batch.gaps == []


def test_a_reader_started_mid_stream_reads_only_later_records():
    ring = Ring(4096)
    for _ in range(3):
        ring.append(b"t", b"old")
    reader = ring.reader(ring.word(OFF_WRITE_CURSOR), ring.word(OFF_NEXT_SEQ))
    ring.append(b"t", b"new")
    batch = reader.read(100, select_all)
    assert [(seq, body) for seq, _, _, body, _ in batch.records] == [(3, b"new")]
    assert batch.gaps == []


# ─── Wrap-around ─────────────────────────────────────────────────────────────


def test_a_record_that_does_not_fit_before_the_end_goes_after_a_padding_record():
    ring = Ring(1024)
    body = body_for_length(200)
    reader = ring.reader()
    received = []
    for _ in range(6):  # 5 records end at 1000; the 6th needs a 24-byte pad
        ring.append(b"t", body)
        received += reader.read(100, select_all).records
    assert RECORD.unpack_from(ring.mm, RING_OFFSET + 1000)[:2] == (24, RECORD_PADDING)
    assert ring.written[5][0] == 1024  # the 6th record starts at the wrap
    assert seqs(received) == list(range(6))
    assert all(record[3] == body and record[4] for record in received)


def test_a_gap_too_small_for_a_padding_header_is_skipped():
    ring = Ring(1024)
    body = body_for_length(336)
    reader = ring.reader()
    received = []
    for _ in range(5):  # 3 records end at 1008: 16 bytes left, less than a header
        ring.append(b"t", body)
        received += reader.read(100, select_all).records
    assert ring.written[3][0] == 1024
    assert seqs(received) == list(range(5))
    assert all(record[3] == body and record[4] for record in received)


def test_a_record_that_ends_exactly_at_the_end_needs_no_padding():
    ring = Ring(1024)
    body = body_for_length(256)
    reader = ring.reader()
    received = []
    for _ in range(6):  # 4 records fill the ring exactly; the 5th starts at the wrap
        ring.append(b"t", body)
        received += reader.read(100, select_all).records
    assert [ring.written[seq][0] for seq in range(6)] == [0, 256, 512, 768, 1024, 1280]
    assert seqs(received) == list(range(6))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.integers(min_value=1, max_value=40), st.integers(min_value=0, max_value=MAX_EVENT)
        ),
        min_size=1,
        max_size=60,
    )
)
def test_a_reader_that_keeps_up_gets_every_record_across_wraps(sizes):
    capacity = 2 * aligned(RECORD_HEADER_SIZE + 40 + MAX_EVENT) + 8
    ring = Ring(capacity)
    reader = ring.reader()
    received = []
    expected = []
    for n, (topic_len, body_len) in enumerate(sizes):
        topic = bytes([97 + n % 26]) * topic_len
        body = bytes([n % 251]) * body_len
        seq = ring.append(topic, body)
        expected.append((seq, topic, topic, body, True))
        batch = reader.read(100, select_all)
        assert batch.gaps == [] and batch.corrupt == 0 and not batch.lapped
        received += batch.records
    assert received == expected


# ─── Lapped readers ──────────────────────────────────────────────────────────


def read_all(reader: RingReader[bytes]) -> RingBatch[bytes]:
    """Read until the reader is at the write cursor (a call copies at most a
    quarter of the ring), merging what the calls found."""
    merged: RingBatch[bytes] = RingBatch()
    while reader.pending():
        batch = reader.read(100, select_all)
        merged.records += batch.records
        merged.gaps += batch.gaps
        merged.corrupt += batch.corrupt
        merged.lapped = merged.lapped or batch.lapped
    return merged


def test_a_read_copies_at_most_a_quarter_of_the_ring():
    ring = Ring(4096)
    for _ in range(10):
        ring.append(b"t", body_for_length(400))
    batch = ring.reader().read(100, select_all)
    assert 0 < sum(len(record[3]) for record in batch.records) <= 4096 // 4 + 400


def test_a_lapped_reader_reports_a_gap_of_exactly_the_missed_records():
    ring = Ring(1024)
    for _ in range(20):
        ring.append(b"t", body_for_length(200))
    reader = ring.reader()
    batch = read_all(reader)
    missed = sum(end - first for first, end in batch.gaps)
    assert missed + len(batch.records) == 20
    assert batch.gaps == [(0, batch.records[0][0])]
    assert seqs(batch.records) == list(range(missed, 20))


def test_a_lapped_reader_resumes_at_the_oldest_intact_record():
    ring = Ring(1024)
    for i in range(23):
        ring.append(b"t", body_for_length(120 + 8 * (i % 5)))
    head = ring.word(OFF_HEAD)
    oldest_intact = min(seq for seq, (start, _, _) in ring.written.items() if start >= head)
    batch = ring.reader().read(100, select_all)
    assert batch.records[0][0] == oldest_intact
    assert ring.written[oldest_intact - 1][0] < head  # the one before it was reclaimed


def test_a_reader_lapped_while_copying_discards_its_batch_and_counts_everything_later():
    ring = Ring(1024)
    body = body_for_length(200)
    for _ in range(3):
        ring.append(b"t", body)
    reader = ring.reader()
    laps = []

    def select_while_writer_laps(topic: bytes) -> bytes:
        if not laps:
            laps.append(True)
            for _ in range(8):  # overwrite the whole ring under the reader
                ring.append(b"t", body)
        return topic

    batch = reader.read(100, select_while_writer_laps)
    assert batch.lapped
    assert batch.records == []
    rest = read_all(reader)
    missed = sum(end - first for first, end in rest.gaps)
    assert missed + len(rest.records) == 11
    assert seqs(rest.records) == list(range(missed, 11))


@settings(max_examples=100, deadline=None)
@given(
    plan=st.lists(
        st.tuples(st.integers(min_value=0, max_value=12), st.integers(min_value=1, max_value=8)),
        min_size=1,
        max_size=30,
    ),
    body_len=st.integers(min_value=0, max_value=300),
)
def test_received_plus_gaps_always_equals_written(plan, body_len):
    """Whatever the pace of writer and reader: every record is either received
    once, in order, or counted in a gap."""
    ring = Ring(2048)
    reader = ring.reader()
    received: list[int] = []
    missed = 0
    for writes, limit in plan:
        for _ in range(writes):
            ring.append(b"t", bytes(body_len))
        batch = reader.read(limit, select_all)
        received += seqs(batch.records)
        missed += sum(end - first for first, end in batch.gaps)
        assert batch.corrupt == 0
        assert all(ok for *_, ok in batch.records)
    while reader.pending():
        batch = reader.read(100, select_all)
        received += seqs(batch.records)
        missed += sum(end - first for first, end in batch.gaps)
    assert received == sorted(set(received))
    assert len(received) + missed == len(ring.written)


# ─── Corruption ──────────────────────────────────────────────────────────────


def test_a_corrupt_record_header_is_counted_and_the_reader_resyncs_at_the_write_cursor():
    ring = Ring(4096)
    for i in range(5):
        ring.append(b"t", bytes([i]) * 10)
    struct_kind = ring.record_offset(2) + 4
    ring.mm[struct_kind : struct_kind + 2] = (7).to_bytes(2, "little")  # unknown kind
    reader = ring.reader()
    batch = reader.read(100, select_all)
    assert seqs(batch.records) == [0, 1]
    assert batch.corrupt == 1
    assert reader.cursor == ring.word(OFF_WRITE_CURSOR)


def test_a_reader_keeps_delivering_records_written_after_a_corrupt_one():
    ring = Ring(4096)
    for i in range(5):
        ring.append(b"t", bytes([i]) * 10)
    length_field = ring.record_offset(2)
    ring.mm[length_field : length_field + 4] = (999_999).to_bytes(4, "little")
    reader = ring.reader()
    reader.read(100, select_all)
    for i in range(5, 8):
        ring.append(b"t", bytes([i]) * 10)
    batch = reader.read(100, select_all)
    assert seqs(batch.records) == [5, 6, 7]
    assert all(ok for *_, ok in batch.records)
    assert batch.gaps == [(2, 5)]  # the corrupt record and the two skipped with it


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("length", 8),
        ("topic_len", 0),
        ("topic_len", 2000),
        ("body_len", MAX_EVENT + 1),
        ("seq", 0),  # lower than expected: a replay, not a new record
    ],
)
def test_every_implausible_header_field_is_corrupt(field, value):
    ring = Ring(4096)
    for _ in range(3):
        ring.append(b"t", bytes(10))
    offsets = {"length": (0, 4), "topic_len": (6, 2), "seq": (8, 8), "body_len": (16, 4)}
    start, size = offsets[field]
    at = ring.record_offset(2) + start
    ring.mm[at : at + size] = value.to_bytes(size, "little")
    batch = ring.reader().read(100, select_all)
    assert seqs(batch.records) == [0, 1]
    assert batch.corrupt == 1


def test_contradictory_header_words_count_as_corrupt_and_resync():
    ring = Ring(4096)
    ring.append(b"t", b"x")
    reader = ring.reader(cursor=ring.word(OFF_WRITE_CURSOR) + 80)  # ahead of the writer
    batch = reader.read(100, select_all)
    assert batch.corrupt == 1
    assert reader.cursor == ring.word(OFF_WRITE_CURSOR)


def test_a_flipped_body_byte_fails_the_checksum():
    ring = Ring(4096)
    for i in range(3):
        ring.append(b"topic", bytes([i]) * 20)
    at = ring.record_offset(1) + RECORD_HEADER_SIZE + len(b"topic") + 5
    ring.mm[at] ^= 0x01
    batch = ring.reader().read(100, select_all)
    assert [(seq, ok) for seq, _, _, _, ok in batch.records] == [(0, True), (1, False), (2, True)]


def test_a_flipped_topic_byte_fails_the_checksum():
    ring = Ring(4096)
    ring.append(b"topic", b"body")
    at = ring.record_offset(0) + RECORD_HEADER_SIZE
    ring.mm[at] ^= 0x20
    batch = ring.reader().read(100, select_all)
    assert batch.records == [(0, b"Topic", b"Topic", b"body", False)]


def test_the_checksum_binds_the_record_to_its_sequence_number():
    """A record copied into another sequence number's place does not verify."""
    ring = Ring(4096)
    ring.append(b"t", b"same")
    ring.append(b"t", b"same")
    first, second = ring.record_offset(0), ring.record_offset(1)
    checksum_0 = ring.mm[first + 20 : first + 24]
    ring.mm[second + 20 : second + 24] = checksum_0
    batch = ring.reader().read(100, select_all)
    assert [(seq, ok) for seq, _, _, _, ok in batch.records] == [(0, True), (1, False)]


# ─── Garbage ─────────────────────────────────────────────────────────────────

GARBAGE_CAPACITY = 1024


def check_batch(batch, limit: int) -> None:
    assert len(batch.records) <= limit
    for seq, route, topic, body, ok in batch.records:
        assert isinstance(seq, int)
        assert route == topic
        assert 0 < len(topic) <= layout.MAX_TOPIC_BYTES
        assert len(body) <= MAX_EVENT
        assert isinstance(ok, bool)


@settings(max_examples=300, deadline=None)
@given(
    ring_bytes=st.binary(min_size=GARBAGE_CAPACITY, max_size=GARBAGE_CAPACITY),
    write_cursor=st.integers(min_value=0, max_value=4 * GARBAGE_CAPACITY),
    head=st.integers(min_value=0, max_value=4 * GARBAGE_CAPACITY),
    cursor=st.integers(min_value=0, max_value=4 * GARBAGE_CAPACITY),
    next_seq=st.integers(min_value=0, max_value=2**64 - 1),
    limit=st.integers(min_value=1, max_value=50),
)
def test_random_garbage_never_breaks_the_reader(
    ring_bytes, write_cursor, head, cursor, next_seq, limit
):
    ring = Ring(GARBAGE_CAPACITY)
    ring.mm[RING_OFFSET:] = ring_bytes
    ring.set_word(OFF_WRITE_CURSOR, write_cursor)
    ring.set_word(OFF_HEAD, head)
    reader = ring.reader(cursor, next_seq)
    for _ in range(10):
        check_batch(reader.read(limit, select_all), limit)


FAKE_HEADER = st.tuples(
    st.integers(min_value=0, max_value=1100),  # topic_len
    st.integers(min_value=0, max_value=2 * MAX_EVENT),  # body_len
    st.one_of(st.none(), st.integers(min_value=0, max_value=2**32 - 1)),  # length, None: consistent
    st.sampled_from([RECORD_EVENT, RECORD_PADDING, 0, 3]),  # kind
    st.integers(min_value=0, max_value=40),  # seq
    st.integers(min_value=0, max_value=2**32 - 1),  # checksum
    st.binary(max_size=128),  # whatever follows the header
)


def garbage_records(headers) -> bytes:
    """Ring bytes made of plausible-looking record headers with random fields."""
    out = bytearray()
    for topic_len, body_len, length, kind, seq, checksum, tail in headers:
        if length is None:
            length = aligned(RECORD_HEADER_SIZE + topic_len + body_len)
        out += RECORD.pack(length, kind, topic_len, seq, body_len, checksum) + tail
        out += bytes(-len(out) % 8)
    out += bytes(max(0, GARBAGE_CAPACITY - len(out)))
    return bytes(out[:GARBAGE_CAPACITY])


@settings(max_examples=300, deadline=None)
@given(
    ring_bytes=st.lists(FAKE_HEADER, min_size=1, max_size=20).map(garbage_records),
    write_cursor=st.integers(min_value=0, max_value=3 * GARBAGE_CAPACITY).map(lambda n: n & ~7),
    limit=st.integers(min_value=1, max_value=20),
)
def test_garbage_that_looks_like_records_never_breaks_the_reader(ring_bytes, write_cursor, limit):
    ring = Ring(GARBAGE_CAPACITY)
    ring.mm[RING_OFFSET:] = ring_bytes
    ring.set_word(OFF_WRITE_CURSOR, write_cursor)
    start = max(0, write_cursor - GARBAGE_CAPACITY)
    ring.set_word(OFF_HEAD, start)
    reader = ring.reader(start, 0)
    for _ in range(10):
        check_batch(reader.read(limit, select_all), limit)


@settings(max_examples=200, deadline=None)
@given(
    scribbles=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=2047), st.integers(min_value=0, max_value=255)
        ),
        min_size=1,
        max_size=20,
    ),
    limit=st.integers(min_value=1, max_value=20),
)
def test_scribbles_over_valid_records_never_yield_a_wrong_record_that_verifies(scribbles, limit):
    """Any record the reader reports with a good checksum is one that was
    written, unchanged; everything else is flagged, counted or skipped."""
    ring = Ring(2048)
    for i in range(40):
        ring.append(f"t.{i % 7}".encode(), bytes([i]) * (i * 7 % 90))
    for offset, value in scribbles:
        ring.mm[RING_OFFSET + offset] = value
    head = ring.word(OFF_HEAD)
    oldest = min(seq for seq, (start, _, _) in ring.written.items() if start >= head)
    reader = ring.reader(ring.written[oldest][0], oldest)
    for _ in range(10):
        batch = reader.read(limit, select_all)
        check_batch(batch, limit)
        for seq, _, topic, body, ok in batch.records:
            if ok:
                assert ring.written[seq][1:] == (topic, body)


class LappingWords:
    """The ring's word view, except that the writer laps the reader right
    after the reader has loaded write_cursor: the narrowest lap there is."""

    def __init__(self, ring: Ring, records: int) -> None:
        self.ring = ring
        self.records = records
        self.armed = True

    def __getitem__(self, index: int) -> int:
        value = int(self.ring.words[index])
        if index == OFF_WRITE_CURSOR // 8 and self.armed:
            self.armed = False
            for _ in range(self.records):
                self.ring.append(b"t.x", b"x" * 100)
        return value


def test_a_lap_between_loading_write_cursor_and_head_is_a_gap_not_corruption():
    ring = Ring(4096)
    for _ in range(10):
        ring.append(b"t.x", b"x" * 100)
    reader: RingReader[bytes] = RingReader(
        ring.mm, LappingWords(ring, 100), RING_OFFSET, 4096, MAX_EVENT, 0, 0  # type: ignore[arg-type]
    )
    batch = reader.read(256, lambda topic: topic)
    assert batch.corrupt == 0
    first_seq = batch.records[0][0]
    assert batch.gaps == [(0, first_seq)]
    seqs = [record[0] for record in batch.records]
    assert seqs == list(range(first_seq, first_seq + len(seqs)))


def test_a_head_word_outside_the_ring_is_reset_by_the_next_writer():
    ring = Ring(4096)
    ring.append(b"t.x", b"x" * 100)
    ring.set_word(OFF_HEAD, 1 << 60)  # a foreign write
    reader = ring.reader()
    ring.append(b"t.x", b"y" * 100)
    assert ring.word(OFF_HEAD) <= ring.word(OFF_WRITE_CURSOR)
    assert ring.word(layout.OFF_RECLAIM_CORRUPT) == 1
    batch = reader.read(256, lambda topic: topic)
    assert [record[3] for record in batch.records][-1] == b"y" * 100


def test_a_reader_lapped_mid_batch_keeps_the_records_the_writer_did_not_reach():
    """The writer reclaims the oldest records while the reader is copying
    later ones: the intact tail of the batch is delivered, the overwritten
    front becomes a counted gap, and nothing is lost uncounted."""
    ring = Ring(8192)
    body = body_for_length(200)
    for _ in range(12):
        ring.append(b"t", body)
    reader = ring.reader()
    seen = []

    def select_while_writer_reclaims_the_front(topic: bytes) -> bytes:
        seen.append(topic)
        if len(seen) == 6:
            while ring.word(OFF_HEAD) <= ring.written[2][0]:
                ring.append(b"t", body)  # reclaims records 0..2, not the rest
        return topic

    batch = reader.read(6, select_while_writer_reclaims_the_front)
    assert batch.lapped
    kept = seqs(batch.records)
    assert kept and kept[0] > 2 and kept == list(range(kept[0], 6))
    assert batch.gaps == [(0, kept[0])]
    rest = read_all(reader)
    total = len(ring.written)
    missed = sum(end - first for first, end in batch.gaps + rest.gaps)
    assert missed + len(kept) + len(rest.records) == total


# ─── Interrupted appends and join points (writer rule 1, reader rule 5) ──────


class Interrupted(Exception):
    """What a signal handler that raises would throw into an append."""


def test_an_append_interrupted_before_its_commit_is_redone_with_the_same_number():
    ring = Ring(4096)
    ring.append(b"t", b"first")

    def interrupt() -> None:
        ring.writer.before_commit = None
        raise Interrupted

    ring.writer.before_commit = interrupt
    with pytest.raises(Interrupted):
        ring.writer.append(b"t", b"lost", content_checksum(b"t", b"lost"))
    ring.append(b"t", b"second")
    batch = ring.reader().read(100, select_all)
    assert [(seq, body) for seq, _, _, body, _ in batch.records] == [(0, b"first"), (1, b"second")]
    assert batch.gaps == [] and batch.corrupt == 0


def test_an_append_interrupted_after_its_commit_is_adopted_by_the_next():
    """The commit happened but the writer never noted it (the exception came
    right after the store): the next append must not write over it."""
    ring = Ring(4096)
    ring.append(b"t", b"first")
    noted = (ring.writer._position, ring.writer._next_seq)  # what the writer knew
    ring.append(b"t", b"committed")
    ring.writer._position, ring.writer._next_seq = noted  # as if interrupted after the commit
    ring.append(b"t", b"third")
    batch = ring.reader().read(100, select_all)
    assert [(seq, body) for seq, _, _, body, _ in batch.records] == [
        (0, b"first"),
        (1, b"committed"),
        (2, b"third"),
    ]
    assert batch.gaps == [] and batch.corrupt == 0


def test_a_snapshot_of_an_empty_ring_is_its_beginning():
    assert Ring(4096).reader().snapshot() == (0, 0)


def test_a_snapshot_is_the_position_and_number_after_the_last_committed_record():
    ring = Ring(1024)
    for _ in range(9):  # wraps, with a padding record
        ring.append(b"t", body_for_length(200))
    assert ring.reader().snapshot() == (ring.word(OFF_WRITE_CURSOR), 9)


def test_a_snapshot_between_the_writers_two_commit_stores_starts_at_the_commit():
    """The writer stored last_record for its next record but not yet
    write_cursor (writer rule 5): the snapshot must not start past
    write_cursor, and the reader then reads that record once committed."""
    ring = Ring(4096)
    ring.append(b"t", b"first")
    committed = ring.word(OFF_WRITE_CURSOR)
    ring.append(b"t", b"second")
    ring.set_word(OFF_WRITE_CURSOR, committed)  # its commit store not done yet
    reader = ring.reader()
    reader.cursor, reader.expected_seq = reader.snapshot()
    assert (reader.cursor, reader.expected_seq) == (committed, UNKNOWN_SEQ)
    ring.set_word(OFF_WRITE_CURSOR, committed + record_length(b"t", b"second"))
    batch = reader.read(10, select_all)
    assert [(seq, body) for seq, _, _, body, _ in batch.records] == [(1, b"second")]
    assert batch.corrupt == 0 and batch.gaps == []


# ─── Group records (assignments between the header and the topic) ───────────


def assignments(*named: tuple[int, int, int]) -> bytes:
    """An assignments block naming (member, generation, ordinal) per group."""
    return layout.GROUP_HEADER.pack(len(named), 0) + b"".join(
        layout.ASSIGNMENT.pack(*one) for one in named
    )


def append_group(ring: Ring, topic: bytes, body: bytes, block: bytes) -> int:
    seq = ring.writer.append(topic, body, content_checksum(topic, body), block)
    end = ring.word(OFF_WRITE_CURSOR)
    length = aligned(RECORD_HEADER_SIZE + len(block) + len(topic) + len(body))
    ring.written[seq] = (end - length, topic, body)
    return seq


def test_a_group_record_round_trips_with_its_assignments():
    ring = Ring(4096)
    block = assignments((3, 7, 1), (9, 1, 42))
    append_group(ring, b"jobs.a", b"payload", block)
    header = RECORD.unpack_from(ring.mm, ring.record_offset(0))
    assert header[1] == layout.RECORD_GROUP
    batch = ring.reader().read(100, select_all)
    assert batch.records == [(0, b"jobs.a", b"jobs.a", b"payload", True)]
    assert batch.assignments == {0: block}


def test_group_and_plain_records_interleave_in_order_and_only_group_ones_carry_assignments():
    ring = Ring(1 << 14)
    for i in range(30):
        if i % 3:
            ring.append(b"t", bytes([i]) * 9)
        else:
            append_group(ring, b"t", bytes([i]) * 9, assignments((i, 1, i + 1)))
    batch = ring.reader().read(100, select_all)
    assert [body[0] for _, _, _, body, _ in batch.records] == list(range(30))
    assert sorted(batch.assignments) == list(range(0, 30, 3))
    assert all(ok for *_, ok in batch.records)


def test_a_reader_that_keeps_up_gets_every_group_record_across_wraps():
    ring = Ring(2048)
    reader = ring.reader()
    received: list[int] = []
    for i in range(500):
        append_group(ring, b"t", bytes(i % 90), assignments((i % 5, 2, i)))
        batch = reader.read(100, select_all)
        assert not batch.gaps and not batch.corrupt
        received.extend(seqs(batch.records))
        assert all(block[8:] == layout.ASSIGNMENT.pack(seq % 5, 2, seq) for seq, block in
                   batch.assignments.items())
    assert received == list(range(500))


def test_a_flipped_assignment_byte_fails_the_checksum():
    """The checksum covers the assignments: a damaged one is never acted on."""
    ring = Ring(4096)
    for i in range(3):
        append_group(ring, b"t", b"body", assignments((1, 1, i + 1)))
    member_byte = ring.record_offset(1) + RECORD_HEADER_SIZE + layout.GROUP_HEADER.size
    ring.mm[member_byte] ^= 0x02  # names member 3 instead of 1
    batch = ring.reader().read(100, select_all)
    assert [(seq, ok) for seq, _, _, _, ok in batch.records] == [(0, True), (1, False), (2, True)]


def test_a_group_record_naming_more_groups_than_a_bus_can_hold_is_corrupt():
    """Even with a length that agrees: a reader never copies more than the
    largest assignments block a real publisher writes."""
    ring = Ring(1 << 14)
    append_group(ring, b"t", b"ok", assignments((1, 1, 1)))
    too_many = [(m, 1, 1) for m in range(layout.MAX_ASSIGNMENTS + 1)]
    append_group(ring, b"t", b"body", assignments(*too_many))
    batch = ring.reader().read(100, select_all)
    assert seqs(batch.records) == [0]
    assert batch.corrupt == 1


@pytest.mark.parametrize("count", [0, layout.MAX_ASSIGNMENTS + 1, 0xFFFFFFFF])
def test_a_group_record_with_an_impossible_assignment_count_is_corrupt(count):
    ring = Ring(4096)
    for i in range(3):
        append_group(ring, b"t", b"body", assignments((1, 1, i + 1)))
    at = ring.record_offset(2) + RECORD_HEADER_SIZE
    ring.mm[at : at + 4] = count.to_bytes(4, "little")
    reader = ring.reader()
    batch = reader.read(100, select_all)
    assert seqs(batch.records) == [0, 1]
    assert batch.corrupt == 1
    assert reader.cursor == ring.word(OFF_WRITE_CURSOR)


def test_a_group_record_whose_assignments_do_not_fit_its_length_is_corrupt():
    ring = Ring(4096)
    append_group(ring, b"t", b"body", assignments((1, 1, 1)))
    at = ring.record_offset(0) + RECORD_HEADER_SIZE
    ring.mm[at : at + 4] = (2).to_bytes(4, "little")  # says two; the length holds one
    batch = ring.reader().read(100, select_all)
    assert batch.records == [] and batch.corrupt == 1


def test_a_snapshot_after_a_group_record_starts_after_it():
    ring = Ring(4096)
    ring.append(b"t", b"plain")
    append_group(ring, b"t", b"grouped", assignments((0, 1, 1)))
    assert ring.reader().snapshot() == (ring.word(OFF_WRITE_CURSOR), 2)


# ─── Large bodies: one private copy each ─────────────────────────────────────

LARGE = 20 * 1024  # above ring.ARENA_MIN: copied into the reader's arena


def large_ring(capacity: int = 1 << 20) -> tuple[mmap.mmap, memoryview, RingWriter]:
    mm = mmap.mmap(-1, layout.ring_file_size(capacity))
    words = memoryview(mm).cast("Q")
    words[OFF_LAST_RECORD // 8] = NO_RECORD
    return mm, words, RingWriter(mm, words, RING_OFFSET, capacity, 4 * LARGE)


def test_a_large_body_read_is_a_private_copy_that_later_writes_to_the_ring_do_not_change() -> None:
    mm, words, writer = large_ring()
    body = bytes(range(256)) * (LARGE // 256)
    writer.append(b"t", body, content_checksum(b"t", body))
    reader: RingReader[bytes] = RingReader(mm, words, RING_OFFSET, 1 << 20, 4 * LARGE, 0, 0)
    batch = reader.read(10, select_all)
    ((_, _, _, copy, checksum_ok),) = batch.records
    start = RING_OFFSET + RECORD_HEADER_SIZE + 1
    mm[start : start + LARGE] = b"\xff" * LARGE  # someone scribbles on the ring
    assert checksum_ok and bytes(copy) == body


def test_large_bodies_of_successive_reads_each_arrive_intact() -> None:
    mm, words, writer = large_ring()
    bodies = [bytes([n]) * LARGE for n in range(6)]
    for body in bodies:
        writer.append(b"t", body, content_checksum(b"t", body))
    reader: RingReader[bytes] = RingReader(mm, words, RING_OFFSET, 1 << 20, 4 * LARGE, 0, 0)
    got = []
    for _ in range(3):
        batch = reader.read(2, select_all)
        # Views of the arena are valid until the next read: take them now.
        got.extend((bytes(body), ok) for _, _, _, body, ok in batch.records)
    assert got == [(body, True) for body in bodies]


def test_a_large_body_damaged_in_the_ring_fails_its_checksum() -> None:
    mm, words, writer = large_ring()
    body = b"x" * LARGE
    writer.append(b"t", body, content_checksum(b"t", body))
    start = RING_OFFSET + RECORD_HEADER_SIZE + 1 + LARGE // 2
    mm[start : start + 1] = b"y"
    reader: RingReader[bytes] = RingReader(mm, words, RING_OFFSET, 1 << 20, 4 * LARGE, 0, 0)
    ((_, _, _, _, checksum_ok),) = reader.read(10, select_all).records
    assert not checksum_ok
