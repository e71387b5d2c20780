"""shmbus._core.inspection: the read-only view of the host's buses."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from awaiting import wait_until
from cli_support import crashed_bus
from conftest import SMALL_RING

from shmbus import IncompatibleSegmentError, SegmentCorruptError, ShmBus
from shmbus._core import inspection as shm_inspect
from shmbus._core.inspection import bus_names, list_buses, read_bus
from shmbus._core.layout import (
    BUS_SEGMENT_SIZE,
    IDENTITY,
    LAYOUT_VERSION,
    MAGIC,
    SEGMENT_READY,
    ring_file_size,
)
from shmbus._core.shmfiles import bus_file_paths


@pytest.fixture
def fake_segment(bus_name: str) -> Iterator[tuple[str, str]]:
    """A hand-made file where bus *bus_name*'s segment would be."""
    path = f"/dev/shm/shmbus.{bus_name}"
    try:
        yield bus_name, path
    finally:
        if os.path.lexists(path):
            os.unlink(path)


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


async def _connected(name: str) -> ShmBus:
    bus = ShmBus(name, **SMALL_RING)
    await bus.connect()
    return bus


async def test_list_buses_names_each_bus_once_by_its_segment(bus_name: str) -> None:
    """A bus with a ring file and a wake-up FIFO besides its segment is still
    listed once."""
    bus = await _connected(bus_name)
    try:
        async with bus.subscribe("a.>"):  # creates the slot's wake-up FIFO
            bus.publish_nowait("a.b", {})  # creates the instance's ring file
            paths = bus_file_paths(bus_name)
            assert any(":wake." in p for p in paths) and any(":ring." in p for p in paths)
            assert bus_names().count(bus_name) == 1
            assert [info.name for info in list_buses()].count(bus_name) == 1
    finally:
        await bus.close()


async def test_read_bus_reports_the_segment_geometry(bus_name: str) -> None:
    bus = await _connected(bus_name)
    try:
        info = read_bus(bus_name)
    finally:
        await bus.close()
    assert info.capacity == SMALL_RING["capacity"]
    assert info.max_event_size == SMALL_RING["max_event_size"]
    assert info.segment_size == BUS_SEGMENT_SIZE  # no ring before the first publish
    assert info.rings == ()
    assert info.layout_version == LAYOUT_VERSION
    assert info.creator_pid == os.getpid()
    assert info.live


async def test_read_bus_counts_published_events_and_ring_fill(bus_name: str) -> None:
    bus = await _connected(bus_name)
    try:
        for i in range(10):
            bus.publish_nowait("orders.created", {"i": i})
        info = read_bus(bus_name)
    finally:
        await bus.close()
    (ring,) = info.rings
    assert info.published == ring.published == 10
    assert ring.write_cursor > ring.head
    assert ring.fill == pytest.approx((ring.write_cursor - ring.head) / ring.capacity)
    assert info.fill == ring.fill
    assert info.reclaim_corrupt == ring.reclaim_corrupt == 0
    assert ring.problem == ""


async def test_read_bus_describes_the_ring_of_each_publishing_instance(bus_name: str) -> None:
    """One ring per publishing instance, each with the geometry it uses, its
    writer and its own count; the bus's memory includes the ring files."""
    bus = await _connected(bus_name)
    big = ShmBus(bus_name, capacity=2 * SMALL_RING["capacity"])
    await big.connect()
    try:
        bus.publish_nowait("a.b", {})
        for _ in range(3):
            big.publish_nowait("a.b", {})
        info = read_bus(bus_name)
    finally:
        await big.close()
        await bus.close()
    rings = {ring.capacity: ring for ring in info.rings}
    assert sorted(rings) == [SMALL_RING["capacity"], 2 * SMALL_RING["capacity"]]
    small_ring, big_ring = rings[SMALL_RING["capacity"]], rings[2 * SMALL_RING["capacity"]]
    assert (small_ring.published, big_ring.published) == (1, 3)
    assert info.published == 4
    for ring in info.rings:
        assert ring.state == "live" and ring.writer_pid == os.getpid()
        assert ring.file_size == ring_file_size(ring.capacity)
        assert f"/dev/shm/shmbus.{bus_name}:ring." in ring.path
    assert info.segment_size == BUS_SEGMENT_SIZE + sum(r.file_size for r in info.rings)
    owners = {slot.ring: slot.published for slot in info.instances}
    assert owners == {small_ring.entry: 1, big_ring.entry: 3}


async def test_read_bus_lists_this_process_as_a_live_instance(bus_name: str) -> None:
    bus = await _connected(bus_name)
    try:
        bus.publish_nowait("a.b", {})
        info = read_bus(bus_name)
    finally:
        await bus.close()
    (me,) = info.instances
    (ring,) = info.rings
    assert me.pid == os.getpid()
    assert me.alive
    assert me.published == 1
    assert me.ring == ring.entry
    assert me.subscriptions == 0 and not me.reader
    assert "python" in me.command or "pytest" in me.command
    assert info.live_instances == (me,)


