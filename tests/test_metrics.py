"""``shmbus metrics``: Prometheus exposition of every bus on the host."""

from __future__ import annotations

import asyncio
import os
import signal
import urllib.request

import prometheus_client
from awaiting import wait_until
from cli_support import DEADLINE, LineReader, shmbus_command, started
from conftest import SMALL_RING
from prometheus_client.parser import text_string_to_metric_families

from shmbus import QueueSubscription, ShmBus
from shmbus._core.inspection import read_bus
from shmbus._core.layout import BUS_SEGMENT_SIZE, ring_file_size
from shmbus.metrics import registry

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def _scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=DEADLINE) as response:
        assert response.status == 200
        return _parse(response.read().decode("utf-8"))


def _bus_value(samples: Samples, name: str, bus: str) -> float:
    return samples[(name, frozenset({("bus", bus)}))]


def _instance_value(samples: Samples, name: str, bus: str, pid: int) -> float:
    (value,) = [
        v
        for (sample, labels), v in samples.items()
        if sample == name and ("bus", bus) in labels and ("pid", str(pid)) in labels
    ]
    return value


async def _publish_and_consume(bus: ShmBus, sub: QueueSubscription, count: int) -> None:
    for i in range(count):
        bus.publish_nowait("metrics.test", {"i": i})
    for _ in range(count):
        await anext(sub)
    # The reader writes its slot's counters (what a scrape reads) once its
    # consumers ran.
    await wait_until(
        lambda: all(
            s.delivered == sub.delivered
            for s in read_bus(bus.name).instances
            if s.pid == os.getpid()
        ),
        what="the slot's counters",
    )


async def test_metrics_endpoint_counters_move_between_scrapes(bus_name: str) -> None:
    bus = ShmBus(bus_name, **SMALL_RING)
    await bus.connect()
    try:
        with started(shmbus_command("metrics", "--listen", "127.0.0.1:0")) as server:
            assert server.stdout is not None
            announced = LineReader(server.stdout).next_line()
            url = announced.rsplit(" ", 1)[-1]
            assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
            async with bus.subscribe("metrics.>") as sub:
                await _publish_and_consume(bus, sub, 5)
                first = await asyncio.to_thread(_scrape, url)
                await _publish_and_consume(bus, sub, 7)
                second = await asyncio.to_thread(_scrape, url)
            server.send_signal(signal.SIGTERM)
            _, err = server.communicate(timeout=DEADLINE)
            assert server.returncode == 0, err
    finally:
        await bus.close()
    me = os.getpid()
    assert _bus_value(first, "shmbus_ring_events", bus_name) == 5
    assert _bus_value(second, "shmbus_ring_events", bus_name) == 12
    assert _instance_value(first, "shmbus_instance_published_total", bus_name, me) == 5
    assert _instance_value(second, "shmbus_instance_published_total", bus_name, me) == 12
    assert second[("shmbus_rings", frozenset({("bus", bus_name), ("state", "live")}))] == 1
    segment_bytes = BUS_SEGMENT_SIZE + ring_file_size(SMALL_RING["capacity"])
    assert _bus_value(second, "shmbus_segment_size_bytes", bus_name) == segment_bytes
    assert _instance_value(first, "shmbus_instance_delivered_total", bus_name, me) == 5
    assert _instance_value(second, "shmbus_instance_delivered_total", bus_name, me) == 12
    assert _instance_value(second, "shmbus_instance_dropped_total", bus_name, me) == 0
    assert _instance_value(second, "shmbus_instance_lag_bytes", bus_name, me) == 0
    assert _bus_value(second, "shmbus_bus_live", bus_name) == 1
    assert _bus_value(second, "shmbus_readers", bus_name) == 1
    assert 0 < _bus_value(second, "shmbus_ring_fill_ratio", bus_name) < 1


async def test_collector_reports_an_unreadable_bus_without_failing(bus_name: str) -> None:
    path = f"/dev/shm/shmbus.{bus_name}"
    with open(path, "wb") as f:
        f.write(b"\x5a" * 64)
    try:
        samples = _parse(prometheus_client.generate_latest(registry()).decode("utf-8"))
    finally:
        os.unlink(path)
    assert _bus_value(samples, "shmbus_bus_readable", bus_name) == 0


async def test_queue_groups_are_exported_with_their_members(bus_name: str) -> None:
    bus = ShmBus(bus_name, **SMALL_RING)
    await bus.connect()
    try:
        async with bus.subscribe("metrics.>", queue="workers") as sub:
            await _publish_and_consume(bus, sub, 3)
            bus.publish_nowait("metrics.test", {"left": "behind"})
            samples = _parse(prometheus_client.generate_latest(registry()).decode("utf-8"))
    finally:
        await bus.close()
    group = frozenset({("bus", bus_name), ("queue", "workers"), ("pattern", "metrics.>")})
    assert samples[("shmbus_group_members", group)] == 1
    assert samples[("shmbus_group_delivered_total", group)] == 3
    assert samples[("shmbus_group_dropped_total", group)] == 0
    me = group | {("pid", str(os.getpid()))}
    (assigned,) = [
        value
        for (name, labels), value in samples.items()
        if name == "shmbus_group_member_assigned_total" and me <= labels
    ]
    assert assigned == 4
