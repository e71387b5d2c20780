"""The shm <-> NATS bridge, run as real processes against a real nats-server.

Two shm buses stand for two hosts; each is bridged to the same nats-server
by its own bridge process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import sys
from collections.abc import AsyncIterator, Iterator

import pytest
from awaiting import take
from conftest import SMALL_RING, new_bus_name
from shmbus_tools.servers import NatsServer

from shmbus import ShmBus
from shmbus._core.shmfiles import bus_file_paths
from shmbus.bridge import Bridge, add_arguments, main
from shmbus.nats import NatsBus

READY_TIMEOUT = 20.0


def shm_url(name: str) -> str:
    """The URL of bus *name* with the geometry the tests use."""
    return "shm://{}?capacity={capacity}&max_event_size={max_event_size}".format(name, **SMALL_RING)


class BridgeProcess:
    """``python -m shmbus.bridge`` in a subprocess, its log kept."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.log: list[str] = []

    @classmethod
    async def start(cls, *args: str) -> BridgeProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "shmbus.bridge",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        bridge = cls(process)
        try:
            await asyncio.wait_for(bridge._read_until("bridge ready"), READY_TIMEOUT)
        except BaseException:
            await bridge.kill()
            raise
        return bridge

    async def _read_until(self, marker: str) -> None:
        assert self.process.stderr is not None
        while True:
            line = await self.process.stderr.readline()
            if not line:
                raise AssertionError(f"bridge exited before {marker!r}:\n" + "".join(self.log))
            self.log.append(line.decode())
            if marker in self.log[-1]:
                return

    async def terminate(self) -> tuple[int, dict[str, int]]:
        """SIGTERM; return the exit status and the counters it logged."""
        self.process.send_signal(signal.SIGTERM)
        assert self.process.stderr is not None
        rest = await asyncio.wait_for(self.process.stderr.read(), READY_TIMEOUT)
        self.log.append(rest.decode())
        status = await asyncio.wait_for(self.process.wait(), READY_TIMEOUT)
        text = "".join(self.log)
        found = re.search(r"bridge stopped: (.*)", text)
        assert found, f"no counters in the bridge's log:\n{text}"
        counters = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", found.group(1))}
        return status, counters

    async def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    with NatsServer() as server:
        yield server


@pytest.fixture
async def hosts(bus_name: str) -> AsyncIterator[tuple[ShmBus, ShmBus]]:
    """The shm buses of host A and host B, connected."""
    host_a = ShmBus(bus_name, **SMALL_RING)
    host_b = ShmBus(new_bus_name("host-b"), **SMALL_RING)
    await host_a.connect()
    await host_b.connect()
    try:
        yield host_a, host_b
    finally:
        await host_a.close()
        await host_b.close()


async def test_event_crosses_hosts_once_with_its_envelope_and_never_echoes_back(
    nats_server: NatsServer, hosts: tuple[ShmBus, ShmBus]
) -> None:
    host_a, host_b = hosts
    sub_a, sub_b = host_a.subscribe("demo.>"), host_b.subscribe("demo.>")
    bridges = []
    try:
        for bus in hosts:
            bridges.append(
                await BridgeProcess.start(
                    "--bus",
                    shm_url(bus.name),
                    "--nats",
                    nats_server.url,
                    "--export",
                    "demo.>",
                    "--import",
                    "demo.>",
                )
            )
        # E from A; a reply from B; another from A; another from B. An echo
        # would arrive as a fifth event, a repeated id among the four taken.
        await host_a.publish("demo.order", {"n": 1}, event_type="order")
        [original] = await take(sub_a, 1)
        [relayed] = await take(sub_b, 1)
        await host_b.publish("demo.reply", {"n": 2})
        await host_a.publish("demo.order", {"n": 3})
        await host_b.publish("demo.reply", {"n": 4})
        seen_a = [original, *await take(sub_a, 3)]
        seen_b = [relayed, *await take(sub_b, 3)]
        results = [await bridge.terminate() for bridge in bridges]
    finally:
        for bridge in bridges:
            await bridge.kill()
        await sub_a.aclose()
        await sub_b.aclose()

    assert relayed == original  # id, ts, type, v, payload and topic
    payloads_a = [e.payload["n"] for e in seen_a]
    payloads_b = [e.payload["n"] for e in seen_b]
    # Order holds per publisher only: on A, B's 2 and 4 come from bridge A's
    # ring and A's own 3 from the test's, and A's reader may take either ring
    # first; on B, 2 and 4 come from B's own ring. (1 is first on both: it
    # was taken before the others were published.)
    assert sorted(payloads_a) == [1, 2, 3, 4]
    assert payloads_a.index(2) < payloads_a.index(4)
    assert sorted(payloads_b) == [1, 2, 3, 4]
    assert payloads_b.index(2) < payloads_b.index(4)
    assert len({e.id for e in seen_a}) == 4 and {e.id for e in seen_a} == {e.id for e in seen_b}
    (status_a, counters_a), (status_b, counters_b) = results
    assert (status_a, status_b) == (0, 0)
    assert (counters_a["exported"], counters_a["imported"]) == (2, 2)
    assert (counters_b["exported"], counters_b["imported"]) == (2, 2)


