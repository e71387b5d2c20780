"""Prometheus exposition of every bus on this host (``shmbus metrics``).

Owns
----
:class:`BusCollector`, which turns :func:`shmbus._core.inspection.list_buses` into
Prometheus metric families, and :func:`serve`, which serves them over HTTP.
Needs the optional ``prometheus-client`` package: without it, importing this
module raises :class:`~shmbus.errors.MissingExtraError`, whose message names
the command that installs it (``pip install 'shmbus[metrics]'``).

Invariants
----------
* Every scrape reads the buses afresh, read-only, through
  :mod:`shmbus._core.inspection` (no lock is taken, no bus is joined), so an exporter
  never keeps a bus alive nor changes what it reports.
* Counters are the ones kept in the segment: per bus since the segment was
  created (exposed as its ``_created`` time, so a recreated bus reads as a
  counter reset), per instance since it connected. Only live instances are
  exported, labelled ``bus``, ``slot`` and ``pid``.
* Queue groups are labelled ``bus``, ``queue`` and ``pattern``: the group's
  delivered and dropped events since the bus was created (departed members
  included), and each current member's, also labelled ``slot`` and ``pid``.
* A bus that cannot be read is exported as ``shmbus_bus_readable{bus} 0``
  instead of failing the scrape.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from wsgiref.simple_server import WSGIServer

from .errors import MissingExtraError

try:
    from prometheus_client import start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector, CollectorRegistry
except ImportError as exc:  # the optional extra is not installed
    if exc.name is not None and exc.name.split(".")[0] == "prometheus_client":
        raise MissingExtraError("metrics", exc.name) from exc
    raise

from ._core.inspection import BusInfo, list_buses

__all__ = ["BusCollector", "serve"]

log = logging.getLogger("shmbus.metrics")

_BUS = ["bus"]
_INSTANCE = ["bus", "slot", "pid"]
_GROUP = ["bus", "queue", "pattern"]
_MEMBER = [*_GROUP, "slot", "pid"]


class BusCollector(Collector):
    """Collects the figures of ``shmbus stat`` for every bus, on each scrape."""

    def collect(self) -> Iterable[Metric]:
        unreadable: list[str] = []

        def on_error(name: str, exc: Exception) -> None:
            log.warning("cannot read bus %r: %s", name, exc)
            unreadable.append(name)

        buses = list_buses(on_error=on_error)
        yield from self._families(buses, unreadable)

    def describe(self) -> Iterable[Metric]:
        return []  # the families depend on what is found at scrape time

    @staticmethod
    def _families(buses: list[BusInfo], unreadable: list[str]) -> Iterable[Metric]:
        readable = GaugeMetricFamily(
            "shmbus_bus_readable",
            "1 if the bus's segment could be read, 0 if it is damaged or of another version",
            labels=_BUS,
        )
        live = GaugeMetricFamily(
            "shmbus_bus_live", "1 if a process is attached to the bus", labels=_BUS
        )
        segment = GaugeMetricFamily(
            "shmbus_segment_size_bytes",
            "Bytes of the bus's files in /dev/shm (segment and rings)",
            labels=_BUS,
        )
        capacity = GaugeMetricFamily(
            "shmbus_ring_capacity_bytes",
            "Ring size instances use unless they choose their own",
            labels=_BUS,
        )
        fill = GaugeMetricFamily(
            "shmbus_ring_fill_ratio",
            "Share of the fullest ring holding records (0..1)",
            labels=_BUS,
        )
        instances = GaugeMetricFamily(
            "shmbus_instances", "Live bus instances attached", labels=_BUS
        )
        readers = GaugeMetricFamily(
            "shmbus_readers", "Live instances with subscriptions", labels=_BUS
        )
        published = GaugeMetricFamily(
            "shmbus_ring_events",
            "Events committed to the rings that exist now (a ring's go when it is reclaimed)",
            labels=_BUS,
        )
        rings = GaugeMetricFamily(
            "shmbus_rings", "Publisher rings of the bus, by state", labels=[*_BUS, "state"]
        )
        i_published = CounterMetricFamily(
            "shmbus_instance_published", "Events the instance published", labels=_INSTANCE
        )
        i_delivered = CounterMetricFamily(
            "shmbus_instance_delivered",
            "Events handed to the instance's subscriptions",
            labels=_INSTANCE,
        )
        i_dropped = CounterMetricFamily(
            "shmbus_instance_dropped",
            "Events the instance's subscriptions should have had but lost (queue full, lapped)",
            labels=_INSTANCE,
        )
        i_corrupt = CounterMetricFamily(
            "shmbus_instance_corrupt",
            "Unreadable records met by the instance's reader",
            labels=_INSTANCE,
        )
        i_lapped = CounterMetricFamily(
            "shmbus_instance_lapped",
            "Records the instance's reader skipped: writers lapped it",
            labels=_INSTANCE,
        )
        i_lag = GaugeMetricFamily(
            "shmbus_instance_lag_bytes",
            "Bytes the instance's reader is behind the writers",
            labels=_INSTANCE,
        )
        i_subs = GaugeMetricFamily(
            "shmbus_instance_subscriptions", "Subscriptions open in the instance", labels=_INSTANCE
        )
        g_members = GaugeMetricFamily(
            "shmbus_group_members", "Live members of the queue group", labels=_GROUP
        )
        g_delivered = CounterMetricFamily(
            "shmbus_group_delivered",
            "Events the queue group's members delivered (departed members included)",
            labels=_GROUP,
        )
        g_dropped = CounterMetricFamily(
            "shmbus_group_dropped",
            "Events assigned to the group's members and never delivered (lost, or left "
            "behind by a member that closed or died)",
            labels=_GROUP,
        )
        m_assigned = CounterMetricFamily(
            "shmbus_group_member_assigned",
            "Events the publishers assigned to this member",
            labels=_MEMBER,
        )
        m_delivered = CounterMetricFamily(
            "shmbus_group_member_delivered",
            "Events this member's consumer took",
            labels=_MEMBER,
        )
        m_dropped = CounterMetricFamily(
            "shmbus_group_member_dropped",
            "Events assigned to this member that it lost",
            labels=_MEMBER,
        )
        for info in buses:
            bus = [info.name]
            readable.add_metric(bus, 1)
            live.add_metric(bus, 1 if info.live else 0)
            segment.add_metric(bus, info.segment_size)
            capacity.add_metric(bus, info.capacity)
            fill.add_metric(bus, info.fill)
            instances.add_metric(bus, len(info.live_instances))
            readers.add_metric(bus, info.readers)
            published.add_metric(bus, info.published)
            states: dict[str, int] = {}
            for ring in info.rings:
                states[ring.state] = states.get(ring.state, 0) + 1
            for state, count in sorted(states.items()):
                rings.add_metric([info.name, state], count)
            for slot in info.live_instances:
                labels = [info.name, str(slot.slot), str(slot.pid)]
                i_published.add_metric(labels, slot.published)
                i_delivered.add_metric(labels, slot.delivered)
                i_dropped.add_metric(labels, slot.dropped)
                i_corrupt.add_metric(labels, slot.corrupt)
                i_lapped.add_metric(labels, slot.lapped)
                i_lag.add_metric(labels, slot.lag_bytes)
                i_subs.add_metric(labels, slot.subscriptions)
            for group in info.groups:
                labels = [info.name, group.queue, group.pattern]
                g_members.add_metric(labels, sum(1 for m in group.members if m.alive))
                g_delivered.add_metric(labels, group.delivered)
                g_dropped.add_metric(labels, group.dropped)
                for member in group.members:
                    if not member.alive:
                        continue
                    member_labels = [*labels, str(member.slot), str(member.pid)]
                    m_assigned.add_metric(member_labels, member.assigned)
                    m_delivered.add_metric(member_labels, member.delivered)
                    m_dropped.add_metric(member_labels, member.dropped)
        for name in unreadable:
            readable.add_metric([name], 0)
        yield from (
            readable,
            live,
            segment,
            capacity,
            fill,
            instances,
            readers,
            published,
            rings,
            i_published,
            i_delivered,
            i_dropped,
            i_corrupt,
            i_lapped,
            i_lag,
            i_subs,
            g_members,
            g_delivered,
            g_dropped,
            m_assigned,
            m_delivered,
            m_dropped,
        )


def registry() -> CollectorRegistry:
    """A registry holding only a :class:`BusCollector`."""
    result = CollectorRegistry(auto_describe=False)
    result.register(BusCollector())
    return result


def serve(host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
    """Serve the metrics on http://HOST:PORT/metrics from a daemon thread.

    *port* 0 picks a free port (read it from ``server.server_address``).
    Stop with ``server.shutdown()``.
    """
    server, thread = start_http_server(port, addr=host, registry=registry())
    log.info("serving metrics on %s:%d", *server.server_address[:2])
    return server, thread
