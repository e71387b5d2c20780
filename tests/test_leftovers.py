"""shmbus.cleanup: removing the files of buses with no live process."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from cli_support import crashed_bus
from conftest import SESSION_TAG, SMALL_RING

from shmbus import ShmBus
from shmbus._core.leftovers import BusInUseError, cleanup, cleanup_report, leftover_names
from shmbus._core.shmfiles import bus_file_paths, fifo_path, ring_path


@pytest.fixture
def orphans(bus_name: str) -> Iterator[list[str]]:
    """A ring file and a FIFO of bus *bus_name*, with no segment."""
    with open(ring_path(bus_name, 0x1234), "xb") as ring:
        ring.write(bytes(4096))
    os.mkfifo(fifo_path(bus_name, 3), 0o600)
    try:
        paths = sorted(bus_file_paths(bus_name))
        assert len(paths) == 2, paths
        yield paths
    finally:
        cleanup(bus_name, force=True)


def test_cleanup_removes_every_file_of_a_bus_whose_processes_all_died(bus_name: str) -> None:
    with crashed_bus(bus_name) as left:
        assert any(":ring." in path for path in left)
        assert any(":wake." in path for path in left)
        removed = cleanup(bus_name)
        assert sorted(removed) == sorted(left)
        assert bus_file_paths(bus_name) == []


async def test_cleanup_refuses_a_live_bus_and_names_its_process(bus_name: str) -> None:
    bus = ShmBus(bus_name, **SMALL_RING)
    await bus.connect()
    try:
        with pytest.raises(BusInUseError, match=rf"{bus_name}.*live.*pid {os.getpid()}"):
            cleanup(bus_name)
        assert f"/dev/shm/shmbus.{bus_name}" in bus_file_paths(bus_name)
    finally:
        await bus.close()


async def test_cleanup_force_removes_a_live_bus_whose_instance_keeps_working(
    bus_name: str,
) -> None:
    bus = ShmBus(bus_name, **SMALL_RING)
    await bus.connect()
    try:
        async with bus.subscribe("a.>") as sub:
            removed = cleanup(bus_name, force=True)
            assert f"/dev/shm/shmbus.{bus_name}" in removed
            assert bus_file_paths(bus_name) == []
            bus.publish_nowait("a.b", {"after": "force"})
            event = await anext(aiter(sub))
            assert event.payload == {"after": "force"}
    finally:
        await bus.close()
    assert bus_file_paths(bus_name) == []


def test_cleanup_removes_an_orphaned_ring_and_fifo(bus_name: str, orphans: list[str]) -> None:
    assert f"/dev/shm/shmbus.{bus_name}" not in orphans
    removed = cleanup(bus_name)
    assert sorted(removed) == orphans
    assert bus_file_paths(bus_name) == []


def test_cleanup_of_a_bus_with_no_files_removes_nothing(bus_name: str) -> None:
    assert cleanup(bus_name) == []
    assert bus_file_paths(bus_name) == []


def test_cleanup_rejects_an_invalid_bus_name() -> None:
    with pytest.raises(ValueError, match="may only contain"):
        cleanup("../etc")


def test_leftover_names_finds_buses_by_any_of_their_files(
    bus_name: str, orphans: list[str]
) -> None:
    assert bus_name in leftover_names()


async def test_cleanup_of_every_bus_skips_a_live_one_and_removes_a_dead_one(
    bus_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = bus_name + "-dead"
    # Only this session's buses: others' tests run on the same host.
    monkeypatch.setattr(
        "shmbus._core.leftovers.leftover_names",
        lambda: [name for name in leftover_names() if name.startswith(SESSION_TAG + "-")],
    )
    bus = ShmBus(bus_name, **SMALL_RING)
    await bus.connect()
    try:
        with crashed_bus(dead) as left:
            report = cleanup_report()
            assert sorted(report.removed) == sorted(left)
            assert "live" in report.skipped[bus_name]
            assert f"/dev/shm/shmbus.{bus_name}" in bus_file_paths(bus_name)
    finally:
        await bus.close()


async def test_connect_recovers_a_bus_whose_processes_all_crashed(bus_name: str) -> None:
    with crashed_bus(bus_name):
        bus = ShmBus(bus_name, **SMALL_RING)
        await bus.connect()
        try:
            async with bus.subscribe("a.>") as sub:
                bus.publish_nowait("a.b", {"n": 1})
                event = await anext(aiter(sub))
            assert event.payload == {"n": 1}
        finally:
            await bus.close()
        assert bus_file_paths(bus_name) == []


async def test_closing_an_instance_of_a_force_removed_bus_spares_the_new_bus(
    bus_name: str,
) -> None:
    old = ShmBus(bus_name, **SMALL_RING)
    await old.connect()
    new = ShmBus(bus_name, **SMALL_RING)
    try:
        cleanup(bus_name, force=True)
        await new.connect()
        files = bus_file_paths(bus_name)
        await old.close()
        assert bus_file_paths(bus_name) == files
    finally:
        await old.close()
        await new.close()