async def test_bridge_relays_only_matching_topics(
    nats_server: NatsServer, hosts: tuple[ShmBus, ShmBus]
) -> None:
    host_a, host_b = hosts
    sub_b = host_b.subscribe(">")
    bridges = []
    try:
        bridges.append(
            await BridgeProcess.start(
                "--bus",
                shm_url(host_a.name),
                "--nats",
                nats_server.url,
                "--export",
                "public.*",
            )
        )
        bridges.append(
            await BridgeProcess.start(
                "--bus",
                shm_url(host_b.name),
                "--nats",
                nats_server.url,
                "--import",
                "public.>",
            )
        )
        await host_a.publish("private.note", {})
        await host_a.publish("public.note", {})
        [event] = await take(sub_b, 1)
        results = [await bridge.terminate() for bridge in bridges]
    finally:
        for bridge in bridges:
            await bridge.kill()
        await sub_b.aclose()
    assert event.topic == "public.note"
    assert [status for status, _ in results] == [0, 0]
    assert results[0][1]["exported"] == 1


async def test_bridge_without_patterns_exits_with_status_2(bus_name: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shmbus.bridge",
        "--bus",
        bus_name,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), READY_TIMEOUT)
    assert process.returncode == 2
    assert b"at least one export or import pattern" in stderr


@pytest.mark.parametrize("option", ["--queue-size", "--memory"])
def test_a_bridge_option_below_one_exits_2_naming_the_option_and_the_limit(
    option: str, bus_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--bus", bus_name, "--export", "a.>", option, "0"])
    assert main(args) == 2
    assert f"{option} must be at least 1, got 0" in caplog.text
    assert bus_file_paths(bus_name) == []


def test_bridge_rejects_an_invalid_pattern() -> None:
    with pytest.raises(ValueError, match="'>' is only allowed as the last token"):
        Bridge(ShmBus("unused"), NatsBus(), export=["a.>.b"])


async def test_bridge_stops_cleanly_when_asked(nats_server: NatsServer, bus_name: str) -> None:
    bridge = Bridge(
        ShmBus(bus_name, **SMALL_RING),
        NatsBus(nats_server.url, no_echo=True),
        export=["x.>"],
        import_=["y.>"],
    )
    stop = asyncio.Event()
    runner = asyncio.create_task(bridge.run(stop))
    await asyncio.wait_for(bridge.ready.wait(), READY_TIMEOUT)
    stop.set()
    await asyncio.wait_for(runner, READY_TIMEOUT)
    assert bridge.counters()["exported"] == 0


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def test_a_traceparent_crosses_the_bridge_in_both_directions(
    nats_server: NatsServer, hosts: tuple[ShmBus, ShmBus]
) -> None:
    """Set on host A's shm bus, read on NATS and on host B's shm bus; set
    on NATS, read on host A's shm bus."""
    host_a, host_b = hosts
    remote = NatsBus(nats_server.url, connect_timeout=5)
    await remote.connect()
    sub_b, sub_nats, back_a = host_b.subscribe("trace.>"), remote.subscribe("trace.>"), None
    bridges = []
    try:
        for bus in hosts:
            bridges.append(
                await BridgeProcess.start(
                    "--bus",
                    shm_url(bus.name),
                    "--nats",
                    nats_server.url,
                    "--export",
                    "trace.>",
                    "--import",
                    "trace.>",
                    "back.>",
                )
            )
        back_a = host_a.subscribe("back.>")
        await remote.flush()
        await host_a.publish("trace.a", {"n": 1}, headers={"traceparent": TRACEPARENT})
        [on_nats] = await take(sub_nats, 1)
        [on_b] = await take(sub_b, 1)
        await remote.publish("back.x", {"n": 2}, headers={"traceparent": TRACEPARENT})
        [on_a] = await take(back_a, 1)
    finally:
        for bridge in bridges:
            await bridge.kill()
        for sub in (sub_b, sub_nats, back_a):
            if sub is not None:
                await sub.aclose()
        await remote.close()
    for event in (on_nats, on_b, on_a):
        assert event.headers == {"traceparent": TRACEPARENT}
    assert on_b.id == on_nats.id


async def test_a_request_crosses_the_bridges_when_they_relay_the_inbox_topics(
    nats_server: NatsServer, hosts: tuple[ShmBus, ShmBus]
) -> None:
    """A requester on host A, a responder on host B: the request and its
    reply are ordinary events, relayed like any other when the bridges
    export and import the service's topics and ``_INBOX.>``."""
    host_a, host_b = hosts
    requests = host_b.subscribe("svc.>")
    bridges = []
    try:
        for bus in hosts:
            bridges.append(
                await BridgeProcess.start(
                    "--bus",
                    shm_url(bus.name),
                    "--nats",
                    nats_server.url,
                    "--export",
                    "svc.>",
                    "_INBOX.>",
                    "--import",
                    "svc.>",
                    "_INBOX.>",
                )
            )
        pending = asyncio.create_task(
            host_a.request("svc.ping", {"n": 1}, headers={"traceparent": TRACEPARENT}, timeout=30)
        )
        [request] = await take(requests, 1)
        await host_b.reply(request, {"pong": request.payload["n"]})
        reply = await asyncio.wait_for(pending, 30)
    finally:
        for bridge in bridges:
            await bridge.kill()
        await requests.aclose()
    assert request.headers == {"traceparent": TRACEPARENT}
    assert reply.payload == {"pong": 1}