async def test_reader_slot_shows_delivered_events_and_no_lag_once_caught_up(
    bus_name: str,
) -> None:
    bus = await _connected(bus_name)
    try:
        async with bus.subscribe("a.>") as sub:
            for i in range(5):
                bus.publish_nowait("a.b", {"i": i})
            for _ in range(5):
                await anext(aiter(sub))
            # The reader writes its slot's counters once its consumers ran.
            await wait_until(
                lambda: read_bus(bus_name).instances[0].delivered == 5, what="the counters"
            )
            info = read_bus(bus_name)
    finally:
        await bus.close()
    (me,) = info.instances
    assert me.reader and me.subscriptions == 1
    assert me.delivered == 5
    assert me.dropped == 0 and me.corrupt == 0 and me.lapped == 0
    assert me.lag_bytes == 0
    assert info.readers == 1


async def test_inspecting_takes_no_lock(bus_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> bool:
        raise AssertionError("inspect must only query locks, never take one")

    bus = await _connected(bus_name)
    try:
        monkeypatch.setattr(shm_inspect.ofd, "try_lock", refuse)
        monkeypatch.setattr(shm_inspect.ofd, "wait_lock", refuse)
        read_bus(bus_name)
        list_buses()
        monkeypatch.undo()
    finally:
        await bus.close()
    assert bus_file_paths(bus_name) == []  # the last instance still removed the bus


def test_instances_of_a_killed_process_are_reported_dead(bus_name: str) -> None:
    with crashed_bus(bus_name):
        info = read_bus(bus_name)
    assert not info.live
    assert info.instances, "the killed child's slot should still be described"
    assert not any(slot.alive for slot in info.instances)
    assert info.live_instances == ()
    (ring,) = info.rings  # the child published once before it was killed
    assert ring.state == "dead" and ring.published == 1


def test_read_bus_of_a_missing_bus_raises_file_not_found(bus_name: str) -> None:
    with pytest.raises(FileNotFoundError, match=bus_name):
        read_bus(bus_name)


def test_read_bus_rejects_an_invalid_name() -> None:
    with pytest.raises(ValueError, match="may only contain"):
        read_bus("no/slashes")


def test_read_bus_rejects_a_file_that_is_not_a_segment(
    fake_segment: tuple[str, str],
) -> None:
    name, path = fake_segment
    _write(path, b"\x5a" * BUS_SEGMENT_SIZE)
    with pytest.raises(SegmentCorruptError, match="not a shmbus segment"):
        read_bus(name)


def test_read_bus_rejects_a_truncated_segment(fake_segment: tuple[str, str]) -> None:
    name, path = fake_segment
    _write(path, b"\0" * 100)
    with pytest.raises(SegmentCorruptError, match=f"100 bytes, not {BUS_SEGMENT_SIZE}"):
        read_bus(name)


def test_read_bus_rejects_a_segment_of_another_layout_version(
    fake_segment: tuple[str, str],
) -> None:
    name, path = fake_segment
    segment = bytearray(BUS_SEGMENT_SIZE)
    magic = (MAGIC & 0x00FFFFFFFFFFFFFF) | ((LAYOUT_VERSION + 1) << 56)
    IDENTITY.pack_into(
        segment, 0, magic, LAYOUT_VERSION + 1, SEGMENT_READY, 1 << 20, 1024, 1, 0, 0o600, 0, 0
    )
    _write(path, bytes(segment))
    with pytest.raises(IncompatibleSegmentError, match=f"version {LAYOUT_VERSION + 1}"):
        read_bus(name)


def test_read_bus_names_the_old_layout_version_of_a_version_1_segment(
    fake_segment: tuple[str, str],
) -> None:
    """A segment of the first layout (one shared ring) is recognised by its
    magic and version, and refused naming both versions."""
    name, path = fake_segment
    _write(path, b"SHMBUS\x00\x01" + (1).to_bytes(4, "little") + bytes(4096 - 12))
    with pytest.raises(IncompatibleSegmentError) as info:
        read_bus(name)
    assert "version 1" in str(info.value) and f"version {LAYOUT_VERSION}" in str(info.value)


def test_list_buses_reports_an_unreadable_bus_to_on_error(
    fake_segment: tuple[str, str],
) -> None:
    name, path = fake_segment
    _write(path, b"\x5a" * BUS_SEGMENT_SIZE)
    errors: dict[str, Exception] = {}
    buses = list_buses(on_error=errors.__setitem__)
    assert name not in [info.name for info in buses]
    assert isinstance(errors[name], SegmentCorruptError)


async def test_read_bus_reports_each_queue_group_with_its_live_members(bus_name: str) -> None:
    publisher, worker = await _connected(bus_name), await _connected(bus_name)
    try:
        mine = worker.subscribe("jobs.>", queue="workers")
        publisher.subscribe("jobs.>", queue="workers")
        publisher.subscribe("jobs.>")  # a plain subscription is no group's
        for i in range(6):
            await publisher.publish("jobs.x", {"i": i})
        for _ in range(3):
            await anext(mine)
        (group,) = read_bus(bus_name).groups
        assert (group.queue, group.pattern) == ("workers", "jobs.>")
        assert sorted(m.assigned for m in group.members) == [3, 3]  # idle members alternate
        assert [m.delivered for m in group.members if m.slot == worker._segment.slot] == [3]
        assert all(m.alive and m.pid == os.getpid() for m in group.members)
        assert (group.delivered, group.dropped) == (3, 0)
    finally:
        await worker.close()
        await publisher.close()
