"""shmbus.inspect: the read-only view of the host's buses."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from cli_support import crashed_bus
from conftest import SMALL_RING

from shmbus import IncompatibleSegmentError, SegmentCorruptError, ShmBus
from shmbus import inspect as shm_inspect
from shmbus.inspect import bus_names, list_buses, read_bus
from shmbus.layout import HEADER_SIZE, IDENTITY, LAYOUT_VERSION, MAGIC, RING_OFFSET, segment_size
from shmbus.segment import resource_paths


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
    bus = await _connected(bus_name)
    try:
        async with bus.subscribe("a.>"):  # creates the slot's wake-up FIFO
            assert any(":wake." in p for p in resource_paths(bus_name))
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
    assert info.segment_size == segment_size(SMALL_RING["capacity"])
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
    assert info.published == 10
    assert info.next_seq == 10
    assert info.write_cursor > info.head
    assert info.fill == pytest.approx((info.write_cursor - info.head) / info.capacity)
    assert info.torn_records == 0 and info.lock_recoveries == 0


async def test_read_bus_lists_this_process_as_a_live_instance(bus_name: str) -> None:
    bus = await _connected(bus_name)
    try:
        bus.publish_nowait("a.b", {})
        info = read_bus(bus_name)
    finally:
        await bus.close()
    (me,) = info.instances
    assert me.pid == os.getpid()
    assert me.alive
    assert me.published == 1
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
            info = read_bus(bus_name)
    finally:
        await bus.close()
    (me,) = info.instances
    assert me.reader and me.subscriptions == 1
    assert me.delivered == 5
    assert me.dropped == 0 and me.corrupt == 0 and me.lapped == 0
    assert me.read_cursor == info.write_cursor
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
    assert resource_paths(bus_name) == []  # the last instance still removed the bus


def test_instances_of_a_killed_process_are_reported_dead(bus_name: str) -> None:
    with crashed_bus(bus_name):
        info = read_bus(bus_name)
    assert not info.live
    assert info.instances, "the killed child's slot should still be described"
    assert not any(slot.alive for slot in info.instances)
    assert info.live_instances == ()


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
    _write(path, b"\x5a" * HEADER_SIZE)
    with pytest.raises(SegmentCorruptError, match="not a shmbus segment"):
        read_bus(name)


def test_read_bus_rejects_a_truncated_segment(fake_segment: tuple[str, str]) -> None:
    name, path = fake_segment
    _write(path, b"\0" * 100)
    with pytest.raises(SegmentCorruptError, match="truncated"):
        read_bus(name)


def test_read_bus_rejects_a_segment_of_another_layout_version(
    fake_segment: tuple[str, str],
) -> None:
    name, path = fake_segment
    header = bytearray(HEADER_SIZE)
    IDENTITY.pack_into(
        header, 0, MAGIC, LAYOUT_VERSION + 1, 0, 1 << 20, 1024, RING_OFFSET, 1, 0, 0o600, 0
    )
    _write(path, bytes(header))
    with pytest.raises(IncompatibleSegmentError, match=f"version {LAYOUT_VERSION + 1}"):
        read_bus(name)


def test_list_buses_reports_an_unreadable_bus_to_on_error(
    fake_segment: tuple[str, str],
) -> None:
    name, path = fake_segment
    _write(path, b"\x5a" * HEADER_SIZE)
    errors: dict[str, Exception] = {}
    buses = list_buses(on_error=errors.__setitem__)
    assert name not in [info.name for info in buses]
    assert isinstance(errors[name], SegmentCorruptError)
